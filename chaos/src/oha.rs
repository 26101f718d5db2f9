//! The benchmark's load generator: oha, an open-loop HTTP generator that corrects for
//! coordinated omission (`--latency-correction`: latency counts from when a request was
//! due, not from when a busy connection got round to it). One binary for every path, so
//! the paths differ only in what stands between oha and nginx.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The version `chaos/bench-mesh.sh` installs.
pub const VERSION: &str = "1.16.0";

/// One oha run: `rate` requests per second (None: as fast as the connections go) over
/// `conns` keep-alive connections for `secs`.
pub struct Load<'a> {
    pub to: SocketAddr,
    pub host: &'a str,
    pub rate: Option<f64>,
    pub conns: usize,
    pub secs: f64,
    /// A header every request carries (`name: value`).
    pub header: Option<&'a str>,
}

/// What one run saw. Latencies in microseconds.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub rps: f64,
    pub ok: u64,
    pub errors: u64,
    /// CPU seconds oha itself used (a generator near a full core is measuring itself).
    pub generator_cpu: f64,
}

/// The oha binary: `$OHA`, else the one the bench script installs, else `PATH`'s.
pub fn find() -> anyhow::Result<PathBuf> {
    let candidates = [std::env::var_os("OHA").map(PathBuf::from), Some(PathBuf::from("target/tools/bin/oha"))];
    let found = candidates.into_iter().flatten().find(|p| p.exists()).unwrap_or_else(|| PathBuf::from("oha"));
    let out = Command::new(&found).arg("--version").output();
    match out {
        Ok(o) if o.status.success() => Ok(found),
        _ => anyhow::bail!(
            "oha not found: `cargo install oha --version {VERSION} --locked --root target/tools` \
             (chaos/bench-mesh.sh does it) or set OHA=/path/to/oha"
        ),
    }
}

/// Runs oha once and reads its JSON summary.
pub fn run(bin: &std::path::Path, l: &Load) -> anyhow::Result<Seen> {
    let mut cmd = Command::new(bin);
    cmd.args(["--no-tui", "--output-format", "json", "-w", "--host", l.host]).args([
        "-c",
        &l.conns.to_string(),
        "-z",
        &format!("{}ms", (l.secs * 1000.0) as u64),
    ]);
    if let Some(rate) = l.rate {
        cmd.args(["-q", &rate.to_string(), "--latency-correction"]);
    }
    if let Some(h) = l.header {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("http://{}/", l.to));
    let (out, generator_cpu) = output_and_cpu(cmd)?;
    anyhow::ensure!(out.status.success(), "oha failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1e6;
    let count = |field: &str, keep: &dyn Fn(&str) -> bool| -> u64 {
        v[field].as_object().map_or(0, |m| m.iter().filter(|(k, _)| keep(k)).filter_map(|(_, n)| n.as_u64()).sum())
    };
    Ok(Seen {
        p50: pct("p50"),
        p99: pct("p99"),
        p999: pct("p99.9"),
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        ok: count("statusCodeDistribution", &|k| k == "200"),
        errors: count("statusCodeDistribution", &|k| k != "200") + count("errorDistribution", &|_| true),
        generator_cpu,
    })
}

/// Runs `cmd` to its end; its output and the CPU seconds it used, read from /proc while it
/// is a zombie (exited, not yet reaped), when its times are final.
fn output_and_cpu(mut cmd: Command) -> anyhow::Result<(std::process::Output, f64)> {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    child.stdout.take().expect("piped").read_to_end(&mut stdout)?;
    child.stderr.take().expect("piped").read_to_end(&mut stderr)?;
    let mut cpu = 0.0;
    for _ in 0..200 {
        match crate::procs::stat(child.id()) {
            Some(s) if s.zombie => {
                cpu = s.cpu_secs;
                break;
            }
            Some(s) => cpu = s.cpu_secs,
            None => break,
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let status = child.wait()?;
    Ok((std::process::Output { status, stdout, stderr }, cpu))
}
