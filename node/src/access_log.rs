//! The access log's shell: its `[access_log]` config, a writer thread (stdout or a file
//! rotated by size) behind a bounded queue so a slow disk never holds a request, and the
//! response body wrapper that writes a request's line once its answer has been sent.
//! What a line holds and which are kept is `trellis_core::mesh::access_log`.

use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use serde::Deserialize;
use tokio::sync::mpsc::{self, error::TryRecvError};
use trellis_core::mesh::access_log::{Entry, EnvoyHeaders, Filter, Format, Side};
use trellis_core::mesh::trace::Hop;

/// Lines waiting for the writer; past this they are dropped and counted (8192 lines is
/// 80,000 requests a second for one drain interval). Tokio's queue takes memory for lines
/// as they come, 32 at a time; std's bounded one holds all 8192 from the start (3.5 MiB of
/// an idle agent's RSS, measured).
const QUEUE: usize = 8192;
/// How often the writer thread drains the queue: a line reaches the file within this.
const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// Errors kept for the dashboard (`/v1/agent/errors`), newest last.
pub const RECENT_ERRORS: usize = 50;

/// `[access_log]` in the agent's config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// On when the section is present, unless set false.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub format: Format,
    /// `stdout`, `stderr`, or a file (rotated at `max_size`).
    #[serde(default = "stdout")]
    pub path: String,
    /// Bytes a file may reach before it is rotated to `<path>.1`.
    #[serde(default = "hundred_mib")]
    pub max_size: u64,
    /// Rotated files kept (`<path>.1` .. `<path>.<keep>`).
    #[serde(default = "three")]
    pub keep: u32,
    /// Share (0..=1) of ordinary requests logged; errors and slow ones always are.
    #[serde(default = "one")]
    pub sample: f64,
    /// Only errors (5xx, the proxy's own answers) and slow requests.
    #[serde(default)]
    pub errors_only: bool,
    /// Requests at least this slow are always logged (e.g. "500ms").
    #[serde(default, with = "humantime_serde")]
    pub slow: Option<Duration>,
    /// Only these services (all when empty).
    #[serde(default)]
    pub services: Vec<String>,
    /// Request headers whose values the JSON and text formats log (none by default).
    #[serde(default)]
    pub headers: Vec<String>,
}

fn yes() -> bool {
    true
}
fn stdout() -> String {
    "stdout".into()
}
fn hundred_mib() -> u64 {
    100 << 20
}
fn three() -> u32 {
    3
}
fn one() -> f64 {
    1.0
}

impl AccessLogConfig {
    /// The defaults, writing to `path` (the `--access-log` flag).
    pub fn to(path: &str) -> AccessLogConfig {
        let mut c: AccessLogConfig = toml::from_str("").expect("every field has a default");
        c.path = path.to_string();
        c
    }

    /// Field errors, named as the config file spells them.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample) {
            return Err(format!("access_log.sample: {} is not a share; use 0 to 1 (e.g. 0.01 for 1%)", self.sample));
        }
        if self.max_size < 4096 {
            return Err(format!(
                "access_log.max_size: {} bytes is too small to rotate at; use at least 4096",
                self.max_size
            ));
        }
        if let Some(h) = self.headers.iter().find(|h| hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err()) {
            return Err(format!("access_log.headers: {h:?} is not a header name; use names such as \"x-tenant\""));
        }
        if self.path.is_empty() {
            return Err("access_log.path: empty; use stdout, stderr or a file path".into());
        }
        Ok(())
    }
}

/// A running access log: which requests it takes, and the queue to its writer thread.
pub struct AccessLog {
    filter: Filter,
    services: Vec<String>,
    headers: Vec<hyper::header::HeaderName>,
    queue: mpsc::Sender<Entry>,
    /// Lines dropped because the writer fell behind.
    pub dropped: AtomicU64,
    /// The last [`RECENT_ERRORS`] error lines, whatever the sampling.
    recent_errors: std::sync::Mutex<std::collections::VecDeque<Entry>>,
    pub written: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens the destination (a file is created or appended to) and starts the writer.
    pub fn start(cfg: &AccessLogConfig) -> anyhow::Result<Arc<AccessLog>> {
        cfg.check().map_err(anyhow::Error::msg)?;
        let sink = Sink::open(cfg)?;
        let (queue, lines) = mpsc::channel(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        let format = cfg.format;
        std::thread::Builder::new().name("access-log".into()).spawn(move || sink.run(lines, format, &counter))?;
        Ok(Arc::new(AccessLog {
            filter: Filter { sample: cfg.sample, errors_only: cfg.errors_only, slow: cfg.slow },
            services: cfg.services.clone(),
            headers: cfg.headers.iter().filter_map(|h| h.parse().ok()).collect(),
            queue,
            dropped: AtomicU64::new(0),
            recent_errors: std::sync::Mutex::default(),
            written,
        }))
    }

    /// Does this service's traffic get lines here?
    pub fn wants(&self, service: &str) -> bool {
        self.services.is_empty() || self.services.iter().any(|s| s == service)
    }

    /// The configured request headers present on `headers`, for the line.
    fn headers_of(&self, headers: &hyper::HeaderMap) -> Vec<(String, String)> {
        let value = |n: &hyper::header::HeaderName| headers.get(n)?.to_str().ok().map(str::to_string);
        self.headers.iter().filter_map(|n| Some((n.as_str().to_string(), value(n)?))).collect()
    }

    /// A request's line as far as its head tells, before it is sent on; the answer fills in
    /// the rest ([`Logged`]).
    pub fn begin<B>(&self, req: &hyper::Request<B>, hop: &Hop, side: Side, source: String, service: &str) -> Entry {
        let h = req.headers();
        let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        Entry {
            start_ms: crate::policy::now_ms(),
            side,
            request_id: header(trellis_core::mesh::trace::REQUEST_ID).unwrap_or_default(),
            trace_id: hop.trace_hex(),
            span_id: hop.span_hex(),
            parent_span_id: hop.parent_hex(),
            source,
            service: service.to_string(),
            route: None,
            instance: None,
            upstream: None,
            method: req.method().to_string(),
            path: req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string(),
            protocol: protocol(req.version()),
            authority: header("host").or_else(|| req.uri().authority().map(|a| a.to_string())).unwrap_or_default(),
            status: 0,
            reason: None,
            duration_ms: 0,
            bytes_received: 0,
            bytes_sent: 0,
            attempts: 0,
            headers: self.headers_of(h),
            envoy: EnvoyHeaders { forwarded_for: header("x-forwarded-for"), user_agent: header("user-agent") },
        }
    }

    /// The most recent error lines, oldest first.
    pub fn recent_errors(&self) -> Vec<Entry> {
        self.recent_errors.lock().expect("recent errors lock").iter().cloned().collect()
    }

    /// Queues the line if the filter keeps it; never waits. It is rendered on the writer's
    /// thread, not the runtime's.
    fn write(&self, e: Entry, took: Duration) {
        if e.is_error() {
            let mut recent = self.recent_errors.lock().expect("recent errors lock");
            if recent.len() == RECENT_ERRORS {
                recent.pop_front();
            }
            recent.push_back(e.clone());
        }
        if !self.filter.keep(e.is_error(), took, rand::random::<f64>()) {
            return;
        }
        if self.queue.try_send(e).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

pub fn protocol(v: hyper::Version) -> &'static str {
    match v {
        hyper::Version::HTTP_10 => "HTTP/1.0",
        hyper::Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

/// Where lines go.
enum Sink {
    Stdout,
    Stderr,
    File { path: PathBuf, file: std::io::BufWriter<std::fs::File>, size: u64, max: u64, keep: u32 },
}

impl Sink {
    fn open(cfg: &AccessLogConfig) -> anyhow::Result<Sink> {
        Ok(match cfg.path.as_str() {
            "stdout" => Sink::Stdout,
            "stderr" => Sink::Stderr,
            p => {
                let path = PathBuf::from(p);
                let file = append(&path).map_err(|e| {
                    anyhow::anyhow!("access_log.path: cannot open {p}: {e}; pick a writable file, or stdout")
                })?;
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                Sink::File { path, file: std::io::BufWriter::new(file), size, max: cfg.max_size, keep: cfg.keep }
            }
        })
    }

    /// Every [`DRAIN_EVERY`], writes what the queue holds and flushes. The thread sleeps in
    /// between rather than waiting on the queue, so a request's `try_send` never has a
    /// sleeping reader to wake: no futex call and no context switch per line.
    fn run(mut self, mut lines: mpsc::Receiver<Entry>, format: Format, written: &AtomicU64) {
        loop {
            std::thread::sleep(DRAIN_EVERY);
            loop {
                match lines.try_recv() {
                    Ok(entry) => {
                        if let Err(e) = self.put(&entry.render(format)) {
                            tracing::warn!(error = %e, "access log write failed");
                        }
                        written.fetch_add(1, Relaxed);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        let _ = self.flush();
                        return;
                    }
                }
            }
            let _ = self.flush();
        }
    }

    fn put(&mut self, line: &str) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            Sink::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
            Sink::File { path, file, size, max, keep } => {
                if *size + line.len() as u64 > *max && *size > 0 {
                    file.flush()?;
                    rotate(path, *keep)?;
                    *file = std::io::BufWriter::new(append(path)?);
                    *size = 0;
                }
                *size += line.len() as u64;
                file.write_all(line.as_bytes())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().flush(),
            Sink::Stderr => Ok(()),
            Sink::File { file, .. } => file.flush(),
        }
    }
}

fn append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

/// `path` becomes `path.1`, `path.1` becomes `path.2`, ... the oldest beyond `keep` goes.
fn rotate(path: &std::path::Path, keep: u32) -> std::io::Result<()> {
    let nth = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    for n in (1..keep).rev() {
        if nth(n).exists() {
            std::fs::rename(nth(n), nth(n + 1))?;
        }
    }
    std::fs::rename(path, nth(1))
}

/// A TCP connection's line, written when it ends, however it ends.
pub struct TcpLine {
    log: Arc<AccessLog>,
    entry: Entry,
    started: Instant,
}

impl TcpLine {
    /// A line for a connection of `service` from `source`, when the log takes the service.
    pub fn start(log: Option<&Arc<AccessLog>>, side: Side, source: String, service: &str) -> Option<TcpLine> {
        let log = log.filter(|l| l.wants(service))?;
        let entry = Entry {
            start_ms: crate::policy::now_ms(),
            side,
            request_id: String::new(),
            trace_id: String::new(),
            span_id: String::new(),
            parent_span_id: None,
            source,
            service: service.to_string(),
            route: None,
            instance: None,
            upstream: None,
            method: String::new(),
            path: String::new(),
            protocol: "TCP",
            authority: String::new(),
            status: 0,
            reason: None,
            duration_ms: 0,
            bytes_received: 0,
            bytes_sent: 0,
            attempts: 1,
            headers: vec![],
            envoy: EnvoyHeaders::default(),
        };
        Some(TcpLine { log: log.clone(), entry, started: Instant::now() })
    }

    pub fn instance(&mut self, name: &str, addr: std::net::SocketAddr) {
        (self.entry.instance, self.entry.upstream) = (Some(name.to_string()), Some(addr.to_string()));
    }

    /// Bytes from the connecting side, and to it.
    pub fn bytes(&mut self, received: u64, sent: u64) {
        (self.entry.bytes_received, self.entry.bytes_sent) = (received, sent);
    }

    /// Why the connection ended early (the proxy's reason, as in `x-trellis-reason`).
    pub fn failed(&mut self, reason: &str) {
        self.entry.reason = Some(reason.to_string());
    }
}

impl Drop for TcpLine {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        self.entry.duration_ms = took.as_millis() as u64;
        self.log.write(self.entry.clone(), took);
    }
}

/// A body that counts the bytes it carries into a shared counter.
pub struct Counted<B> {
    inner: B,
    bytes: Option<Arc<AtomicU64>>,
    /// A mirrored request's copy of the body, fed as frames pass.
    tee: Option<crate::mesh::tee::Tee>,
}

impl<B> Counted<B> {
    /// Counts into `bytes` when given; otherwise only passes frames through.
    pub fn new(inner: B, bytes: Option<Arc<AtomicU64>>) -> Counted<B> {
        Counted { inner, bytes, tee: None }
    }

    /// Also shares every data frame with `tee`.
    pub fn teed(mut self, tee: Option<crate::mesh::tee::Tee>) -> Counted<B> {
        self.tee = tee;
        self
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    if let Some(n) = &self.bytes {
                        n.fetch_add(d.len() as u64, Relaxed);
                    }
                    let end = self.inner.is_end_stream();
                    if let Some(t) = &mut self.tee {
                        t.push(d);
                        // A body of known length may not be polled past its last frame.
                        if end {
                            t.finish();
                        }
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(t) = &mut self.tee {
                    t.finish();
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that writes its request's line when it is dropped: after the last byte
/// went to the client, or when the client went away.
pub struct Logged<B> {
    inner: B,
    sent: u64,
    line: Option<Pending>,
}

/// A line waiting for its response to end.
pub struct Pending {
    pub log: Arc<AccessLog>,
    pub entry: Entry,
    pub started: Instant,
    pub received: Arc<AtomicU64>,
}

impl<B> Logged<B> {
    pub fn new(inner: B, line: Pending) -> Logged<B> {
        Logged { inner, sent: 0, line: Some(line) }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.sent += d.len() as u64;
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        let Some(mut p) = self.line.take() else { return };
        let took = p.started.elapsed();
        p.entry.duration_ms = took.as_millis() as u64;
        p.entry.bytes_sent = self.sent;
        p.entry.bytes_received = p.received.load(Relaxed);
        p.log.write(p.entry, took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_field_errors() {
        let c = AccessLogConfig::to("stdout");
        assert!(c.enabled && c.format == Format::Json && c.sample == 1.0 && c.keep == 3);
        let bad = AccessLogConfig { sample: 1.5, ..c.clone() };
        assert!(bad.check().unwrap_err().starts_with("access_log.sample"));
        let bad = AccessLogConfig { headers: vec!["bad header".into()], ..c.clone() };
        assert!(bad.check().unwrap_err().starts_with("access_log.headers"));
        let parsed: AccessLogConfig =
            toml::from_str("format = \"envoy\"\nslow = \"250ms\"\nservices = [\"web\"]").unwrap();
        assert_eq!((parsed.format, parsed.slow), (Format::Envoy, Some(Duration::from_millis(250))));
        assert!(toml::from_str::<AccessLogConfig>("formatt = \"json\"").is_err(), "unknown keys refused");
    }

    #[test]
    fn a_file_rotates_at_its_size_and_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("trellis-access-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let cfg = AccessLogConfig { max_size: 4096, keep: 2, ..AccessLogConfig::to(path.to_str().unwrap()) };
        let mut sink = Sink::open(&cfg).unwrap();
        let line = format!("{}\n", "x".repeat(999));
        for _ in 0..13 {
            sink.put(&line).unwrap();
        }
        sink.flush().unwrap();
        let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert_eq!(size(&path), 1000, "13 lines of 1000 bytes at 4 per file: 4 + 4 + 4 + 1");
        assert_eq!(size(&dir.join("access.log.1")), 4000);
        assert_eq!(size(&dir.join("access.log.2")), 4000);
        assert!(!dir.join("access.log.3").exists(), "keep = 2");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
