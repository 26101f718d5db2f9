//! Cluster-wide rate limits on real agents: three processes, each with its own proxy
//! listener, load spread unevenly, limits held across the cluster.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use trellis_chaos::cluster::{Cluster, ClusterSpec};
use trellis_tests::{http, metric};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Three agents, each with a proxy listener, `web` instances on the nodes in `instances`,
/// and `limit` set on node 0 and seen by all. Returns the cluster and the proxies.
fn limited_mesh(limit: serde_json::Value, instances: &[usize]) -> (Cluster, Vec<SocketAddr>) {
    let proxies: Vec<SocketAddr> = (0..3).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
    let node_args = proxies.iter().map(|p| vec!["--proxy".to_string(), p.to_string()]).collect();
    let c = Cluster::start(ClusterSpec { nodes: 3, node_args, ..Default::default() }).unwrap();
    let all = [0, 1, 2];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
    for &i in instances {
        let srv = http::server("ok");
        let body = json!({"service": "web", "address": "127.0.0.1", "port": srv.port()});
        let (s, v) = c.node(i).api().put_json(&format!("/v1/agent/services/web-{i}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = c.node(0).api().put_json("/v1/policy/ratelimits/web", &limit).unwrap();
    assert_eq!(s, 200, "{v}");
    c.wait_until(Duration::from_secs(10), "every node enforces the limit and sees the instances", || {
        all.iter()
            .all(|&i| {
                let api = c.node(i).api();
                let limits = api.get_json("/v1/ratelimits").ok();
                let web = api.get_json("/v1/catalog/services/web").ok();
                limits.is_some_and(|l| l.as_array().is_some_and(|a| a.len() == 1))
                    && web.is_some_and(|w| w.as_array().is_some_and(|a| a.len() == instances.len()))
            })
            .then_some(())
    })
    .unwrap();
    (c, proxies)
}

/// One paced request stream: `rate` requests per second to `proxy` for `dur`.
struct Stream {
    proxy: SocketAddr,
    rate: f64,
    header: Option<(&'static str, &'static str)>,
}

/// (start offset, status) of every request, per stream. Open loop: each request leaves at
/// its slot, or at once when the stream is behind.
fn run_load(streams: &[Stream], dur: Duration) -> Vec<Vec<(Duration, u16)>> {
    let t0 = Instant::now();
    let results = Arc::new(Mutex::new(vec![Vec::new(); streams.len()]));
    std::thread::scope(|scope| {
        for (i, s) in streams.iter().enumerate() {
            // Two workers per stream, each taking every other slot, so one slow reply does
            // not hold the stream back.
            for w in 0..2u32 {
                let results = results.clone();
                scope.spawn(move || {
                    let gap = Duration::from_secs_f64(2.0 / s.rate);
                    let mut slot = t0 + gap * w / 2;
                    while slot < t0 + dur {
                        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let headers: Vec<(&str, &str)> = s.header.into_iter().collect();
                        let at = slot - t0;
                        let r = http::get(s.proxy, "web", "/", &headers);
                        results.lock().unwrap()[i].push((at, r.status));
                        slot += gap;
                    }
                });
            }
        }
    });
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

fn count(results: &[Vec<(Duration, u16)>], streams: &[usize], status: u16, from: f64, to: f64) -> usize {
    let (from, to) = (Duration::from_secs_f64(from), Duration::from_secs_f64(to));
    streams.iter().flat_map(|i| &results[*i]).filter(|(at, s)| *s == status && *at >= from && *at < to).count()
}

#[test]
fn uneven_load_over_three_nodes_is_held_to_the_cluster_wide_limit() {
    let (c, p) = limited_mesh(json!({"service": "web", "requests_per_second": 100}), &[0, 1, 2]);
    // Twice the limit in all, 60% of it on node 0, 30% on node 1, 10% on node 2.
    let streams = [
        Stream { proxy: p[0], rate: 120.0, header: None },
        Stream { proxy: p[1], rate: 60.0, header: None },
        Stream { proxy: p[2], rate: 20.0, header: None },
    ];
    let results = run_load(&streams, Duration::from_secs(12));
    let ok = count(&results, &[0, 1, 2], 200, 2.0, 12.0) as f64 / 10.0;
    let refused = count(&results, &[0, 1, 2], 429, 2.0, 12.0) as f64 / 10.0;
    let failed: usize = results.iter().flatten().filter(|(_, s)| *s != 200 && *s != 429).count();
    let per_node: Vec<f64> = (0..3).map(|i| count(&results, &[i], 200, 2.0, 12.0) as f64 / 10.0).collect();
    println!("admitted {ok:.1}/s (per node {per_node:?}), refused {refused:.1}/s, other {failed}");
    assert_eq!(failed, 0, "requests failed other than by the limit");
    assert!((90.0..=110.0).contains(&ok), "cluster-wide admitted {ok:.1}/s for a limit of 100/s");
    // Node 2 asks for less than an even third: max-min fairness serves nearly all of it.
    assert!(per_node[2] >= 15.0, "the light node was starved: {per_node:?}");

    let r = http::get(p[0], "web", "/", &[]);
    let r = if r.status == 429 {
        r
    } else {
        (0..50).map(|_| http::get(p[0], "web", "/", &[])).find(|r| r.status == 429).unwrap()
    };
    assert_eq!(r.header("ratelimit-limit"), Some("100"));
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)), "{}", r.headers);
    assert_eq!(r.header("x-trellis-reason"), Some("rate_limited"));

    let view = c.node(1).api().get_json("/v1/ratelimits/web").unwrap();
    let key = &view["keys"][0];
    let owner = key["owner"].as_str().unwrap().to_string();
    let owner_i = (0..3).find(|&i| c.node(i).name == owner).unwrap();
    let owner_view = c.node(owner_i).api().get_json("/v1/ratelimits/web").unwrap();
    assert_eq!(owner_view["keys"][0]["nodes"].as_array().map(Vec::len), Some(3), "{owner_view}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_ratelimit_refused_total{limit=\"web\"}").unwrap() > 0.0, "{m}");
    assert!(metric(&m, "trellis_ratelimit_bytes_out_total").unwrap() > 0.0);
    // The CLI shows the same, one line per limit key.
    let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["ratelimits", "--http-addr", &c.node(owner_i).api_addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let row = text.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("web") && row.contains(&owner), "{text}");
}

#[test]
fn a_noisy_caller_is_limited_and_a_quiet_one_is_not() {
    let (_c, p) =
        limited_mesh(json!({"service": "web", "requests_per_second": 20, "per": "header:x-user"}), &[0, 1, 2]);
    let streams = [
        Stream { proxy: p[0], rate: 50.0, header: Some(("x-user", "noisy")) },
        Stream { proxy: p[1], rate: 30.0, header: Some(("x-user", "noisy")) },
        Stream { proxy: p[2], rate: 8.0, header: Some(("x-user", "quiet")) },
    ];
    let results = run_load(&streams, Duration::from_secs(8));
    let noisy = count(&results, &[0, 1], 200, 2.0, 8.0) as f64 / 6.0;
    let quiet_refused = count(&results, &[2], 429, 0.0, 8.0);
    println!("noisy admitted {noisy:.1}/s; quiet refused {quiet_refused}");
    assert!((16.0..=24.0).contains(&noisy), "noisy caller admitted {noisy:.1}/s for a limit of 20/s");
    assert_eq!(quiet_refused, 0, "the quiet caller was limited");
}

#[test]
fn a_killed_nodes_share_goes_to_the_survivors_within_detection_plus_grace() {
    // Instances only on the survivors: this test is about the limit, not about forwarding
    // around a dead instance (mesh.rs covers that).
    let (mut c, p) = limited_mesh(json!({"service": "web", "requests_per_second": 60}), &[0, 1]);
    let streams: Vec<Stream> = p.iter().map(|&proxy| Stream { proxy, rate: 40.0, header: None }).collect();
    let kill_at = Duration::from_secs(4);
    let results = std::thread::scope(|s| {
        let load = s.spawn(|| run_load(&streams, Duration::from_secs(18)));
        std::thread::sleep(kill_at);
        c.kill(2);
        load.join().unwrap()
    });
    let before = count(&results, &[0, 1, 2], 200, 1.0, 4.0) as f64 / 3.0;
    // Bound: failure detection (fast profile, about 2 s) + the 5 s down grace + a tick.
    let after = count(&results, &[0, 1], 200, 12.0, 18.0) as f64 / 6.0;
    println!("admitted before the kill {before:.1}/s, survivors after detection + grace {after:.1}/s");
    let by_second: Vec<usize> = (0..18).map(|t| count(&results, &[0, 1], 200, t as f64, t as f64 + 1.0)).collect();
    println!("survivors admitted per second: {by_second:?}");
    assert!((54.0..=66.0).contains(&before), "before: {before:.1}/s for a limit of 60/s");
    assert!((54.0..=66.0).contains(&after), "after: {after:.1}/s for a limit of 60/s");
}

/// Drops all peer traffic between node `i` and `peers` (empty heals).
fn block(c: &Cluster, i: usize, peers: &[usize]) {
    let addrs: Vec<String> = peers.iter().map(|&p| c.node(p).peer_addr.to_string()).collect();
    let (s, body) = c.node(i).api().post_json("/v1/fault", &json!({ "block": addrs })).unwrap();
    assert_eq!(s, 200, "{body}");
}

#[test]
fn a_two_three_partition_keeps_each_side_within_its_documented_share() {
    let proxies: Vec<SocketAddr> = (0..5).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
    let node_args = proxies.iter().map(|p| vec!["--proxy".to_string(), p.to_string()]).collect();
    let extra_args = vec!["--fault-injection".to_string()];
    let c = Cluster::start(ClusterSpec { nodes: 5, node_args, extra_args, ..Default::default() }).unwrap();
    let all: Vec<usize> = (0..5).collect();
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
    let (s, v) = c
        .node(0)
        .api()
        .put_json("/v1/policy/ratelimits/web", &json!({"service": "web", "requests_per_second": 100}))
        .unwrap();
    assert_eq!(s, 200, "{v}");
    c.wait_until(Duration::from_secs(10), "every node enforces the limit", || {
        all.iter()
            .all(|&i| {
                c.node(i).api().get_json("/v1/ratelimits").ok().and_then(|l| l.as_array().map(Vec::len)) == Some(1)
            })
            .then_some(())
    })
    .unwrap();
    // No instances: an admitted request gets 503 (no instance) at once, a refused one 429,
    // so the load never waits on forwarding through the partition.
    let streams: Vec<Stream> = proxies.iter().map(|&proxy| Stream { proxy, rate: 40.0, header: None }).collect();
    let (small, big) = ([0, 1], [2, 3, 4]);
    // Load for 34 s: partition at 4 s, heal at 18 s, then at least 3 s measured once
    // membership is whole again (within 12 s of the heal).
    const LOAD: u32 = 34;
    let start = std::time::Instant::now();
    let (results, healed_at, whole_at) = std::thread::scope(|s| {
        let load = s.spawn(|| run_load(&streams, Duration::from_secs(LOAD.into())));
        std::thread::sleep(Duration::from_secs(4));
        for i in small {
            block(&c, i, &big);
        }
        for i in big {
            block(&c, i, &small);
        }
        std::thread::sleep(Duration::from_secs(14));
        for i in all.iter().copied() {
            block(&c, i, &[]);
        }
        let healed_at = start.elapsed().as_secs_f64();
        c.wait_all_see(&all, &alive, Duration::from_secs(12)).expect("membership whole again after the heal");
        let whole_at = start.elapsed().as_secs_f64();
        (load.join().unwrap(), healed_at, whole_at)
    });
    println!("membership whole {:.1} s after the heal", whole_at - healed_at);
    let rate = |nodes: &[usize], from: f64, to: f64| count(&results, nodes, 503, from, to) as f64 / (to - from);
    let other: usize = results.iter().flatten().filter(|(_, s)| *s != 503 && *s != 429).count();
    let by_second: Vec<(usize, usize)> = (0..LOAD)
        .map(|t| {
            (
                count(&results, &small, 503, t as f64, t as f64 + 1.0),
                count(&results, &big, 503, t as f64, t as f64 + 1.0),
            )
        })
        .collect();
    println!("admitted per second (small side, big side): {by_second:?}");
    assert_eq!(other, 0, "statuses other than 503 and 429");
    let whole = rate(&all, 1.0, 4.0);
    assert!((90.0..=110.0).contains(&whole), "before the partition: {whole:.1}/s");
    // Until detection plus the 5 s grace, the sides sum to the limit: 2/5 and 3/5.
    let (a, b) = (rate(&small, 4.5, 9.0), rate(&big, 4.5, 9.0));
    assert!(a <= 44.0 && b <= 66.0 && a + b <= 110.0, "within the grace: small {a:.1}/s, big {b:.1}/s");
    // After it, the majority side takes the whole limit; the minority keeps its 2/5.
    let (a, b) = (rate(&small, 12.0, 18.0), rate(&big, 12.0, 18.0));
    assert!((36.0..=44.0).contains(&a), "minority side after the grace: {a:.1}/s (documented: 40)");
    assert!((90.0..=110.0).contains(&b), "majority side after the grace: {b:.1}/s (documented: 100)");
    // Healed: one limit again, from a second after every node sees every other (membership's
    // heal is its own test: chaos/tests/sim.rs), for as long as the load ran on.
    let (from, to) = (whole_at + 1.0, f64::from(LOAD));
    assert!(to - from >= 3.0, "membership took {:.1} s to heal", whole_at - healed_at);
    let healed = rate(&all, from, to);
    if !(90.0..=110.0).contains(&healed) {
        for i in all.iter().copied() {
            let api = c.node(i).api();
            let members = api.get_json("/v1/members").unwrap_or_default();
            let states: Vec<String> = members
                .as_array()
                .map(|a| a.iter().map(|m| format!("{}={}", m["name"], m["state"])).collect())
                .unwrap_or_default();
            println!("node {i} sees {states:?}; limit view {}", api.get_json("/v1/ratelimits/web").unwrap_or_default());
        }
    }
    assert!((90.0..=110.0).contains(&healed), "after the heal: {healed:.1}/s");
}

/// Delay mode shapes instead of refusing: requests over the rate wait for their token, at
/// most `max_delay`, so the admitted rate is the limit and no admitted request waited
/// longer than that; past it, 429.
#[test]
fn delay_mode_keeps_the_admitted_rate_and_the_wait_within_max_delay() {
    let limit = json!({"service": "web", "requests_per_second": 20, "burst": 4, "mode": "delay", "max_delay": "500ms"});
    let (c, p) = limited_mesh(limit, &[0]);
    let proxy = p[0];
    // Twelve closed-loop clients on node 0 for 6 s: far over 20/s.
    let t0 = Instant::now();
    let results: Vec<(Duration, Duration, u16)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..12)
            .map(|_| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    while t0.elapsed() < Duration::from_secs(6) {
                        let start = Instant::now();
                        let r = http::get(proxy, "web", "/", &[]);
                        out.push((start - t0, start.elapsed(), r.status));
                        if r.status == 429 {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    out
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let in_window =
        |status: u16| results.iter().filter(|(at, _, s)| *s == status && *at >= Duration::from_secs(2)).count();
    let admitted_per_s = in_window(200) as f64 / 4.0;
    let waited: Vec<Duration> = results.iter().filter(|(_, _, s)| *s == 200).map(|(_, took, _)| *took).collect();
    let longest = waited.iter().max().copied().unwrap_or_default();
    let shaped = waited.iter().filter(|t| **t >= Duration::from_millis(100)).count();
    println!(
        "admitted {admitted_per_s:.1}/s, refused {} in the window, {shaped} admitted after a wait, longest {longest:?}",
        in_window(429)
    );
    assert!((16.0..=24.0).contains(&admitted_per_s), "admitted {admitted_per_s:.1}/s for a limit of 20/s");
    assert!(shaped > 20, "requests over the rate wait for a token rather than being refused at once");
    assert!(in_window(429) > 0, "past max_delay, requests are refused");
    // max_delay, plus what a debug build on a busy 2-core machine adds to a request.
    assert!(longest <= Duration::from_millis(500 + 400), "an admitted request waited {longest:?}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_ratelimit_delayed_total{limit=\"web\"}").unwrap() > 20.0);
}
