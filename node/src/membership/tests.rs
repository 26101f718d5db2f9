//! Core behaviour pinned in virtual time with a lossless in-thread network. The full
//! simulator (loss, partitions, N = 1000) lives in `trellis-chaos`.

use super::*;
use std::collections::BTreeMap;
use trellis_proto::NodeMeta;

fn id(i: u8) -> NodeIdentity {
    NodeIdentity {
        addr: SocketAddr::from(([127, 0, 0, i], 7946)),
        generation: 1,
        name: format!("n{i}"),
        meta: NodeMeta::default(),
    }
}

struct Net {
    nodes: BTreeMap<SocketAddr, Membership>,
    now: Instant,
    down: Vec<SocketAddr>,
}

impl Net {
    fn new(n: u8) -> Net {
        let timing = Profile::Fast.timing();
        let nodes = (2..2 + n).map(|i| (id(i).addr, Membership::new(id(i), &timing, n as u32, i as u64))).collect();
        Net { nodes, now: Instant::now(), down: vec![] }
    }

    /// Delivers every queued packet, then advances the clock by `step`, `rounds` times.
    fn run(&mut self, rounds: u32, step: Duration) {
        for _ in 0..rounds {
            loop {
                let mut moved = false;
                let addrs: Vec<_> = self.nodes.keys().copied().collect();
                for a in addrs {
                    while let Some(t) = self.nodes.get_mut(&a).unwrap().poll_transmit() {
                        moved = true;
                        if self.down.contains(&a) || self.down.contains(&t.to) {
                            continue;
                        }
                        let name = self.nodes[&a].identity().name.clone();
                        if let Some(dst) = self.nodes.get_mut(&t.to) {
                            let _ = dst.handle_datagram(self.now, Some(&name), &t.data);
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
            self.now += step;
            for (a, m) in self.nodes.iter_mut() {
                if !self.down.contains(a) {
                    m.handle_timeout(self.now);
                }
            }
        }
    }

    /// `n` nodes that all joined through the first and had two seconds to converge.
    fn joined(n: u8) -> Net {
        let mut net = Net::new(n);
        let (seed, now) = (id(2).addr, net.now);
        for m in net.nodes.values_mut() {
            m.join(now, &[seed]);
        }
        net.run(40, Duration::from_millis(50));
        net
    }

    fn state_of(&self, viewer: u8, subject: u8) -> Option<MemberState> {
        self.nodes[&id(viewer).addr].members().into_iter().find(|m| m.id.name == format!("n{subject}")).map(|m| m.state)
    }
}

#[test]
fn nodes_joined_through_one_seed_see_each_other_alive() {
    let net = Net::joined(4);
    for v in 2..6 {
        for s in 2..6 {
            assert_eq!(net.state_of(v, s), Some(MemberState::Alive), "n{v} about n{s}");
        }
    }
}

#[test]
fn crashed_node_is_declared_down_and_graceful_leave_is_left() {
    let mut net = Net::joined(4);
    net.down.push(id(5).addr);
    let now = net.now;
    net.nodes.get_mut(&id(4).addr).unwrap().leave(now);
    net.run(100, Duration::from_millis(50));
    for v in [2, 3] {
        assert_eq!(net.state_of(v, 5), Some(MemberState::Down), "n{v} about crashed n5");
        assert_eq!(net.state_of(v, 4), Some(MemberState::Left), "n{v} about departed n4");
    }
    let stats = net.nodes[&id(2).addr].stats();
    assert!(stats.suspicions_raised >= 1 && stats.probes_sent > 0 && stats.bytes_out > 0, "{stats:?}");
}

#[test]
fn node_started_before_its_seed_joins_when_the_seed_comes_up() {
    let mut net = Net::new(2);
    let seed = id(2).addr;
    net.down.push(seed);
    let now = net.now;
    net.nodes.get_mut(&id(3).addr).unwrap().join(now, &[seed]);
    net.run(60, Duration::from_millis(100));
    assert!(!net.nodes[&id(3).addr].is_joined());
    net.down.clear();
    // Backoff is capped at 30 s: within a minute of the seed appearing we are in.
    net.run(600, Duration::from_millis(100));
    assert_eq!(net.state_of(3, 2), Some(MemberState::Alive));
    assert_eq!(net.state_of(2, 3), Some(MemberState::Alive));
}

#[test]
fn a_node_with_no_seed_but_itself_does_not_ask_to_be_woken_in_the_past() {
    let mut net = Net::new(1);
    let now = net.now;
    let m = net.nodes.values_mut().next().unwrap();
    let own = m.identity().addr;
    m.join(now, &[own]);
    m.join(now, &[]);
    for step in 1..100u64 {
        let t = now + Duration::from_millis(step * 10);
        m.handle_timeout(t);
        assert!(m.poll_timeout().is_none_or(|d| d > t), "deadline in the past at step {step}: a busy loop");
    }
}

#[test]
fn gossip_claiming_another_name_than_the_certificate_is_refused() {
    let mut net = Net::new(2);
    let now = net.now;
    let a = id(2).addr;
    net.nodes.get_mut(&id(3).addr).unwrap().join(now, &[a]);
    let t = net.nodes.get_mut(&id(3).addr).unwrap().poll_transmit().unwrap();
    let err = net.nodes.get_mut(&a).unwrap().handle_datagram(now, Some("mallory"), &t.data).unwrap_err();
    assert!(matches!(err, PacketError::IdentityMismatch { .. }), "{err}");
    assert_eq!(net.nodes[&a].stats().identity_mismatches, 1);
    assert!(!net.nodes[&a].is_joined());
}

#[test]
fn random_bytes_are_refused_without_panic() {
    let mut net = Net::new(1);
    let now = net.now;
    let m = net.nodes.values_mut().next().unwrap();
    let mut x: u64 = 7;
    for len in 0..300 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 33) as u8
            })
            .collect();
        let mut framed = vec![trellis_proto::envelope::MAGIC, trellis_proto::WIRE_VERSION, 1];
        framed.extend_from_slice(&bytes);
        assert!(m.handle_datagram(now, None, &bytes).is_err() || len == 0 || bytes.len() >= 3);
        let _ = m.handle_datagram(now, None, &framed);
    }
    assert!(m.stats().malformed_in > 250);
}

#[test]
fn a_leave_notice_relayed_for_a_crashed_member_is_refused() {
    let mut net = Net::joined(4);
    net.down.push(id(5).addr);
    net.run(100, Duration::from_millis(50));
    assert_eq!(net.state_of(2, 5), Some(MemberState::Down));
    // n4 (certified as n4) claims that n5 left: the sender is not the leaver.
    let notice = LeaveNotice { addr: id(5).addr, generation: 1, name: "n5".into() }.encode();
    let pkt = broadcast_packet(&id(4), 0, &id(2), &notice).unwrap();
    let now = net.now;
    net.nodes.get_mut(&id(2).addr).unwrap().handle_datagram(now, Some("n4"), &pkt).unwrap();
    assert_eq!(net.state_of(2, 5), Some(MemberState::Down), "a relayed notice must not relabel a crash");
    assert_eq!(net.nodes[&id(2).addr].stats().leaves_refused, 1);
}

#[test]
fn a_graceful_leave_reaches_every_member_without_relays() {
    let mut net = Net::joined(8);
    let now = net.now;
    net.nodes.get_mut(&id(9).addr).unwrap().leave(now);
    net.run(100, Duration::from_millis(50));
    for v in 2..9 {
        assert_eq!(net.state_of(v, 9), Some(MemberState::Left), "n{v} about departed n9");
        assert_eq!(net.nodes[&id(v).addr].stats().leaves_refused, 0, "n{v}: honest members never relay notices");
    }
}
