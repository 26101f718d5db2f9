//! Small blocking HTTP/1.1 and TCP helpers for benchmarks and tests: a keep-alive client
//! connection (for holding many open), a keep-alive server, and a bulk-transfer sink.
//! Latency and throughput are measured by oha (`crate::oha`), not here.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// One keep-alive client connection that POSTs `body` (GETs when it is empty) and reads
/// the whole answer.
pub struct Conn {
    to: SocketAddr,
    host: String,
    stream: Option<BufReader<TcpStream>>,
    request: Vec<u8>,
}

impl Conn {
    pub fn new(to: SocketAddr, host: &str, body: &[u8]) -> Conn {
        // An empty body makes a GET, which static servers (nginx) answer.
        let mut request = if body.is_empty() {
            format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
        } else {
            format!("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes()
        };
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
