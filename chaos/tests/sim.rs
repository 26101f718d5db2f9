//! Membership at scale in virtual time: real foca cores, simulated network, seeded.

use std::time::Duration;

use trellis_chaos::sim::{Sim, SimConfig};
use trellis_node::membership::{MemberState, Profile};

fn converged(n: usize, seed: u64) -> Sim {
    let mut sim = Sim::new(SimConfig::new(n, Profile::Lan.timing(), seed));
    sim.join_all(0);
    let t = sim.run_until(Duration::from_secs(60), Sim::all_converged_alive).expect("cluster converges");
    println!("{n} nodes converged {t:?} after the last join");
    sim
}

#[test]
fn two_hundred_nodes_converge() {
    let sim = converged(200, 1);
    assert!(sim.all_converged_alive());
    assert_eq!(sim.false_downs(), 0);
}

#[test]
fn crashed_node_is_declared_down_by_all() {
    let mut sim = converged(200, 2);
    sim.reset_counters();
    sim.crash(77);
    let timing = Profile::Lan.timing();
    // Bound: found within a few probe rounds, plus the suspicion time, plus spreading.
    let bound = timing.probe_period * 8 + timing.suspect_to_down_after;
    let t = sim.run_until(bound, |s| s.fraction_knowing(77, MemberState::Down) == 1.0);
    println!("crash of 1 in 200 down everywhere after {t:?} (bound {bound:?})");
    assert!(
        t.is_some(),
        "not everyone saw the crash within {bound:?}: {:.3}",
        sim.fraction_knowing(77, MemberState::Down)
    );
    assert_eq!(sim.false_downs(), 0);
}

#[test]
fn ten_percent_loss_for_ten_minutes_declares_no_live_node_down() {
    let mut sim = converged(50, 3);
    sim.reset_counters();
    sim.set_loss(0.10);
    sim.run_for(Duration::from_secs(600));
    assert_eq!(sim.false_downs(), 0, "live nodes were declared down under 10% loss");
    sim.set_loss(0.0);
    assert!(sim.run_until(Duration::from_secs(10), Sim::all_converged_alive).is_some());
}

#[test]
fn partition_heals_and_views_reconverge() {
    let mut sim = converged(30, 4);
    let (a, b): (Vec<usize>, Vec<usize>) = (0..30).partition(|i| i % 3 == 0);
    sim.partition(&[a.clone(), b.clone()]);
    let t = sim.run_until(Duration::from_secs(60), |s| s.view(b[0], a[1]) == Some(MemberState::Down));
    assert!(t.is_some(), "the sides never saw each other as down");
    sim.heal();
    let t = sim.run_until(Duration::from_secs(180), Sim::all_converged_alive);
    println!("partition 10|20 healed; reconverged after {t:?}");
    assert!(t.is_some(), "views did not reconverge after the heal");
}

#[test]
fn restarted_node_is_alive_again_under_a_new_generation() {
    let mut sim = converged(20, 5);
    sim.crash(7);
    sim.run_until(Duration::from_secs(30), |s| s.fraction_knowing(7, MemberState::Down) == 1.0).unwrap();
    sim.restart(7, 0);
    let t = sim.run_until(Duration::from_secs(30), Sim::all_converged_alive);
    println!("restarted node alive everywhere after {t:?}");
    assert!(t.is_some());
}

#[test]
fn same_seed_replays_identically() {
    let run = |seed| {
        let mut sim = Sim::new(SimConfig { loss: 0.05, ..SimConfig::new(40, Profile::Lan.timing(), seed) });
        sim.join_all(0);
        let t = sim.run_until(Duration::from_secs(60), Sim::all_converged_alive);
        sim.crash(3);
        sim.run_for(Duration::from_secs(20));
        (t, sim.bytes_per_node_per_sec().to_bits(), sim.fraction_knowing(3, MemberState::Down).to_bits())
    };
    assert_eq!(run(9), run(9));
}
