//! The short chaos suite CI runs: real agents, traffic and faults, every invariant checked.

use trellis_chaos::runner::{run, summary, Scenario};

/// One scenario at a time: they measure timing-sensitive things (membership convergence,
/// success rates) on a small machine, and four clusters at once would measure the machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn scenario(name: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(format!("{name}.toml"));
    let s = Scenario::load(&path).unwrap();
    let out = std::env::temp_dir().join(format!("trellis-chaos-{}-{name}", std::process::id()));
    let report = run(&s, 42, &out).unwrap();
    assert!(report.passed(), "{}", summary(&report));
    assert!(out.join("report.json").exists() && out.join("timeline.svg").exists());
    assert!(report.requests > 100, "too little traffic to judge: {}", report.requests);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn crash_and_restart_keeps_every_invariant() {
    scenario("crash");
}

#[test]
fn partition_and_heal_keeps_every_invariant() {
    scenario("partition-and-heal");
}

#[test]
fn asymmetric_partition_keeps_every_invariant() {
    scenario("asymmetric-partition");
}

#[test]
fn short_random_faults_keep_every_invariant() {
    scenario("short-random");
}
