//! The store and sync logic, deterministically, without sockets.

use super::store::{Merged, PolicyStore};
use super::*;
use proptest::prelude::*;
use trellis_proto::PolicyEntry;

fn key(name: &str) -> Key {
    Key { kind: Kind::Services, name: name.into() }
}

fn write(s: &mut PolicyStore, now: u64, name: &str, timeout: &str) -> PolicyEntry {
    let body = format!("{{\"timeout\": \"{timeout}\"}}");
    let reg = s.prepare(now, &key(name), Some(body.as_bytes()), None).unwrap();
    s.commit(key(name), reg.clone());
    store::to_wire(&key(name), &reg)
}

fn apply(s: &mut PolicyStore, now: u64, e: &PolicyEntry) -> Merged {
    let (k, r) = store::from_wire(e.clone()).unwrap();
    s.merge(now, k, r).unwrap()
}

/// The winners, as byte-comparable state.
fn state(s: &PolicyStore) -> Vec<(Key, Version, Option<String>)> {
    s.iter().map(|(k, r)| (k.clone(), r.marker, r.val.body.clone())).collect()
}

/// Runs anti-entropy rounds a -> b until nothing is left to say.
fn sync_pair(a: &mut PolicyStore, b: &mut PolicyStore, now: u64) {
    let mut inbox = vec![(true, sync::open(a))];
    while let Some((to_b, msg)) = inbox.pop() {
        let (dst, _src) = if to_b { (&mut *b, &*a) } else { (&mut *a, &*b) };
        if let trellis_proto::PolicySync::Entries { entries, .. } = &msg {
            for e in entries {
                let (k, r) = store::from_wire(e.clone()).unwrap();
                dst.merge(now, k, r).unwrap();
            }
        }
        for reply in sync::answer(dst, &msg) {
            inbox.push((!to_b, reply));
        }
    }
}

fn sync_at(s: &mut [PolicyStore], i: usize, j: usize, now: u64) {
    let (lo, hi) = s.split_at_mut(j);
    sync_pair(&mut lo[i], &mut hi[0], now);
}

#[test]
fn concurrent_writes_pick_one_winner_everywhere_and_report_the_loser() {
    let mut nodes: Vec<PolicyStore> = ["a", "b", "c"].iter().map(|n| PolicyStore::new(n)).collect();
    let writes: Vec<PolicyEntry> =
        nodes.iter_mut().enumerate().map(|(i, s)| write(s, 1000, "web", &format!("{}s", i + 1))).collect();
    for s in nodes.iter_mut() {
        for w in &writes {
            apply(s, 1000, w);
        }
    }
    let first = state(&nodes[0]);
    for s in &nodes {
        assert_eq!(state(s), first);
        assert_eq!(s.conflicts(&key("web")).len(), 2, "each node saw two concurrent losers");
    }
}

#[test]
fn an_update_that_saw_the_previous_version_is_not_a_conflict() {
    let (mut a, mut b) = (PolicyStore::new("a"), PolicyStore::new("b"));
    let w1 = write(&mut a, 1000, "web", "1s");
    apply(&mut b, 1000, &w1);
    let w2 = write(&mut b, 2000, "web", "2s");
    assert_eq!(apply(&mut a, 2000, &w2), Merged::New);
    assert_eq!(apply(&mut a, 2000, &w1), Merged::Stale);
    assert!(a.conflicts(&key("web")).is_empty());
    assert_eq!(state(&a), state(&b));
}

#[test]
fn delete_is_a_tombstone_that_beats_older_writes() {
    let (mut a, mut b) = (PolicyStore::new("a"), PolicyStore::new("b"));
    let w1 = write(&mut a, 1000, "web", "1s");
    apply(&mut b, 1000, &w1);
    let del = b.prepare(2000, &key("web"), None, None).unwrap();
    b.commit(key("web"), del.clone());
    apply(&mut a, 2000, &store::to_wire(&key("web"), &del));
    apply(&mut a, 2000, &w1);
    assert_eq!(a.get(&key("web")).unwrap().val.body, None);
    assert_eq!(state(&a), state(&b));
}

#[test]
fn history_keeps_the_last_versions_with_deletes_and_a_peers_arrivals() {
    let (mut a, mut b) = (PolicyStore::new("a"), PolicyStore::new("b"));
    for i in 1..=20u64 {
        let w = write(&mut a, 1000 * i, "web", &format!("{i}s"));
        apply(&mut b, 1000 * i, &w);
    }
    let timeouts = |s: &PolicyStore| -> Vec<String> {
        s.history(&key("web")).map(|p| p.body.clone().unwrap_or_else(|| "deleted".into())).collect()
    };
    let kept = timeouts(&a);
    assert_eq!(kept.len(), store::MAX_HISTORY, "bounded");
    assert!(kept[0].contains("\"5s\"") && kept.last().unwrap().contains("\"20s\""), "oldest first: {kept:?}");
    assert_eq!(timeouts(&b), kept, "a peer that saw every version keeps the same history");
    let versions: Vec<Version> = a.history(&key("web")).map(|p| p.version).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]));
    let del = a.prepare(30_000, &key("web"), None, None).unwrap();
    a.commit(key("web"), del);
    assert_eq!(timeouts(&a).last().unwrap(), "deleted");
    // A stale version from a peer changes nothing, so it is not history.
    let old = store::to_wire(&key("web"), &b.get(&key("web")).unwrap().clone());
    let before = timeouts(&a);
    apply(&mut a, 30_000, &old);
    assert_eq!(timeouts(&a), before);
}

#[test]
fn check_and_set_refuses_a_stale_version() {
    let mut a = PolicyStore::new("a");
    let w1 = write(&mut a, 1000, "web", "1s");
    let v1 = Version { hlc: w1.version.0, node: w1.version.1 };
    let body = br#"{"timeout": "3s"}"#;
    assert!(a.prepare(2000, &key("web"), Some(body), Some(Version::default())).is_err(), "cas=0 means absent");
    let r = a.prepare(2000, &key("web"), Some(body), Some(v1)).unwrap();
    a.commit(key("web"), r);
    assert!(matches!(a.prepare(3000, &key("web"), Some(body), Some(v1)), Err(StoreError::CasMismatch { .. })));
}

#[test]
fn invalid_or_future_entries_from_a_peer_are_refused() {
    let mut a = PolicyStore::new("a");
    let bad = PolicyEntry {
        kind: "splits".into(),
        name: "c".into(),
        version: (1 << 16, 7),
        ancestors: [(0, 0); 2],
        body: Some(r#"{"service": "web", "backends": [{"subset": "v1", "weight": 97}]}"#.into()),
        proof: None,
    };
    let (k, r) = store::from_wire(bad).unwrap();
    assert!(a.merge(1000, k, r).unwrap_err().to_string().contains("weights sum to 97"));
    let future = PolicyEntry {
        kind: "services".into(),
        name: "web".into(),
        version: ((1000 + 3_600_000) << 16, 7),
        ancestors: [(0, 0); 2],
        body: Some("{}".into()),
        proof: None,
    };
    let (k, r) = store::from_wire(future).unwrap();
    assert!(a.merge(1000, k, r).unwrap_err().to_string().contains("in the future"));
    let unknown = PolicyEntry {
        kind: "gateways".into(),
        name: "x".into(),
        version: (1, 1),
        ancestors: [(0, 0); 2],
        body: None,
        proof: None,
    };
    assert!(store::from_wire(unknown).is_err());
    assert!(a.is_empty());
}

#[test]
fn anti_entropy_brings_a_new_node_to_the_full_state_in_bounded_chunks() {
    let mut a = PolicyStore::new("a");
    for i in 0..2000 {
        write(&mut a, 1000 + i, &format!("svc-{i}"), "1s");
    }
    let mut late = PolicyStore::new("late");
    sync_pair(&mut late, &mut a, 5000);
    assert_eq!(state(&late), state(&a));
    assert_eq!(late.root(), a.root());
}

#[test]
fn partitioned_writes_converge_after_heal() {
    let mut s: Vec<PolicyStore> = (0..5).map(|i| PolicyStore::new(&format!("n{i}"))).collect();
    // Side A = {0,1}, side B = {2,3,4}; both sides write, including the same object.
    write(&mut s[0], 1000, "web", "1s");
    write(&mut s[0], 1001, "only-a", "1s");
    write(&mut s[3], 1002, "web", "2s");
    write(&mut s[4], 1003, "only-b", "2s");
    for (i, j, t) in [(0, 1, 2000), (2, 3, 2000), (3, 4, 2000), (2, 3, 2000)] {
        sync_at(&mut s, i, j, t);
    }
    // Heal: one cross pair, then anti-entropy inside each side.
    for (i, j) in [(1, 2), (0, 1), (2, 3), (3, 4), (2, 3)] {
        sync_at(&mut s, i, j, 3000);
    }
    let reference = state(&s[0]);
    for n in &s {
        assert_eq!(state(n), reference);
    }
    assert_eq!(reference.len(), 3);
    assert!(s.iter().any(|n| !n.conflicts(&key("web")).is_empty()), "the losing web write is reported");
}

proptest! {
    /// Merge is commutative, associative and idempotent: any delivery order of any
    /// history, with duplicates, ends in the same state.
    #[test]
    fn merge_order_does_not_matter(
        ops in prop::collection::vec((0usize..3, 0usize..4, 0u64..50), 1..40),
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..120),
    ) {
        let mut writers: Vec<PolicyStore> = (0..3).map(|i| PolicyStore::new(&format!("w{i}"))).collect();
        let mut log = Vec::new();
        for (t, (w, obj, dt)) in ops.into_iter().enumerate() {
            let e = write(&mut writers[w], 1000 + t as u64 * 10 + dt, &format!("o{obj}"), &format!("{}s", dt + 1));
            log.push(e);
        }
        let mut forward = PolicyStore::new("f");
        for e in &log { apply(&mut forward, 10_000, e); }
        let mut shuffled = PolicyStore::new("s");
        for idx in &order { apply(&mut shuffled, 10_000, idx.get(&log)); }
        for e in log.iter().rev() { apply(&mut shuffled, 10_000, e); }
        for e in &log { apply(&mut shuffled, 10_000, e); }
        prop_assert_eq!(state(&forward), state(&shuffled));
        prop_assert_eq!(forward.root(), shuffled.root());
    }
}

#[test]
fn tombstones_are_collected_only_after_every_live_peer_confirmed_them() {
    let (mut a, mut b) = (PolicyStore::new("a"), PolicyStore::new("b"));
    a.tombstone_grace_ms = 1000;
    let w = write(&mut a, 10_000, "web", "1s");
    apply(&mut b, 10_000, &w);
    let del = a.prepare(11_000, &key("web"), None, None).unwrap();
    a.commit(key("web"), del.clone());
    let peers = vec!["b".to_string(), "c".to_string()];
    assert_eq!(a.collect_tombstones(11_500, &peers), 0, "too young");
    a.confirm_peer("b");
    assert_eq!(a.collect_tombstones(12_500, &peers), 0, "c has not confirmed it");
    a.confirm_peer("c");
    assert_eq!(a.collect_tombstones(12_500, &peers), 1);
    assert_eq!(a.tombstones(), 0);
    assert!(a.is_empty());
    // The tombstone coming back from a slower peer does not undo the collection...
    assert_eq!(apply(&mut a, 12_600, &store::to_wire(&key("web"), &del)), Merged::Stale);
    assert!(a.is_empty());
    // ...and an unconfirmed one still goes after three grace periods.
    let mut lone = PolicyStore::new("lone");
    lone.tombstone_grace_ms = 1000;
    let t = lone.prepare(20_000, &key("x"), None, None).unwrap();
    lone.commit(key("x"), t);
    assert_eq!(lone.collect_tombstones(21_500, &peers), 0);
    assert_eq!(lone.collect_tombstones(23_000, &peers), 1);
}

#[test]
fn per_object_metadata_stays_48_bytes_however_many_nodes_wrote() {
    let mut stores: Vec<PolicyStore> = (0..100).map(|i| PolicyStore::new(&format!("writer-{i}"))).collect();
    let mut last = None;
    for (i, s) in stores.iter_mut().enumerate() {
        if let Some(e) = &last {
            apply(s, 1000 + i as u64, e);
        }
        last = Some(write(s, 1000 + i as u64, "web", "1s"));
    }
    let (k, reg) = store::from_wire(last.unwrap()).unwrap();
    let fixed = bincode::config::standard().with_fixed_int_encoding();
    let meta = bincode::serde::encode_to_vec((reg.marker, reg.val.ancestors), fixed).unwrap();
    assert_eq!(meta.len(), 48, "{k:?}");
}

#[test]
fn a_small_change_fits_one_gossip_item_and_an_idle_sync_is_tiny() {
    let mut s = PolicyStore::new("a");
    let key = Key { kind: Kind::Subsets, name: "w12".into() };
    let reg = s
        .prepare(1_795_000_000_000, &key, Some(br#"{"service": "bench", "labels": {"version": "v12"}}"#), None)
        .unwrap();
    let item = store::to_wire(&key, &reg).encode_item();
    println!("subset as a gossip item: {} bytes", item.len());
    assert!(item.len() < 128);
    s.commit(key, reg);
    let root = sync::open(&s).encode();
    println!("idle sync opening: {} bytes + 3 envelope", root.len());
    assert!(root.len() + 3 <= 16);
}
