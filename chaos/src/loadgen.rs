//! A fixed-rate HTTP/1.1 load generator over keep-alive connections, corrected for
//! coordinated omission: request k is due at `k / rate`, and its latency counts from
//! then, so a stall shows in the tail instead of silently delaying later requests.
//! Latencies go into an HdrHistogram (1 µs to 60 s, 3 significant digits).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// One keep-alive client connection that POSTs `body` and reads the whole answer.
pub struct Conn {
    to: SocketAddr,
    host: String,
    stream: Option<BufReader<TcpStream>>,
    request: Vec<u8>,
}

impl Conn {
    pub fn new(to: SocketAddr, host: &str, body: &[u8]) -> Conn {
        let mut request =
            format!("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        request.extend_from_slice(body);
        Conn { to, host: host.into(), stream: None, request }
    }

    /// Sends one request; Ok(body length) on a 200. A failed connection is dropped and
    /// the next call opens a new one.
    pub fn call(&mut self) -> std::io::Result<usize> {
        let r = self.try_call();
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    /// Opens the connection now (for holding many open at once).
    pub fn connect(&mut self) -> std::io::Result<()> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.to)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.stream = Some(BufReader::new(s));
        }
        Ok(())
    }

    fn try_call(&mut self) -> std::io::Result<usize> {
        self.connect()?;
        let s = self.stream.as_mut().expect("connected above");
        s.get_mut().write_all(&self.request)?;
        let (status, len) = read_head(s)?;
        let mut body = vec![0; len];
        s.read_exact(&mut body)?;
        if status != 200 {
            return Err(std::io::Error::other(format!("status {status} from {} ({})", self.to, self.host)));
        }
        Ok(len)
    }
}

/// Reads a request or response head; returns the status code (0 for a request) and the
/// Content-Length.
fn read_head(s: &mut BufReader<TcpStream>) -> std::io::Result<(u16, usize)> {
    let mut line = String::new();
    let (mut status, mut len, mut first) = (0, 0, true);
    loop {
        line.clear();
        if s.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok((status, len));
        }
        if first {
            first = false;
            if l.starts_with("HTTP/") {
                status = l.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            }
        } else if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
}

/// A keep-alive HTTP/1.1 server on `ip`: reads each request and its body, answers 200
/// with `reply` bytes; a thread per connection.
pub fn serve_keepalive(ip: &str, reply: usize) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).expect("bind the bench server");
    let addr = l.local_addr().expect("local addr");
    let mut head = format!("HTTP/1.1 200 OK\r\nContent-Length: {reply}\r\n\r\n").into_bytes();
    head.extend(std::iter::repeat_n(b'x', reply));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let _ = s.set_nodelay(true);
            let answer = head.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s);
                while let Ok((_, len)) = read_head(&mut r) {
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() || r.get_mut().write_all(&answer).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// What a fixed-rate run saw.
pub struct RateRun {
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub sent: u64,
    pub took: Duration,
}

impl RateRun {
    /// Adds another run of the same path: its latencies, errors and time.
    pub fn merge(&mut self, other: &RateRun) {
        self.hist.add(&other.hist).expect("same bounds");
        self.errors += other.errors;
        self.sent += other.sent;
        self.took += other.took;
    }

    /// A latency quantile in microseconds.
    pub fn us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64
    }
}

/// `rate` requests per second for `secs` over `conns` keep-alive connections (each
/// takes every `conns`-th due time, so a slow answer delays that connection's next
/// requests, and their latency counts the delay).
pub fn fixed_rate(to: SocketAddr, host: &str, body: &[u8], rate: f64, secs: f64, conns: usize) -> RateRun {
    let total = (rate * secs) as u64;
    let errors = AtomicU64::new(0);
    let t0 = Instant::now() + Duration::from_millis(100);
    let hists: Vec<Histogram<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..conns as u64)
            .map(|c| {
                let errors = &errors;
                s.spawn(move || {
                    let mut conn = Conn::new(to, host, body);
                    let _ = conn.connect();
                    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                    let mut k = c;
                    while k < total {
                        let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        if conn.call().is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = h.record(due.elapsed().as_micros().max(1) as u64);
                        k += conns as u64;
                    }
                    h
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("load thread")).collect()
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    for h in &hists {
        hist.add(h).expect("same bounds");
    }
    RateRun { hist, errors: errors.into_inner(), sent: total, took: t0.elapsed() }
}

/// Requests per second `conns` connections complete back to back for `secs`.
pub fn closed_loop(to: SocketAddr, host: &str, body: &[u8], secs: f64, conns: usize) -> (f64, u64) {
    let done = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for _ in 0..conns {
            s.spawn(|| {
                let mut conn = Conn::new(to, host, body);
                while Instant::now() < end {
                    match conn.call() {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    (done.into_inner() as f64 / secs, errors.into_inner())
}

/// A server on `ip` that reads each connection to its end and answers with the byte
/// count (8 bytes, big-endian): the far end of a bulk transfer.
pub fn serve_sink(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).expect("bind the sink");
    let addr = l.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0; 256 * 1024];
                let mut n = 0u64;
                while let Ok(k @ 1..) = s.read(&mut buf) {
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes());
            });
        }
    });
    addr
}

/// Sends `bytes` to a sink through `to`; the rate in MiB/s, once the sink has counted
/// every byte.
pub fn bulk(to: SocketAddr, bytes: u64) -> std::io::Result<f64> {
    let start = Instant::now();
    let mut s = TcpStream::connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let chunk = vec![7u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut got = [0u8; 8];
    s.read_exact(&mut got)?;
    let counted = u64::from_be_bytes(got);
    if counted != bytes {
        return Err(std::io::Error::other(format!("sink counted {counted} of {bytes} bytes")));
    }
    Ok(bytes as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
}
