//! The replicated policy store: one last-writer-wins register per object.
//!
//! Each object is a `crdts::LWWReg` whose marker is a [`Version`] (hybrid logical clock,
//! writer id): merging is commutative, associative and idempotent, never mixes fields of two
//! versions, and picks the same winner everywhere. Why not `crdts::Map`/`MVReg`: their
//! vector clocks grow with every writer (about 2 KB per entry after 64 writers), while a
//! version here is 16 bytes plus two 16-byte ancestors however many nodes wrote: 48 bytes.
//! The ancestors tell an update (which saw what it replaced) from a concurrent write, whose
//! loser is kept as a visible conflict instead of vanishing.

use std::collections::BTreeMap;

use crdts::{CvRDT, LWWReg};
use serde::{Deserialize, Serialize};
use trellis_proto::{PolicyEntry, WriterProof};

use super::hlc::Hlc;
use super::model::{self, FieldError, Kind};

/// A total order on writes: HLC first, writer id to break ties.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub hlc: u64,
    pub node: u64,
}

impl Version {
    pub fn is_none(&self) -> bool {
        *self == Version::default()
    }

    /// The compact form used in API responses and `?cas=`.
    pub fn token(&self) -> String {
        format!("{}.{:x}", self.hlc, self.node)
    }

    pub fn parse_token(s: &str) -> Option<Version> {
        if s == "0" {
            return Some(Version::default());
        }
        let (hlc, node) = s.split_once('.')?;
        Some(Version { hlc: hlc.parse().ok()?, node: u64::from_str_radix(node, 16).ok()? })
    }
}

/// What a register holds besides its version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Value {
    /// Canonical JSON of the object; `None` is a tombstone.
    pub body: Option<String>,
    pub ancestors: [Version; 2],
    /// The writer's signature, on kinds whose writer matters ([`Kind::is_attributed`]). The
    /// log stores it beside the register (see `wal`), hence not serialized here.
    #[serde(skip)]
    pub proof: Option<WriterProof>,
}

/// Signs local writes and checks the writer of a peer's, with node certificates (see
/// `pki::LiveIdentity`). A store without one (unit tests) trusts the claimed writer id.
pub trait WriterAuth: Send + Sync {
    fn sign(&self, message: &[u8]) -> Result<WriterProof, String>;
    /// The certified node name of the proof's signer, if the proof holds for `message` and
    /// its certificate chained to the cluster CA at `at_ms` (the write's own time).
    fn verify(&self, message: &[u8], proof: &WriterProof, at_ms: u64) -> Result<String, String>;
}

pub type Register = LWWReg<Value, Version>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub kind: Kind,
    pub name: String,
}

impl Key {
    /// The key of instance `id` registered on `node`: `<id>@<node>`.
    pub fn instance(id: &str, node: &str) -> Key {
        Key { kind: Kind::Instances, name: model::instance_name(id, node) }
    }
}

/// One version of an object as this store installed it: what `?history` lists and
/// `policy revert` writes again. A `None` body is a delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Past {
    pub version: Version,
    pub body: Option<String>,
}

/// Versions kept per object, newest last: enough to undo a run of edits, bounded so a
/// busy object costs at most this many bodies.
pub const MAX_HISTORY: usize = 16;

/// A concurrent version that lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub version: Version,
    pub body: Option<String>,
    pub lost_to: Version,
}

/// How a merge went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// The incoming version won; state changed.
    New,
    /// We already had it or something newer.
    Stale,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct PolicyStats {
    pub local_writes: u64,
    pub merged_new: u64,
    pub merged_stale: u64,
    pub conflicts: u64,
    pub refused: u64,
    pub tombstones_collected: u64,
}

/// Why a write or a peer's entry was not taken.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("version mismatch: the object is at {current}, not {expected}")]
    CasMismatch { expected: String, current: String },
    #[error("{0}")]
    Refused(String),
    /// A local write this node may not make whatever its body says.
    #[error("{0}")]
    Forbidden(String),
}

pub const BUCKETS: usize = 256;
/// Conflicts remembered per object (the newest).
const MAX_CONFLICTS: usize = 4;
/// A peer's clock may run this far ahead before its writes are refused.
const MAX_FUTURE_MS: u64 = 60_000;

/// FNV-1a: a hash every node and every version computes identically (std's is not
/// guaranteed stable across Rust releases).
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn bucket_of(key: &Key) -> usize {
    (fnv64(&[key.kind.as_str().as_bytes(), key.name.as_bytes()]) % BUCKETS as u64) as usize
}

fn entry_hash(key: &Key, reg: &Register) -> u64 {
    let v = reg.marker;
    fnv64(&[key.kind.as_str().as_bytes(), key.name.as_bytes(), &v.hlc.to_le_bytes(), &v.node.to_le_bytes()])
}

pub struct PolicyStore {
    name: String,
    node: u64,
    auth: Option<std::sync::Arc<dyn WriterAuth>>,
    hlc: Hlc,
    objects: BTreeMap<Key, Register>,
    conflicts: BTreeMap<Key, Vec<Conflict>>,
    /// The last versions installed here, per object (see [`Past`]).
    history: BTreeMap<Key, std::collections::VecDeque<Past>>,
    buckets: Vec<u64>,
    /// Bumped on every change; blocking reads wait on it.
    index: u64,
    /// Keys changed since the shell last persisted and published.
    dirty: Vec<(Key, Register)>,
    /// Index at which each key was last installed (tombstone collection needs it).
    installed_at: BTreeMap<Key, u64>,
    /// Per peer (writer id of its name): our index when its root last equalled ours.
    confirmed: std::collections::HashMap<u64, u64>,
    /// A tombstone older than this may be collected, and is no longer taken from peers.
    pub tombstone_grace_ms: u64,
    pub stats: PolicyStats,
}

impl PolicyStore {
    pub fn new(node_name: &str) -> PolicyStore {
        PolicyStore {
            name: node_name.to_string(),
            node: fnv64(&[node_name.as_bytes()]),
            auth: None,
            hlc: Hlc::default(),
            objects: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            history: BTreeMap::new(),
            buckets: vec![0; BUCKETS],
            index: 0,
            dirty: Vec::new(),
            installed_at: BTreeMap::new(),
            confirmed: Default::default(),
            tombstone_grace_ms: 10 * 60 * 1000,
            stats: PolicyStats::default(),
        }
    }

    /// Signs this node's attributed writes and checks the writers of peers' from now on.
    pub fn set_auth(&mut self, auth: std::sync::Arc<dyn WriterAuth>) {
        self.auth = Some(auth);
    }

    pub fn node_id(&self) -> u64 {
        self.node
    }

    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn get(&self, key: &Key) -> Option<&Register> {
        self.objects.get(key)
    }

    pub fn conflicts(&self, key: &Key) -> &[Conflict] {
        self.conflicts.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The versions of `key` this store installed, oldest first (at most [`MAX_HISTORY`]):
    /// local writes and peers' versions as they arrived. A version a peer replaced before
    /// it reached this node is not among them; the node it was written on has it.
    pub fn history(&self, key: &Key) -> impl DoubleEndedIterator<Item = &Past> {
        self.history.get(key).into_iter().flatten()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Register)> {
        self.objects.iter()
    }

    /// The live objects of `kind`, parsed; deleted ones and any that no longer parse
    /// (written by a newer version) are skipped.
    pub fn objects(&self, kind: Kind) -> impl Iterator<Item = (&Key, model::Object)> + '_ {
        self.objects.iter().filter(move |(k, _)| k.kind == kind).filter_map(|(k, r)| {
            let body = r.val.body.as_ref()?;
            Some((k, model::parse(k.kind, &k.name, body.as_bytes()).ok()?))
        })
    }

    /// Prepares a local write (validated, versioned) without applying it, so the shell can
    /// make it durable first. `cas`: the version the caller read (`0` = must not exist).
    pub fn prepare(
        &mut self,
        now_ms: u64,
        key: &Key,
        body: Option<&[u8]>,
        cas: Option<Version>,
    ) -> Result<Register, StoreError> {
        if key.kind == Kind::Revocations && key.name == self.name {
            return Err(StoreError::Forbidden(format!(
                "revocations.{}: a node cannot write its own revocation; write it on another node",
                key.name
            )));
        }
        let current = self.objects.get(key);
        let current_version = current.filter(|r| r.val.body.is_some()).map(|r| r.marker).unwrap_or_default();
        if let Some(expected) = cas {
            if expected != current_version {
                return Err(StoreError::CasMismatch { expected: expected.token(), current: current_version.token() });
            }
        }
        let body = match body {
            Some(json) => {
                let obj = model::parse(key.kind, &key.name, json)?;
                Some(serde_json::to_string(&obj).expect("objects serialize"))
            }
            None => None,
        };
        let version = Version { hlc: self.hlc.tick(now_ms), node: self.node };
        let ancestors = match current {
            Some(r) => [r.marker, r.val.ancestors[0]],
            None => [Version::default(); 2],
        };
        let mut reg = LWWReg { val: Value { body, ancestors, proof: None }, marker: version };
        if let (true, Some(auth)) = (key.kind.is_attributed(), &self.auth) {
            let message = to_wire(key, &reg).signed_message();
            reg.val.proof = Some(auth.sign(&message).map_err(StoreError::Refused)?);
        }
        Ok(reg)
    }

    /// Applies a prepared local write.
    pub fn commit(&mut self, key: Key, reg: Register) {
        self.stats.local_writes += 1;
        self.install(key, reg);
    }

    fn install(&mut self, key: Key, reg: Register) {
        let b = bucket_of(&key);
        if let Some(old) = self.objects.get(&key) {
            self.buckets[b] ^= entry_hash(&key, old);
        }
        self.buckets[b] ^= entry_hash(&key, &reg);
        let past = self.history.entry(key.clone()).or_default();
        past.push_back(Past { version: reg.marker, body: reg.val.body.clone() });
        if past.len() > MAX_HISTORY {
            past.pop_front();
        }
        self.dirty.push((key.clone(), reg.clone()));
        self.index += 1;
        self.installed_at.insert(key.clone(), self.index);
        self.objects.insert(key, reg);
    }

    /// A peer's root equalled ours: it holds everything we hold, tombstones included.
    pub fn confirm_peer(&mut self, peer_name: &str) {
        self.confirmed.insert(fnv64(&[peer_name.as_bytes()]), self.index);
    }

    /// Drops tombstones older than the grace period that every live peer has confirmed
    /// holding (an equal root since the tombstone arrived here). After three grace periods
    /// a tombstone goes regardless, so a peer that missed the window cannot pin it forever.
    /// Returns how many were collected.
    pub fn collect_tombstones(&mut self, now_ms: u64, live_peers: &[String]) -> usize {
        let grace = self.tombstone_grace_ms;
        let peers: Vec<u64> = live_peers.iter().map(|p| fnv64(&[p.as_bytes()])).collect();
        let due: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, r)| r.val.body.is_none())
            .filter(|(k, r)| {
                let age = now_ms.saturating_sub(r.marker.hlc >> 16);
                let at = self.installed_at.get(*k).copied().unwrap_or(0);
                let seen_by_all = peers.iter().all(|p| self.confirmed.get(p).is_some_and(|i| *i >= at));
                (age >= grace && seen_by_all) || age >= 3 * grace
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            if let Some(old) = self.objects.remove(k) {
                self.buckets[bucket_of(k)] ^= entry_hash(k, &old);
                self.installed_at.remove(k);
                self.history.remove(k);
            }
        }
        if !due.is_empty() {
            self.index += 1;
            self.stats.tombstones_collected += due.len() as u64;
        }
        due.len()
    }

    pub fn tombstones(&self) -> usize {
        self.objects.values().filter(|r| r.val.body.is_none()).count()
    }

    /// Merges a version from a peer (or from disk). Validates it exactly as the API would.
    pub fn merge(&mut self, now_ms: u64, key: Key, reg: Register) -> Result<Merged, StoreError> {
        if let Some(body) = &reg.val.body {
            model::parse(key.kind, &key.name, body.as_bytes())?;
        }
        if reg.marker.hlc >> 16 > now_ms + MAX_FUTURE_MS {
            return Err(StoreError::Refused(format!(
                "{}.{}: version is {} s in the future; check the writer's clock",
                key.kind,
                key.name,
                ((reg.marker.hlc >> 16) - now_ms) / 1000
            )));
        }
        self.hlc.observe(reg.marker.hlc);
        let stale_tombstone = now_ms.saturating_sub(reg.marker.hlc >> 16) >= self.tombstone_grace_ms;
        if reg.val.body.is_none() && stale_tombstone && !self.objects.contains_key(&key) {
            // Collected here already (or never needed): taking it back would undo collection.
            self.stats.merged_stale += 1;
            return Ok(Merged::Stale);
        }
        let local = self.objects.get(&key).cloned();
        if local.as_ref().is_none_or(|l| reg.marker > l.marker) {
            self.check_writer(&key, &reg)?;
        }
        let Some(local) = local else {
            self.stats.merged_new += 1;
            self.install(key, reg);
            return Ok(Merged::New);
        };
        local.validate_merge(&reg).map_err(|e| StoreError::Refused(format!("{}.{}: {e}", key.kind, key.name)))?;
        if reg.marker <= local.marker {
            if reg.marker < local.marker && !local.val.ancestors.contains(&reg.marker) {
                let lost_to = local.marker;
                self.note_conflict(&key, &reg, lost_to);
            }
            self.stats.merged_stale += 1;
            return Ok(Merged::Stale);
        }
        if !reg.val.ancestors.contains(&local.marker) {
            let (loser, winner) = (local.clone(), reg.marker);
            self.note_conflict(&key, &loser, winner);
        }
        let mut merged = local;
        merged.merge(reg);
        self.stats.merged_new += 1;
        self.install(key, merged);
        Ok(Merged::New)
    }

    fn note_conflict(&mut self, key: &Key, loser: &Register, lost_to: Version) {
        let list = self.conflicts.entry(key.clone()).or_default();
        if list.iter().any(|c| c.version == loser.marker) {
            return;
        }
        self.stats.conflicts += 1;
        list.push(Conflict { version: loser.marker, body: loser.val.body.clone(), lost_to });
        if list.len() > MAX_CONFLICTS {
            list.remove(0);
        }
    }

    /// Are there changes not yet taken?
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Changes since the last call, for the shell to persist and publish.
    pub fn take_dirty(&mut self) -> Vec<(Key, Register)> {
        std::mem::take(&mut self.dirty)
    }

    /// Order-independent hash of the whole state.
    pub fn root(&self) -> u64 {
        self.buckets.iter().fold(0, |a, b| a ^ b.rotate_left(7)) ^ self.objects.len() as u64
    }

    pub fn buckets(&self) -> &[u64] {
        &self.buckets
    }

    /// Buckets whose hashes differ from a peer's.
    pub fn diff(&self, theirs: &[u64]) -> Vec<u16> {
        (0..BUCKETS).filter(|&i| theirs.get(i) != Some(&self.buckets[i])).map(|i| i as u16).collect()
    }

    pub fn entries_in(&self, buckets: &[u16]) -> Vec<PolicyEntry> {
        let want: std::collections::HashSet<usize> = buckets.iter().map(|b| *b as usize).collect();
        self.objects.iter().filter(|(k, _)| want.contains(&bucket_of(k))).map(|(k, r)| to_wire(k, r)).collect()
    }
}

impl PolicyStore {
    /// Who may write what, for a version that would win here: an instance `<id>@<node>`
    /// only its node, a revocation anyone but the revoked node. With [`WriterAuth`] the
    /// writer is the proof's certified signer; without, the claimed writer id. Checked only
    /// for winners, so a stale copy costs no signature check. The rule reads nothing but the
    /// entry and the CA, so every node takes the same entries and the states converge.
    fn check_writer(&self, key: &Key, reg: &Register) -> Result<(), StoreError> {
        if !key.kind.is_attributed() {
            return Ok(());
        }
        let refuse = |why: String| Err(StoreError::Refused(format!("{}.{}: {why}", key.kind, key.name)));
        let writer = match &self.auth {
            Some(auth) => {
                let Some(proof) = &reg.val.proof else {
                    return refuse("no writer proof; upgrade the writing agent".into());
                };
                let message = to_wire(key, reg).signed_message();
                let name = match auth.verify(&message, proof, reg.marker.hlc >> 16) {
                    Ok(name) => name,
                    Err(e) => return refuse(format!("writer proof refused: {e}")),
                };
                if fnv64(&[name.as_bytes()]) != reg.marker.node {
                    return refuse(format!("signed by {name}, whose writer id is not the version's"));
                }
                Some(name)
            }
            None => None,
        };
        let is = |name: &str| writer.as_deref().map_or(fnv64(&[name.as_bytes()]) == reg.marker.node, |w| w == name);
        match key.kind {
            Kind::Instances => {
                let owner = model::instance_node(&key.name).unwrap_or("");
                if owner.is_empty() || !is(owner) {
                    return refuse("written by a node that does not own it".into());
                }
            }
            Kind::Revocations if is(&key.name) => return refuse("a node may not change its own revocation".into()),
            _ => {}
        }
        Ok(())
    }
}

pub fn to_wire(key: &Key, reg: &Register) -> PolicyEntry {
    let v = |x: Version| (x.hlc, x.node);
    PolicyEntry {
        kind: key.kind.as_str().into(),
        name: key.name.clone(),
        version: v(reg.marker),
        ancestors: [v(reg.val.ancestors[0]), v(reg.val.ancestors[1])],
        body: reg.val.body.clone(),
        proof: reg.val.proof.clone(),
    }
}

pub fn from_wire(e: PolicyEntry) -> Result<(Key, Register), FieldError> {
    let kind = Kind::parse(&e.kind)?;
    model::validate_name(kind, &e.name)?;
    let v = |(hlc, node): (u64, u64)| Version { hlc, node };
    let reg = LWWReg {
        val: Value { body: e.body, ancestors: [v(e.ancestors[0]), v(e.ancestors[1])], proof: e.proof },
        marker: v(e.version),
    };
    Ok((Key { kind, name: e.name }, reg))
}
