//! A paced DNS prober for latency: one query at a time at a fixed rate from one socket it
//! polls, on a core of its own; an answer late enough to hold up the next query is charged
//! from that query's due time, as oha's `--latency-correction` does. Nothing runs between
//! its send and its receive but the kernel, where dnsperf's threads add their own wake-ups
//! whatever the server. Its floor is measured in the same run against a bare UDP echo
//! ([`echo`]).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

/// What one paced run saw: latencies in µs (sorted) and queries without an answer.
pub struct Probe {
    pub lat_us: Vec<f64>,
    pub lost: u64,
}

impl Probe {
    /// The `q` quantile, µs.
    pub fn pct(&self, q: f64) -> f64 {
        quantile(&self.lat_us, q)
    }
}

/// The `q` quantile of `sorted` (NaN when empty).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

/// The median of the turns' `figure`.
pub fn median<T>(turns: &[T], figure: impl Fn(&T) -> f64) -> f64 {
    let mut v: Vec<f64> = turns.iter().map(figure).collect();
    v.sort_by(f64::total_cmp);
    quantile(&v, 0.5)
}

/// Asks `to` for `name` A at `rate` queries per second for `secs`, from a thread pinned
/// to `core`.
pub fn run(to: SocketAddr, name: &str, rate: u64, secs: u64, core: u32) -> anyhow::Result<Probe> {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let template = q.to_vec()?;
    std::thread::scope(|s| s.spawn(|| paced(to, &template, rate, secs, core)).join().expect("probe thread"))
}

fn paced(to: SocketAddr, template: &[u8], rate: u64, secs: u64, core: u32) -> anyhow::Result<Probe> {
    pin_this_thread(core)?;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(to)?;
    // Polled, not blocked on: a sleeping receiver adds a wake-up of its own (tens of µs
    // on this VM) to every answer, which is the probe's cost, not the server's.
    sock.set_nonblocking(true)?;
    let (gap, n) = (Duration::from_secs_f64(1.0 / rate.max(1) as f64), rate * secs);
    let (mut query, mut buf) = (template.to_vec(), [0u8; 1500]);
    let mut out = Probe { lat_us: Vec::with_capacity(n as usize), lost: 0 };
    let (t0, mut free_at) = (Instant::now(), Instant::now());
    for i in 0..n {
        let due = t0 + gap * i as u32;
        wait_until(due);
        // Timed from the send, unless the previous answer came after this query was due:
        // then from the due time, so a slow server pays for the queries it held up.
        let sent = Instant::now();
        let from = if free_at > due { due } else { sent };
        let id = (i as u16).to_be_bytes();
        query[..2].copy_from_slice(&id);
        sock.send(&query)?;
        loop {
            match sock.recv(&mut buf) {
                Ok(len) if len >= 2 && buf[..2] == id => {
                    free_at = Instant::now();
                    out.lat_us.push((free_at - from).as_secs_f64() * 1e6);
                    break;
                }
                Ok(_) => continue, // a late answer to an earlier query
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && sent.elapsed() < LOST_AFTER => {
                    std::hint::spin_loop()
                }
                Err(_) => {
                    out.lost += 1;
                    free_at = Instant::now();
                    break;
                }
            }
        }
    }
    out.lat_us.sort_by(f64::total_cmp);
    Ok(out)
}

/// An answer later than this is counted lost.
const LOST_AFTER: Duration = Duration::from_millis(200);

/// Sleeps to within 200 µs of `due` (timer slack is about 50 µs), then spins.
fn wait_until(due: Instant) {
    if let Some(left) = due.checked_duration_since(Instant::now()) {
        if left > Duration::from_micros(200) {
            std::thread::sleep(left - Duration::from_micros(200));
        }
    }
    while Instant::now() < due {
        std::hint::spin_loop();
    }
}

/// Pins the calling thread (by its thread id, from `/proc/thread-self`) to `core`.
fn pin_this_thread(core: u32) -> anyhow::Result<()> {
    let link = std::fs::read_link("/proc/thread-self")?;
    let tid = link.file_name().and_then(|t| t.to_str()).and_then(|t| t.parse().ok());
    pin(tid.ok_or_else(|| anyhow::anyhow!("no thread id"))?, core, false)
}

/// Pins `id` to `core` with taskset: a thread, or with `all_threads` a process and every
/// thread it has.
pub fn pin(id: u32, core: u32, all_threads: bool) -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new("taskset");
    if all_threads {
        cmd.arg("-a");
    }
    let ok = cmd.args(["-cp", &core.to_string(), &id.to_string()]).stdout(std::process::Stdio::null()).status()?;
    anyhow::ensure!(ok.success(), "taskset could not pin {id} to core {core}");
    Ok(())
}

/// A bare UDP echo on loopback, on a thread pinned to `core`: the probe's floor (kernel
/// and its own code) with no server work at all. Runs until the process ends.
pub fn echo(core: u32) -> anyhow::Result<SocketAddr> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let addr = sock.local_addr()?;
    std::thread::spawn(move || {
        let _ = pin_this_thread(core);
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_medians_read_the_sorted_figures() {
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.5), 3.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.99), 4.0, "rounded down, as dnsperf's figures were");
        assert!(quantile(&[], 0.5).is_nan());
        assert_eq!(median(&[30.0, 10.0, 20.0], |x| *x), 20.0, "unsorted turns");
    }
}
