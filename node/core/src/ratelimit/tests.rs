//! The accuracy, reaction, failure and fairness targets, in the simulator.

use std::time::Duration;

use super::sim::{Flow, Sim, SimConfig};
use super::Per;

const LIMIT: f64 = 1000.0;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

fn accuracy(nodes: usize, skewed: bool, seed: u64) -> f64 {
    let mut sim = Sim::new(SimConfig { seed, ..SimConfig::new(nodes, LIMIT) });
    sim.set_load(2.0 * LIMIT, skewed.then_some(0));
    sim.run_for(secs(10.0));
    sim.admitted_rate(&[], None, secs(0.0), secs(10.0))
}

#[test]
fn admitted_rate_holds_the_limit_at_3_10_and_50_nodes_uniform_and_skewed() {
    for nodes in [3, 10, 50] {
        for skewed in [false, true] {
            let got = accuracy(nodes, skewed, 7);
            assert!(within(got, LIMIT, 0.05), "N={nodes} skewed={skewed}: admitted {got:.0}/s for a limit of {LIMIT}");
        }
    }
}

#[test]
fn a_step_from_idle_to_five_times_the_limit_overshoots_no_second_by_10_percent() {
    for (nodes, on) in [(3, None), (10, Some(0)), (10, None), (50, None)] {
        let mut sim = Sim::new(SimConfig::new(nodes, LIMIT));
        sim.run_for(secs(2.0));
        sim.set_load(5.0 * LIMIT, on);
        sim.run_for(secs(5.0));
        let worst = sim.max_window(secs(1.0), secs(2.0), secs(7.0));
        assert!(worst < 1.1 * LIMIT, "N={nodes} on={on:?}: a 1 s window admitted {worst:.0}");
        let settled = sim.admitted_rate(&[], None, secs(3.0), secs(7.0));
        assert!(within(settled, LIMIT, 0.05), "N={nodes} on={on:?}: settled at {settled:.0}");
    }
}

#[test]
fn load_moving_between_nodes_is_followed_within_a_quarter_second() {
    let mut sim = Sim::new(SimConfig::new(10, LIMIT));
    sim.set_load(2.0 * LIMIT, Some(0));
    sim.run_for(secs(3.0));
    sim.set_load(2.0 * LIMIT, Some(9));
    sim.run_for(secs(2.0));
    let after = sim.admitted_rate(&[9], None, secs(3.25), secs(5.0));
    assert!(within(after, LIMIT, 0.05), "node 9 got {after:.0}/s from 250 ms after the move");
}

#[test]
fn a_crashed_nodes_share_moves_to_the_others_after_detection_and_grace() {
    let n = 5;
    let mut sim = Sim::new(SimConfig::new(n, LIMIT));
    sim.set_load(2.0 * LIMIT, None);
    sim.run_for(secs(3.0));
    sim.crash(4);
    sim.run_for(secs(1.0)); // failure detection
    let survivors = [0, 1, 2, 3];
    for i in survivors {
        sim.set_view(i, &survivors, &[4]);
    }
    sim.run_for(secs(1.0));
    let held = sim.admitted_rate(&survivors, None, secs(4.2), secs(5.0));
    assert!(held <= LIMIT * 0.8 * 1.05, "within the grace the dead share is held: {held:.0}");
    sim.run_for(secs(6.0)); // the 5 s grace ends at 9 s
    for i in survivors {
        sim.set_view(i, &survivors, &[4]);
    }
    sim.run_for(secs(3.0));
    let taken = sim.admitted_rate(&survivors, None, secs(11.2), secs(14.0));
    assert!(within(taken, LIMIT, 0.05), "after detection + grace the survivors admit {taken:.0}");
}

#[test]
fn a_2_3_partition_keeps_each_side_within_its_documented_share() {
    let mut sim = Sim::new(SimConfig::new(5, LIMIT));
    sim.set_load(2.0 * LIMIT, None);
    sim.run_for(secs(2.0));
    let (small, big): (&[usize], &[usize]) = (&[0, 1], &[2, 3, 4]);
    sim.partition(&[small, big]);
    sim.run_for(secs(1.0)); // until membership declares the other side down
    for &i in small {
        sim.set_view(i, small, big);
    }
    for &i in big {
        sim.set_view(i, big, small);
    }
    sim.run_for(secs(3.0));
    // Before detection and within the grace: the sides sum to the limit.
    let a = sim.admitted_rate(small, None, secs(2.0), secs(6.0));
    let b = sim.admitted_rate(big, None, secs(2.0), secs(6.0));
    assert!(a <= 0.4 * LIMIT * 1.05 && b <= 0.6 * LIMIT * 1.05, "small side {a:.0}, big side {b:.0}");
    assert!(a + b <= LIMIT * 1.05, "{a:.0} + {b:.0}");
    // After the grace the majority takes the whole limit; the minority keeps its 2/5.
    sim.run_for(secs(3.0));
    for &i in small {
        sim.set_view(i, small, big);
    }
    for &i in big {
        sim.set_view(i, big, small);
    }
    sim.run_for(secs(4.0));
    let a = sim.admitted_rate(small, None, secs(10.0), secs(13.0));
    let b = sim.admitted_rate(big, None, secs(10.0), secs(13.0));
    assert!(within(a, 0.4 * LIMIT, 0.05), "minority side {a:.0}");
    assert!(within(b, LIMIT, 0.05), "majority side {b:.0}");
    // Healed: back to one limit.
    sim.heal();
    let everyone: Vec<usize> = (0..5).collect();
    for i in 0..5 {
        sim.set_view(i, &everyone, &[]);
    }
    sim.run_for(secs(3.0));
    let all = sim.admitted_rate(&[], None, secs(14.0), secs(16.0));
    assert!(within(all, LIMIT, 0.05), "after the heal {all:.0}");
}

#[test]
fn a_noisy_caller_is_limited_without_touching_a_quiet_one() {
    let mut sim = Sim::new(SimConfig { per: Per::Header("x-user".into()), ..SimConfig::new(3, 100.0) });
    sim.set_flows(vec![
        Flow { node: 0, value: "noisy".into(), rate: 600.0 },
        Flow { node: 1, value: "noisy".into(), rate: 600.0 },
        Flow { node: 2, value: "quiet".into(), rate: 20.0 },
        Flow { node: 0, value: "quiet".into(), rate: 20.0 },
    ]);
    sim.run_for(secs(10.0));
    // From the first second on: every node has then heard from the key's owner.
    let (from, to) = (secs(1.0), secs(10.0));
    let noisy = sim.admitted_rate(&[], Some("noisy"), from, to);
    assert!(within(noisy, 100.0, 0.05), "noisy caller admitted {noisy:.1}/s for a limit of 100");
    let (quiet_in, quiet_ok) =
        (sim.offered_rate(&[], Some("quiet"), from, to), sim.admitted_rate(&[], Some("quiet"), from, to));
    assert_eq!(quiet_in, quiet_ok, "the quiet caller lost requests");
}

#[test]
fn a_joining_node_gets_a_share_and_the_sum_stays_at_the_limit() {
    let mut sim = Sim::new(SimConfig::new(4, LIMIT));
    let three = [0, 1, 2];
    for i in 0..4 {
        sim.set_view(i, if i == 3 { &[3] } else { &three }, &[]);
    }
    sim.set_load(2.0 * LIMIT, None);
    sim.run_for(secs(2.0));
    let all: Vec<usize> = (0..4).collect();
    for i in 0..4 {
        sim.set_view(i, &all, &[]);
    }
    sim.run_for(secs(3.0));
    let joined = sim.admitted_rate(&[3], None, secs(3.0), secs(5.0));
    let total = sim.admitted_rate(&[], None, secs(3.0), secs(5.0));
    assert!(within(joined, LIMIT / 4.0, 0.1), "the new node admits {joined:.0}");
    assert!(within(total, LIMIT, 0.05), "total {total:.0}");
}

#[test]
fn the_same_seed_replays_the_same_run() {
    assert_eq!(accuracy(10, false, 42), accuracy(10, false, 42));
}

#[test]
fn limiting_costs_each_node_little_bandwidth() {
    let mut sim = Sim::new(SimConfig::new(10, LIMIT));
    sim.set_load(2.0 * LIMIT, None);
    sim.run_for(secs(5.0));
    let bps = sim.bytes_per_node_second();
    assert!(bps > 0.0 && bps < 4000.0, "{bps:.0} B/s per node");
}

#[test]
fn a_heal_seen_at_different_times_does_not_grant_the_limit_twice() {
    let mut sim = Sim::new(SimConfig::new(5, LIMIT));
    sim.set_load(2.0 * LIMIT, None);
    let (small, big): (&[usize], &[usize]) = (&[0, 1], &[2, 3, 4]);
    sim.partition(&[small, big]);
    sim.run_for(secs(1.0));
    for &i in small {
        sim.set_view(i, small, big);
    }
    for &i in big {
        sim.set_view(i, big, small);
    }
    sim.run_for(secs(7.0)); // past the grace: the big side holds the whole limit
    for &i in big {
        sim.set_view(i, big, small);
    }
    sim.run_for(secs(1.0));
    // Healed, but the big side learns it 2 s before the small side does.
    sim.heal();
    let everyone: Vec<usize> = (0..5).collect();
    for &i in big {
        sim.set_view(i, &everyone, &[]);
    }
    sim.run_for(secs(2.0));
    for &i in small {
        sim.set_view(i, &everyone, &[]);
    }
    sim.run_for(secs(4.0));
    let worst = sim.max_window(secs(1.0), secs(9.0), secs(15.0));
    assert!(worst <= 1.1 * LIMIT, "a one-second window after the heal admitted {worst:.0}");
    let settled = sim.admitted_rate(&[], None, secs(13.0), secs(15.0));
    assert!(within(settled, LIMIT, 0.05), "settled at {settled:.0}");
}
