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

/// A gossip packet from `from` to `to` whose one update says `subject` is Down, at the
/// incarnation `to` knows it by: what any certified peer can forge.
fn forged_down(net: &Net, from: u8, to: u8, subject: u8) -> Vec<u8> {
    let view = net.nodes[&id(to).addr].members();
    let inc = view.iter().find(|m| m.id.name == format!("n{subject}")).map_or(0, |m| m.incarnation);
    down_report_packet(&id(from), 0, &id(to), &id(subject), inc).unwrap()
}

/// Every member event queued so far, by viewer.
fn drain_events(net: &mut Net) -> Vec<(u8, MemberEvent)> {
    let mut out = Vec::new();
    for (addr, m) in net.nodes.iter_mut() {
        let SocketAddr::V4(v4) = addr else { unreachable!() };
        while let Some(ev) = m.poll_event() {
            out.push((v4.ip().octets()[3], ev));
        }
    }
    out
}

fn incarnation_of(net: &Net, viewer: u8, subject: u8) -> u16 {
    let view = net.nodes[&id(viewer).addr].members();
    view.into_iter().find(|m| m.id.name == format!("n{subject}")).unwrap().incarnation
}

#[test]
fn a_forged_down_about_a_live_member_is_a_suspicion_it_refutes_under_the_same_generation() {
    let mut net = Net::joined(5);
    drain_events(&mut net);
    let now = net.now;
    // n6 (certified as n6) tells n2 that n3 is down.
    let pkt = forged_down(&net, 6, 2, 3);
    net.nodes.get_mut(&id(2).addr).unwrap().handle_datagram(now, Some("n6"), &pkt).unwrap();
    assert_eq!(net.state_of(2, 3), Some(MemberState::Suspect), "a Down from another member is only a suspicion");
    assert_eq!(net.nodes[&id(2).addr].stats().downs_downgraded, 1);
    // Again and again, to every honest member, at the incarnation each knows n3 by.
    for _ in 0..8 {
        for to in [2, 3, 4, 5] {
            let (pkt, now) = (forged_down(&net, 6, to, 3), net.now);
            net.nodes.get_mut(&id(to).addr).unwrap().handle_datagram(now, Some("n6"), &pkt).unwrap();
        }
        net.run(10, Duration::from_millis(50));
    }
    // Longer than a suspicion period (750 ms) since the last forgery.
    net.run(40, Duration::from_millis(50));
    for v in 2..7 {
        assert_eq!(net.state_of(v, 3), Some(MemberState::Alive), "n{v} about n3");
        let n3 = net.nodes[&id(v).addr].members().into_iter().find(|m| m.id.name == "n3").unwrap();
        assert_eq!(n3.id.generation, 1, "n{v}: n3 never rejoined");
    }
    assert!(incarnation_of(&net, 2, 3) > 0, "n3 refuted by bumping its incarnation");
    let events = drain_events(&mut net);
    assert!(
        events.iter().all(|(_, e)| !matches!(e, MemberEvent::Down(_) | MemberEvent::Rejoined(_))),
        "nobody saw a down or a rejoin: {events:?}"
    );
    for v in [2, 4, 5] {
        assert!(net.nodes[&id(v).addr].stats().downs_downgraded >= 8, "n{v} counted the forgeries");
    }
}

#[test]
fn a_forged_down_about_the_receiver_itself_is_refuted_instead_of_final() {
    let mut net = Net::joined(3);
    drain_events(&mut net);
    let (pkt, now) = (forged_down(&net, 4, 3, 3), net.now);
    net.nodes.get_mut(&id(3).addr).unwrap().handle_datagram(now, Some("n4"), &pkt).unwrap();
    let me = &net.nodes[&id(3).addr].members()[0];
    assert_eq!((me.state, me.id.generation), (MemberState::Alive, 1));
    assert_eq!(me.incarnation, 1, "refuted by a new incarnation");
    net.run(40, Duration::from_millis(50));
    assert!(drain_events(&mut net).iter().all(|(_, e)| !matches!(e, MemberEvent::Down(_) | MemberEvent::Rejoined(_))));
    for v in [2, 4] {
        assert_eq!(net.state_of(v, 3), Some(MemberState::Alive), "n{v} about n3");
        assert_eq!(incarnation_of(&net, v, 3), 1, "n{v} has the refutation");
    }
}

#[test]
fn a_crash_reported_by_others_is_declared_down_by_each_members_own_timer() {
    let mut net = Net::joined(8);
    net.down.push(id(9).addr);
    let timing = Profile::Fast.timing();
    // Some member probes n9 within 7 periods (each probes in rounds over a shuffled list);
    // then its suspicion runs out, and the others' (started on its Suspect gossip) with it.
    let bound = timing.probe_period * 7 + timing.suspect_to_down_after + Duration::from_millis(500);
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while (2..9).any(|v| net.state_of(v, 9) != Some(MemberState::Down)) {
        assert!(waited < bound, "not down everywhere within {bound:?}");
        net.run(1, step);
        waited += step;
    }
    println!("crash of 1 in 8: down in every view after {waited:?} (bound {bound:?})");
    let second_hand: u64 = (2..9).map(|v| net.nodes[&id(v).addr].stats().downs_downgraded).sum();
    assert!(second_hand > 0, "the Down reports of others were only suspicions");
}

#[test]
fn a_forged_turn_undead_only_makes_the_member_rejoin_under_a_new_generation() {
    // foca's TurnUndead ("you are down to me") cannot be told from a real one, and the
    // receiver must rejoin to be heard again by that sender. A forger gets a rejoin: a new
    // generation that replaces the old at once; nobody sees the member down.
    let mut net = Net::joined(3);
    drain_events(&mut net);
    let pkt = gossip_packet(&id(4), 0, &id(3), foca::Message::TurnUndead, &[]).unwrap();
    let now = net.now;
    net.nodes.get_mut(&id(3).addr).unwrap().handle_datagram(now, Some("n4"), &pkt).unwrap();
    net.run(40, Duration::from_millis(50));
    let events = drain_events(&mut net);
    assert!(events.iter().any(|(v, e)| *v == 3 && matches!(e, MemberEvent::Rejoined(_))), "{events:?}");
    assert!(events.iter().all(|(_, e)| !matches!(e, MemberEvent::Down(_))), "{events:?}");
    for v in [2, 4] {
        let n3 = net.nodes[&id(v).addr].members().into_iter().find(|m| m.id.name == "n3").unwrap();
        assert_eq!((n3.state, n3.id.generation), (MemberState::Alive, 2), "n{v} about n3");
    }
}

#[test]
fn a_certified_peer_cannot_take_over_another_members_address() {
    let mut net = Net::joined(3);
    // n4 (certified as n4) gossips as itself, but at n3's address and far generations up.
    let squatter = NodeIdentity { addr: id(3).addr, generation: 1 << 40, ..id(4) };
    let pkt = gossip_packet(&squatter, 0, &id(2), foca::Message::Gossip, &[]).unwrap();
    let now = net.now;
    let n2 = net.nodes.get_mut(&id(2).addr).unwrap();
    let err = n2.handle_datagram(now, Some("n4"), &pkt).unwrap_err();
    assert!(matches!(err, PacketError::AddressTaken { .. }), "{err}");
    // Nor can it say so about someone else: an update putting n4 at n3's address is refused.
    let mut update = 1u16.to_be_bytes().to_vec();
    GossipCodec.encode_member(&foca::Member::alive(squatter.clone()), &mut update).unwrap();
    let pkt = gossip_packet(&id(4), 0, &id(2), foca::Message::Gossip, &update).unwrap();
    assert!(n2.handle_datagram(now, Some("n4"), &pkt).is_err());
    assert_eq!(n2.stats().address_conflicts, 1);
    net.run(200, Duration::from_millis(50));
    for v in [2, 4] {
        let n3 = net.nodes[&id(v).addr].members().into_iter().find(|m| m.id.addr == id(3).addr).unwrap();
        assert_eq!((n3.id.name.as_str(), n3.state, n3.id.generation), ("n3", MemberState::Alive, id(3).generation));
    }
}

#[test]
fn members_leaving_together_never_rejoin() {
    let mut net = Net::joined(3);
    drain_events(&mut net);
    let now = net.now;
    for m in net.nodes.values_mut() {
        m.leave(now);
    }
    net.run(40, Duration::from_millis(50));
    let events = drain_events(&mut net);
    assert!(events.iter().all(|(_, e)| !matches!(e, MemberEvent::Rejoined(_))), "a leaver rejoined: {events:?}");
    assert!(events.iter().all(|(_, e)| !matches!(e, MemberEvent::Down(_))), "a leave read as a crash: {events:?}");
}

#[test]
fn a_suspect_member_takes_no_new_requests_but_keeps_those_under_way() {
    let view = |i: u8, state| MemberView { id: id(i), state, incarnation: 0 };
    let members = [
        view(1, MemberState::Alive),
        view(2, MemberState::Suspect),
        view(3, MemberState::Down),
        view(4, MemberState::Left),
    ];
    let alive: std::collections::BTreeSet<String> = alive_members(&members).into_keys().collect();
    let standing: std::collections::BTreeSet<String> = standing_members(&members).into_iter().collect();
    assert_eq!(alive, [id(1).name].into(), "new requests: alive members only");
    assert_eq!(standing, [id(1).name, id(2).name].into(), "requests in flight end at down or left, not suspect");

    // n2 suspected, then cleared; n1 suspected, then declared down (not "cleared").
    let before = [view(1, MemberState::Alive), view(2, MemberState::Alive)];
    let during = [view(1, MemberState::Suspect), view(2, MemberState::Suspect)];
    let after = [view(1, MemberState::Down), view(2, MemberState::Alive)];
    let sets = |m: &[MemberView]| (alive_members(m), standing_members(m));
    let (b, d, a) = (sets(&before), sets(&during), sets(&after));
    let names = |v: &[u8]| v.iter().map(|&i| id(i).name).collect::<Vec<_>>();
    assert_eq!(suspicions((&b.0, &b.1), (&d.0, &d.1)), (names(&[1, 2]), vec![]));
    assert_eq!(suspicions((&d.0, &d.1), (&a.0, &a.1)), (vec![], names(&[2])));
}
