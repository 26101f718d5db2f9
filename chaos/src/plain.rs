//! Plain HTTP/1.1 over std sockets, one connection per request, for the harness's test
//! servers and load generators (and the integration tests'): small enough to read, and no
//! client library between the measurement and the wire.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Reads a request or response head (up to the blank line); None when the peer closed first.
pub fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// The path of a request head.
pub fn path_of(head: &str) -> &str {
    head.split_whitespace().nth(1).unwrap_or("")
}

/// Writes a whole response and closes.
pub fn respond(s: &mut TcpStream, status: u16, body: &[u8]) {
    let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

/// A server on 127.0.0.1 answering each request with `handler(head)`; a thread per
/// connection.
pub fn serve(handler: impl Fn(&str) -> (u16, Vec<u8>) + Send + Sync + 'static) -> SocketAddr {
    serve_at(std::net::Ipv4Addr::LOCALHOST, handler)
}

/// [`serve`] on a port of `ip`.
pub fn serve_at(
    ip: std::net::Ipv4Addr,
    handler: impl Fn(&str) -> (u16, Vec<u8>) + Send + Sync + 'static,
) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).expect("bind a test server");
    let addr = l.local_addr().expect("local addr");
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let handler = handler.clone();
            std::thread::spawn(move || {
                if let Some(head) = read_head(&mut s) {
                    let (status, body) = handler(&head);
                    respond(&mut s, status, &body);
                }
            });
        }
    });
    addr
}

/// An answer: status, header lines (lowercased), body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One GET to `to` with `Host: host` and `extra` headers, on a new connection.
pub fn get(to: SocketAddr, host: &str, path: &str, extra: &[(&str, &str)], timeout: Duration) -> Option<Reply> {
    send(to, ("GET", host, path), extra, None, timeout)
}

/// One request of `method` with `body` (sent with its Content-Length) when given.
pub fn send(
    to: SocketAddr,
    (method, host, path): (&str, &str, &str),
    extra: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Option<Reply> {
    try_send(to, (method, host, path), extra, body, timeout).ok()
}

/// A GET that says why it failed: which step (connect, write, read) and the error, or
/// what the answer lacked.
pub fn try_get(to: SocketAddr, host: &str, path: &str, timeout: Duration) -> Result<Reply, String> {
    try_send(to, ("GET", host, path), &[], None, timeout)
}

fn try_send(
    to: SocketAddr,
    (method, host, path): (&str, &str, &str),
    extra: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Reply, String> {
    let mut s = TcpStream::connect(to).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(timeout)).map_err(|e| format!("socket: {e}"))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    s.write_all(&bytes).map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    let read = s.read_to_end(&mut out);
    let cut = |what: &str| match &read {
        Err(e) => format!("{what} after {} bytes (read: {e})", out.len()),
        Ok(_) => format!("{what} after {} bytes (closed)", out.len()),
    };
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| cut("no complete head"))?;
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| cut("no status"))?;
    let headers = head.lines().skip(1).map(|l| l.to_ascii_lowercase()).collect::<Vec<_>>().join("\n");
    let body = out[split + 4..].to_vec();
    // A body cut short of its Content-Length (the connection reset or timed out mid-body) is
    // a failed request, as any HTTP client would report it, not an answer.
    let declared = headers.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok());
    if declared.is_some_and(|len: usize| body.len() < len) {
        return Err(cut("body short of its content-length"));
    }
    Ok(Reply { status, headers, body })
}
