//! Smoke test of the cluster harness against the real agent: 3 nodes, then every fault once.
//! `cargo run -p trellis-chaos --example smoke`

use std::time::{Duration, Instant};

use trellis_chaos::cluster::{try_trellis_bin, Cluster, ClusterSpec};

fn main() -> anyhow::Result<()> {
    println!("binary: {}", try_trellis_bin()?.display());
    let t = Instant::now();
    let mut c = Cluster::start(ClusterSpec { nodes: 3, ..Default::default() })?;
    println!("3 agents answering after {:?}", t.elapsed());
    for n in c.nodes() {
        println!("  {} peer {} api {} pid {:?}", n.name, n.peer_addr, n.api_addr, n.pid());
    }
    let all = [0, 1, 2];
    let alive = |c: &Cluster, idx: &[usize]| -> Vec<(String, &'static str)> {
        idx.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect()
    };
    let took = c.wait_all_see(&all, &alive(&c, &all), Duration::from_secs(15))?;
    println!("all see all alive after {took:?}");
    println!("GET /v1/members on n0:\n{}", serde_json::to_string_pretty(&c.node(0).api().members()?)?);
    println!("GET /v1/agent/self on n1: {}", c.node(1).api().get_json("/v1/agent/self")?);

    c.kill(2);
    let took = c.wait_all_see(&[0, 1], &[("n2".into(), "down")], Duration::from_secs(10))?;
    println!("kill -9 n2: down everywhere after {took:?}");
    c.restart(2)?;
    let took = c.wait_all_see(&all, &alive(&c, &all), Duration::from_secs(15))?;
    println!("restart n2: alive everywhere after {took:?}");

    c.pause(1);
    let paused_api = c.node(1).api().get_json("/v1/health");
    println!("pause n1: its API answers {:?}", paused_api.map_err(|e| e.to_string()));
    let took = c.wait_all_see(&[0, 2], &[("n1".into(), "down")], Duration::from_secs(10));
    println!("paused n1 seen down: {took:?}");
    c.resume(1);
    let took = c.wait_all_see(&all, &alive(&c, &all), Duration::from_secs(15));
    println!("resume n1: alive everywhere: {took:?}");

    let seed = c.node(0).peer_addr;
    let extra = c.add_node("extra", &[seed])?;
    let took = c.wait_all_see(&all, &[("extra".into(), "alive")], Duration::from_secs(15))?;
    println!("add_node extra (index {extra}): alive everywhere after {took:?}");

    let t = Instant::now();
    c.stop(extra);
    println!("stop extra: exited after {:?}, running {}", t.elapsed(), c.node(extra).is_running());
    let took = c.wait_all_see(&all, &[("extra".into(), "left")], Duration::from_secs(10))?;
    println!("extra seen as left after {took:?}");
    println!("last log lines of n0:\n{}", c.log_tail(0, 5));
    drop(c);

    // Another seed, labels, and a peer from a foreign CA.
    let labels = vec![vec![], vec![("zone".to_string(), "b".to_string())]];
    let mut c = Cluster::start(ClusterSpec { nodes: 2, seed_index: 1, labels, ..Default::default() })?;
    c.wait_all_see(&[0, 1], &alive(&c, &[0, 1]), Duration::from_secs(15))?;
    let n1 = c.node(0).api().members()?.into_iter().find(|m| m["name"] == "n1").unwrap();
    println!("seed n1, labels as n0 sees them: {}", n1["labels"]);
    let rogue_ca = c.new_ca_dir();
    let rogue_tls = rogue_ca.parent().unwrap().join("rogue-tls");
    let out = std::process::Command::new(try_trellis_bin()?)
        .args(["cert", "issue", "--ca-dir", rogue_ca.to_str().unwrap(), "--name", "rogue", "--out"])
        .arg(&rogue_tls)
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seed = c.node(1).peer_addr;
    let rogue = c.add_node_with_tls("rogue", rogue_tls, &[seed])?;
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "rogue lists {} member(s), n0 lists {}",
        c.node(rogue).api().members()?.len(),
        c.node(0).api().members()?.len()
    );
    drop(c);

    // An agent that cannot start fails fast, naming itself and quoting its log.
    let t = Instant::now();
    let bad = ClusterSpec { nodes: 1, extra_args: vec!["--no-such-flag".into()], ..Default::default() };
    match Cluster::start(bad) {
        Ok(_) => anyhow::bail!("an agent with a bad flag started"),
        Err(e) => println!("bad flag refused after {:?}:\n{e:#}", t.elapsed()),
    }
    Ok(())
}
