//! One node's rate limiter: decides every request locally from a token bucket whose size is
//! this node's current share, reports demand to each key's owner every tick, and, for the
//! keys it owns, answers reports with shares. No sockets and no clock: the shell calls
//! [`Limiter::tick`] and [`Limiter::handle`] and sends what they return.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use trellis_proto::ratelimit::{value_hash, Demand, Grant, LimitKey, RateLimitMsg, MAX_ENTRIES};

use super::bucket::{TokenBucket, Verdict};
use super::owner::{ClusterRates, OwnerTable};
use super::side::SideView;
pub use super::timing::ExchangeTiming;
use crate::membership::MemberState;

/// How a limit splits its traffic into buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Per {
    All,
    Header(String),
    Caller,
}

/// One `ratelimits` policy object, as the limiter uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct LimitSpec {
    pub name: String,
    pub service: String,
    pub route: Option<String>,
    pub rate: f64,
    pub burst: f64,
    pub per: Per,
    /// Delay mode: a request over the limit may wait this long for its token.
    pub max_delay: Option<Duration>,
}

impl LimitSpec {
    /// Default burst: a twentieth of a second of the limit, so a step from idle overshoots
    /// any one-second window by at most 5%; and at least 5, so a small per-caller limit lets
    /// a few requests through at once.
    pub fn default_burst(rate: f64) -> f64 {
        (rate / 20.0).max(5.0)
    }
}

/// Bytes to send to a member, by name.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    pub to: String,
    pub msg: RateLimitMsg,
}

/// A refusal, with what the 429 response says.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub limit: String,
    pub rate: f64,
    pub verdict: Verdict,
}

#[derive(Clone, Debug)]
struct KeyState {
    bucket: TokenBucket,
    lease_until: Option<Instant>,
    /// The owner that granted the lease; a lease from a member no longer the owner ends.
    granted_by: String,
    offered_tick: u32,
    admitted_tick: u32,
    offered: f64,
    admitted: f64,
    last_active: Instant,
    cluster: ClusterRates,
    label: String,
}

/// Totals per limit, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub admitted: u64,
    pub refused: u64,
    /// Admitted after waiting for a token (delay mode).
    pub delayed: u64,
}

pub struct Limiter {
    timing: ExchangeTiming,
    side: SideView,
    limits: BTreeMap<String, LimitSpec>,
    by_service: HashMap<String, Vec<String>>,
    keys: HashMap<LimitKey, KeyState>,
    owned: HashMap<LimitKey, OwnerTable>,
    counts: BTreeMap<String, Counts>,
    bytes_out: u64,
    refused_reports: u64,
}

/// Value hashed for the overflow bucket when a node tracks too many keys.
const OVERFLOW: u64 = u64::MAX;

impl Limiter {
    pub fn new(me: &str, timing: ExchangeTiming) -> Limiter {
        Limiter {
            side: SideView::new(me, timing.down_grace),
            timing,
            limits: BTreeMap::new(),
            by_service: HashMap::new(),
            keys: HashMap::new(),
            owned: HashMap::new(),
            counts: BTreeMap::new(),
            bytes_out: 0,
            refused_reports: 0,
        }
    }

    pub fn me(&self) -> &str {
        self.side.me()
    }

    /// Replaces the limits (after a policy change). Buckets of removed limits go.
    pub fn set_limits(&mut self, specs: Vec<LimitSpec>) {
        self.limits = specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        self.by_service.clear();
        for s in self.limits.values() {
            self.by_service.entry(s.service.clone()).or_default().push(s.name.clone());
        }
        let limits = &self.limits;
        self.keys.retain(|k, _| limits.contains_key(&k.limit));
        self.owned.retain(|k, _| limits.contains_key(&k.limit));
    }

    pub fn has_limits(&self) -> bool {
        !self.limits.is_empty()
    }

    /// Takes the member list (as membership reports it, without us).
    pub fn set_members<'a>(&mut self, now: Instant, members: impl IntoIterator<Item = (&'a str, MemberState)>) {
        self.side.update(now, members);
    }

    /// The limits that apply to a request to `service` on `route`, with each bucket's key.
    /// `header` reads a request header; `caller` is the calling identity.
    pub fn keys_for<'a>(
        &self,
        service: &str,
        route: Option<&str>,
        header: impl Fn(&str) -> Option<&'a str>,
        caller: &str,
    ) -> Vec<(LimitKey, String)> {
        let Some(names) = self.by_service.get(service) else { return Vec::new() };
        names
            .iter()
            .filter_map(|n| self.limits.get(n))
            .filter(|s| s.route.is_none() || s.route.as_deref() == route)
            .map(|s| {
                let label = match &s.per {
                    Per::All => String::new(),
                    Per::Header(h) => header(h).unwrap_or("").to_string(),
                    Per::Caller => caller.to_string(),
                };
                let value = if s.per == Per::All { 0 } else { value_hash(label.as_bytes()) };
                (LimitKey { limit: s.name.clone(), value }, label)
            })
            .collect()
    }

    /// Decides one request against every limit that applies; takes a token from each only
    /// when all admit.
    /// Admits the request now (`Ok(ZERO)`), after a wait (`Ok(wait)`: delay-mode limits
    /// over their rate, each wait within its `max_delay`), or refuses it.
    pub fn decide(&mut self, now: Instant, keys: &[(LimitKey, String)]) -> Result<Duration, Refusal> {
        let mut refusal = None;
        let mut wait = Duration::ZERO;
        for (key, label) in keys {
            let key = self.track(now, key, label);
            let max_delay = self.limits[&key.limit].max_delay;
            let state = self.keys.get_mut(&key).expect("tracked");
            state.offered_tick += 1;
            state.last_active = now;
            if refusal.is_some() {
                continue;
            }
            match (state.bucket.wait(now), max_delay) {
                (Some(w), _) if w.is_zero() => {}
                (Some(w), Some(max)) if w <= max => wait = wait.max(w),
                _ => {
                    let spec = &self.limits[&key.limit];
                    refusal =
                        Some(Refusal { limit: key.limit.clone(), rate: spec.rate, verdict: state.bucket.take(now) });
                }
            }
        }
        if let Some(r) = refusal {
            self.counts.entry(r.limit.clone()).or_default().refused += 1;
            return Err(r);
        }
        for (key, _) in keys {
            let key = if self.keys.contains_key(key) { key.clone() } else { overflow(key) };
            if let Some(state) = self.keys.get_mut(&key) {
                state.bucket.reserve(now);
                state.admitted_tick += 1;
            }
            let counts = self.counts.entry(key.limit).or_default();
            counts.admitted += 1;
            counts.delayed += u64::from(!wait.is_zero());
        }
        Ok(wait)
    }

    /// The key's state, created on first sight with the fallback share.
    fn track(&mut self, now: Instant, key: &LimitKey, label: &str) -> LimitKey {
        if self.keys.contains_key(key) {
            return key.clone();
        }
        let key = if self.keys.len() >= self.timing.max_keys { overflow(key) } else { key.clone() };
        if !self.keys.contains_key(&key) {
            let (rate, burst) = self.fallback(&key.limit);
            let state = KeyState {
                bucket: TokenBucket::new(now, rate, self.capacity(rate, burst), burst),
                lease_until: None,
                granted_by: String::new(),
                offered_tick: 0,
                admitted_tick: 0,
                offered: 0.0,
                admitted: 0.0,
                last_active: now,
                cluster: ClusterRates::default(),
                label: label.to_string(),
            };
            self.keys.insert(key.clone(), state);
        }
        key
    }

    /// An even split of this side's share: what a node uses with no live grant.
    fn fallback(&self, limit: &str) -> (f64, f64) {
        let Some(spec) = self.limits.get(limit) else { return (0.0, 1.0) };
        let per_node = self.side.fraction() / self.side.alive().len().max(1) as f64;
        (spec.rate * per_node, spec.burst * per_node)
    }

    fn capacity(&self, rate: f64, burst: f64) -> f64 {
        capacity(&self.timing, rate, burst)
    }

    /// The member that owns `key`: highest rendezvous hash over the members we see.
    pub fn owner_of(&self, key: &LimitKey) -> &str {
        owner(key, self.side.alive()).unwrap_or(self.me())
    }

    /// Every tick: fold the tick's counts into rates, fall back where leases ran out, report
    /// demand to owners, and serve our own keys as owner.
    pub fn tick(&mut self, now: Instant) -> Vec<Outgoing> {
        let secs = self.timing.tick.as_secs_f64();
        let mut reports: BTreeMap<String, Vec<Demand>> = BTreeMap::new();
        let mut own = Vec::new();
        let keys: Vec<LimitKey> = self.keys.keys().cloned().collect();
        for key in keys {
            let (rate, burst) = self.fallback(&key.limit);
            let owner = owner(&key, self.side.alive()).unwrap_or(self.me()).to_string();
            let s = self.keys.get_mut(&key).expect("listed");
            // Half-life of one tick: fast enough to see a step within two ticks.
            s.offered = estimate(s.offered, s.offered_tick, secs, self.timing.demand_weight);
            s.admitted = estimate(s.admitted, s.admitted_tick, secs, self.timing.demand_weight);
            s.offered_tick = 0;
            s.admitted_tick = 0;
            let idle = now.saturating_duration_since(s.last_active) > self.timing.idle_after;
            // A new owner (after a join, a heal, a death) starts from the fallback: the old
            // owner's grants and the new one's would otherwise overlap for a lease.
            if s.lease_until.is_none_or(|t| t <= now) || s.granted_by != owner {
                s.lease_until = None;
                // An idle key keeps no more than its share of the burst, so a step from
                // idle overshoots by at most the burst.
                let size = if idle { burst } else { capacity(&self.timing, rate, burst) };
                s.bucket.reshape(now, rate, size);
            }
            if idle {
                continue;
            }
            let d = Demand { key: key.clone(), offered: s.offered as f32, admitted: s.admitted as f32 };
            if owner == self.me() {
                own.push(d);
            } else {
                reports.entry(owner).or_default().push(d);
            }
        }
        let me = self.me().to_string();
        for d in own {
            let grant = self.serve(now, &me, &d);
            self.apply(now, &grant, &me);
        }
        self.forget(now);
        let mut out = Vec::new();
        for (to, ds) in reports {
            for chunk in ds.chunks(MAX_ENTRIES) {
                out.push(Outgoing { to: to.clone(), msg: RateLimitMsg::Report(chunk.to_vec()) });
            }
        }
        self.count_bytes(&out);
        out
    }

    /// A message from member `from` (its certified name).
    pub fn handle(&mut self, now: Instant, from: &str, msg: RateLimitMsg) -> Vec<Outgoing> {
        match msg {
            RateLimitMsg::Report(ds) => {
                let grants: Vec<Grant> = ds.iter().filter_map(|d| self.serve_checked(now, from, d)).collect();
                if grants.is_empty() {
                    return Vec::new();
                }
                let out = vec![Outgoing { to: from.to_string(), msg: RateLimitMsg::Grant(grants) }];
                self.count_bytes(&out);
                out
            }
            RateLimitMsg::Grant(gs) => {
                for g in gs {
                    // Only the owner we would ask may set our share.
                    if self.owner_of(&g.key) == from {
                        self.apply(now, &g, from);
                    }
                }
                Vec::new()
            }
        }
    }

    /// Serves a peer's report: only for a limit we know, from a member we see, and without
    /// growing the owner tables past `max_keys` (a peer cannot make us track keys without
    /// bound).
    fn serve_checked(&mut self, now: Instant, from: &str, d: &Demand) -> Option<Grant> {
        // Only the owner in our own view answers: two nodes that both answered for a key
        // (views differ for a moment after a join or heal) could grant the limit twice.
        let known = self.limits.contains_key(&d.key.limit)
            && self.side.alive().iter().any(|n| n == from)
            && self.owner_of(&d.key) == self.me();
        let room = self.owned.contains_key(&d.key) || self.owned.len() < self.timing.max_keys;
        if !(known && room) {
            self.refused_reports += 1;
            return None;
        }
        Some(self.serve(now, from, d))
    }

    /// Report entries refused: unknown limit, sender not a member, not ours, or no room.
    pub fn refused_reports(&self) -> u64 {
        self.refused_reports
    }

    /// As owner: record `node`'s demand and compute its share.
    fn serve(&mut self, now: Instant, node: &str, d: &Demand) -> Grant {
        let spec = &self.limits[&d.key.limit];
        let (rate, burst) = (spec.rate, spec.burst);
        let table = self.owned.entry(d.key.clone()).or_insert_with(|| OwnerTable::new(now));
        table.record(now, node, f64::from(d.offered), f64::from(d.admitted));
        let share = table.allocate(now, node, (rate, burst), &self.side, &self.timing);
        let c = table.cluster(now, self.timing.stale);
        Grant {
            key: d.key.clone(),
            rate: share.rate as f32,
            burst: share.burst as f32,
            lease_ms: self.timing.lease.as_millis() as u32,
            cluster_offered: c.offered as f32,
            cluster_admitted: c.admitted as f32,
            nodes: c.nodes.min(usize::from(u16::MAX)) as u16,
        }
    }

    fn apply(&mut self, now: Instant, g: &Grant, from: &str) {
        let size = self.capacity(f64::from(g.rate), f64::from(g.burst));
        let Some(s) = self.keys.get_mut(&g.key) else { return };
        if s.granted_by != from {
            s.granted_by = from.to_string();
        }
        s.bucket.reshape(now, f64::from(g.rate), size);
        s.lease_until = Some(now + Duration::from_millis(u64::from(g.lease_ms)));
        s.cluster = ClusterRates {
            offered: g.cluster_offered.into(),
            admitted: g.cluster_admitted.into(),
            nodes: g.nodes.into(),
        };
    }

    /// Drops keys idle long past their lease, and owner tables nobody reports to.
    fn forget(&mut self, now: Instant) {
        let keep = self.timing.idle_after * 10;
        self.keys.retain(|_, s| now.saturating_duration_since(s.last_active) < keep || s.lease_until.is_some());
        self.owned.retain(|_, t| t.idle_since(now) < keep);
    }

    fn count_bytes(&mut self, out: &[Outgoing]) {
        self.bytes_out += out.iter().map(|o| o.msg.encode().len() as u64 + 3).sum::<u64>();
    }

    /// Bytes of rate-limit messages this node has produced (envelope included).
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    pub fn counts(&self) -> &BTreeMap<String, Counts> {
        &self.counts
    }

    /// What the API shows: each limit, this node's part, and the cluster-wide picture.
    pub fn view(&self, now: Instant) -> Vec<LimitView> {
        self.limits
            .values()
            .map(|spec| {
                let mut keys: Vec<KeyView> = self
                    .keys
                    .iter()
                    .filter(|(k, _)| k.limit == spec.name)
                    .map(|(k, s)| {
                        let owned = self.owned.get(k);
                        KeyView {
                            value: s.label.clone(),
                            owner: self.owner_of(k).to_string(),
                            share_rate: s.bucket.rate(),
                            share_burst: s.bucket.capacity(),
                            leased: s.lease_until.is_some_and(|t| t > now),
                            offered: s.offered,
                            admitted: s.admitted,
                            cluster: owned.map(|t| t.cluster(now, self.timing.stale)).unwrap_or(s.cluster),
                            nodes: owned.map(|t| t.rows()).unwrap_or_default(),
                        }
                    })
                    .collect();
                keys.sort_by(|a, b| b.offered.total_cmp(&a.offered));
                keys.truncate(20);
                LimitView {
                    name: spec.name.clone(),
                    service: spec.service.clone(),
                    rate: spec.rate,
                    burst: spec.burst,
                    side_fraction: self.side.fraction(),
                    members_seen: self.side.alive().len(),
                    counts: self.counts.get(&spec.name).copied().unwrap_or_default(),
                    keys,
                }
            })
            .collect()
    }
}

/// The demand estimate after a tick that saw `count` requests: a moving average, which
/// keeps the few-requests-per-tick noise of a node in a large cluster out of its share,
/// except that a change too large to be noise (over 4 standard deviations of a Poisson
/// count, at least halving or doubling) is taken at once, so a load that moves between
/// nodes is followed within a tick or two.
fn estimate(prev: f64, count: u32, tick_secs: f64, weight: f64) -> f64 {
    let x = f64::from(count) / tick_secs;
    let expected = prev * tick_secs;
    let jump = (f64::from(count) - expected).abs() > 4.0 * expected.max(1.0).sqrt();
    if jump && (x < prev / 2.0 || x > prev * 2.0) {
        x
    } else {
        (1.0 - weight) * prev + weight * x
    }
}

/// A bucket's size: its share of the burst, but at least two ticks of its rate. A small
/// share of a large cluster would otherwise hold a token or less, and lose tokens to the
/// gaps between random arrivals (measured in the simulator at N=50, twice the limit offered:
/// 86% of the limit admitted with 100 ms, 99.4% with 250 ms).
fn capacity(timing: &ExchangeTiming, rate: f64, burst: f64) -> f64 {
    burst.max(rate * timing.smoothing.as_secs_f64())
}

fn overflow(key: &LimitKey) -> LimitKey {
    LimitKey { limit: key.limit.clone(), value: OVERFLOW }
}

/// Rendezvous hashing: every node that sees the same members picks the same owner, and a
/// member leaving moves only the keys it owned.
pub fn owner<'a>(key: &LimitKey, members: &'a [String]) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|m| {
            let mut bytes = Vec::with_capacity(key.limit.len() + m.len() + 9);
            bytes.extend_from_slice(key.limit.as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(&key.value.to_le_bytes());
            bytes.extend_from_slice(m.as_bytes());
            value_hash(&bytes)
        })
        .map(String::as_str)
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LimitView {
    pub name: String,
    pub service: String,
    pub rate: f64,
    pub burst: f64,
    /// Share of the limit this side of the cluster may admit (1 unless members are down).
    pub side_fraction: f64,
    pub members_seen: usize,
    #[serde(serialize_with = "counts_json")]
    pub counts: Counts,
    /// The busiest keys here (one for limits without `per`).
    pub keys: Vec<KeyView>,
}

fn counts_json<S: serde::Serializer>(c: &Counts, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(2))?;
    m.serialize_entry("admitted", &c.admitted)?;
    m.serialize_entry("refused", &c.refused)?;
    m.end()
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyView {
    /// The header value or caller (empty for limits without `per`).
    pub value: String,
    pub owner: String,
    /// This node's current share.
    pub share_rate: f64,
    pub share_burst: f64,
    /// False while running on the fallback share (no grant from the owner yet).
    pub leased: bool,
    /// Requests per second here.
    pub offered: f64,
    pub admitted: f64,
    /// Cluster-wide requests per second, as of the owner's last answer.
    pub cluster: ClusterRates,
    /// On the owner only: (node, offered, admitted, share) per reporting node.
    pub nodes: Vec<(String, f64, f64, f64)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MemberState::Alive;

    fn limiter(me: &str, max_keys: usize) -> Limiter {
        let mut l = Limiter::new(me, ExchangeTiming { max_keys, ..ExchangeTiming::default() });
        let spec = LimitSpec {
            name: "web".into(),
            service: "web".into(),
            route: None,
            rate: 100.0,
            burst: 10.0,
            per: Per::Header("x-user".into()),
            max_delay: None,
        };
        l.set_limits(vec![spec]);
        l.set_members(Instant::now(), [("b", Alive), ("c", Alive)]);
        l
    }

    fn report(value: u64) -> RateLimitMsg {
        RateLimitMsg::Report(vec![Demand { key: LimitKey { limit: "web".into(), value }, offered: 5.0, admitted: 5.0 }])
    }

    #[test]
    fn delay_mode_queues_requests_up_to_max_delay_and_refuses_past_it() {
        let t0 = Instant::now();
        let mut l = Limiter::new("a", ExchangeTiming::default());
        let spec = |name: &str, max_delay| LimitSpec {
            name: name.into(),
            service: name.into(),
            route: None,
            rate: 10.0,
            burst: 2.0,
            per: Per::All,
            max_delay,
        };
        l.set_limits(vec![spec("shaped", Some(Duration::from_millis(500))), spec("strict", None)]);
        let shaped = l.keys_for("shaped", None, |_| None, "c");
        let waits: Vec<Option<u128>> = (0..9).map(|_| l.decide(t0, &shaped).ok().map(|w| w.as_millis())).collect();
        // The burst at once, then one token per 100 ms, queued up to 500 ms; then 429s.
        assert_eq!(waits, [Some(0), Some(0), Some(100), Some(200), Some(300), Some(400), Some(500), None, None]);
        assert_eq!(
            (l.counts()["shaped"].admitted, l.counts()["shaped"].delayed, l.counts()["shaped"].refused),
            (7, 5, 2)
        );
        // A second later the queue has drained: one second admits ten, as the rate says.
        let t1 = t0 + Duration::from_millis(1500);
        let admitted = (0..30).filter(|_| l.decide(t1, &shaped).is_ok()).count();
        assert_eq!(admitted, 7, "the burst refilled (2) and 500 ms of queue (5)");
        // Reject mode is unchanged: no waits, ever.
        let strict = l.keys_for("strict", None, |_| None, "c");
        let strict_waits: Vec<bool> = (0..4).map(|_| l.decide(t0, &strict).is_ok_and(|w| w.is_zero())).collect();
        assert_eq!(strict_waits, [true, true, false, false]);
    }

    #[test]
    fn reports_from_strangers_or_for_unknown_limits_are_refused() {
        let now = Instant::now();
        let mut l = limiter("a", 10);
        assert!(l.handle(now, "mallory", report(1)).is_empty());
        let unknown = RateLimitMsg::Report(vec![Demand {
            key: LimitKey { limit: "other".into(), value: 0 },
            offered: 1.0,
            admitted: 1.0,
        }]);
        assert!(l.handle(now, "b", unknown).is_empty());
        assert_eq!(l.refused_reports(), 2);
        assert_eq!(l.handle(now, "b", report(1)).len(), 1);
    }

    #[test]
    fn a_peer_cannot_grow_the_owner_tables_past_max_keys() {
        let now = Instant::now();
        let mut l = limiter("a", 10);
        let answered = (1..=50).filter(|v| !l.handle(now, "b", report(*v)).is_empty()).count();
        assert_eq!(answered, 10);
        assert_eq!(l.refused_reports(), 40);
    }

    #[test]
    fn only_the_owner_may_set_a_share() {
        let now = Instant::now();
        let mut l = limiter("a", 10);
        let keys = l.keys_for("web", None, |_| Some("alice"), "");
        assert!(l.decide(now, &keys).is_ok());
        let key = keys[0].0.clone();
        let owner = l.owner_of(&key).to_string();
        let not_owner = ["a", "b", "c"].into_iter().find(|n| *n != owner).unwrap();
        let grant = |rate: f32| {
            RateLimitMsg::Grant(vec![Grant {
                key: key.clone(),
                rate,
                burst: 1.0,
                lease_ms: 1000,
                cluster_offered: 0.0,
                cluster_admitted: 0.0,
                nodes: 1,
            }])
        };
        l.handle(now, not_owner, grant(12345.0));
        assert_ne!(l.view(now)[0].keys[0].share_rate, 12345.0);
        l.handle(now, &owner, grant(12345.0));
        assert_eq!(l.view(now)[0].keys[0].share_rate, 12345.0);
    }

    #[test]
    fn too_many_values_share_one_overflow_bucket() {
        let now = Instant::now();
        let mut l = limiter("a", 3);
        let users: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
        for u in &users {
            let keys = l.keys_for("web", None, |_| Some(u.as_str()), "");
            let _ = l.decide(now, &keys);
        }
        assert_eq!(l.keys.len(), 4, "three values and the overflow bucket");
    }
}
