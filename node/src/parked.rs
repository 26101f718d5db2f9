//! Client HTTP/1 connections that hold no buffers while idle. hyper keeps an 8 KiB read
//! buffer, an 8 KiB write buffer and the slot of the service's future for a connection's
//! whole life: with many idle keep-alive clients that was most of the agent's memory
//! (36 KiB per connection against HAProxy's 0.5, which returns buffers to a pool when a
//! connection goes idle). Here hyper serves until a response has gone out, every request
//! it read has been answered and no new one came within a linger; then its state is
//! dropped and the bare socket parked until the client sends again, when a new one starts
//! with whatever bytes hyper had read ahead. Stopping hyper while it is answering would
//! make it send `Connection: close`, which clients obey. HTTP/2 (told by its preface)
//! keeps one hyper connection: its streams share it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body_util::combinators::BoxBody;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The proxy's response body.
pub type Body = BoxBody<Bytes, BoxError>;

/// How long a connection keeps hyper's state after an answer before it is parked, at first:
/// short, so that many clients making one request each (the idle-connection benchmark) hold
/// few buffers at any moment. A client sending again within the linger is served without a
/// new connection state, two buffers and a wake-up per request; one that pauses longer costs
/// only its socket.
const MIN_LINGER: std::time::Duration = std::time::Duration::from_millis(10);
/// The longest linger. A client whose pause (linger and time parked) stayed under it was
/// parked too early (a keep-alive client sending every few milliseconds was parked and rebuilt
/// on half its requests at 10 ms), so its linger doubles up to this; one that paused longer
/// starts again from `MIN_LINGER`. Clients sending at least every 250 ms keep their state
/// (about 36 KiB) between requests; slower ones are parked between requests.
const MAX_LINGER: std::time::Duration = std::time::Duration::from_millis(250);

/// The HTTP/2 connection preface's first bytes; no HTTP/1 method starts like it.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Serves one client connection with `svc`, parking it between HTTP/1 requests.
pub async fn serve<S, F>(tcp: TcpStream, builder: &crate::listen::HttpBuilder, svc: S) -> Result<(), BoxError>
where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    // Until the first bytes, a connection costs this task and its socket only.
    tcp.readable().await?;
    let mut head = [0u8; PREFACE.len()];
    let n = tcp.peek(&mut head).await?;
    if n == 0 {
        return Ok(());
    }
    if PREFACE.starts_with(&head[..n]) {
        let svc = hyper::service::service_fn(svc);
        // Boxed, like the HTTP/1 state below: a future holds room for its largest state.
        return Box::pin(builder.auto.serve_connection(TokioIo::new(tcp), svc)).await;
    }
    let (mut tcp, mut ahead, mut linger) = (tcp, Bytes::new(), Linger::default());
    loop {
        // Everything hyper held is dropped inside `until_idle`: only the socket and the
        // bytes it read ahead stay while parked.
        let Some(idle) = until_idle(tcp, ahead, builder, &svc, linger.0).await? else {
            return Ok(());
        };
        (tcp, ahead) = idle;
        if ahead.is_empty() {
            let parked = tokio::time::Instant::now();
            // As hyper would, an idle keep-alive connection gets the header read deadline.
            let Ok(ready) = tokio::time::timeout(builder.idle, tcp.readable()).await else {
                return Ok(());
            };
            ready?;
            if tcp.peek(&mut [0u8; 1]).await? == 0 {
                return Ok(());
            }
            linger = linger.woke_after(parked.elapsed());
        }
    }
}

/// Serves HTTP/1 requests on `tcp` until an answer has ended and no request is waiting
/// for one; returns the socket and whatever hyper had read past that, or `None` once a
/// client that asked to close has been closed.
async fn until_idle<S, F>(
    tcp: TcpStream,
    ahead: Bytes,
    builder: &crate::listen::HttpBuilder,
    svc: &S,
    linger_for: std::time::Duration,
) -> Result<Option<(TcpStream, Bytes)>, BoxError>
where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let done = Arc::new(Done::default());
    let io = TokioIo::new(Rewind { io: tcp, ahead });
    // On the heap, so that a parked connection's task does not keep room for it.
    let mut conn = Box::new(builder.h1.serve_connection(io, Ended(svc.clone(), done.clone())));
    let linger = tokio::time::sleep(linger_for);
    tokio::pin!(linger);
    // Requests started when the linger was armed, while it runs. Armed at most once per
    // linger, not reset by every answer: a busy connection costs no timer work per request,
    // and an idle one is parked between one and two lingers after its last answer.
    let mut armed: Option<u64> = None;
    loop {
        tokio::select! {
            // An ended answer is seen before hyper reads on, so it can stop while idle.
            biased;
            _ = done.ended.notified() => {
                if armed.is_none() {
                    linger.as_mut().reset(tokio::time::Instant::now() + linger_for);
                    armed = Some(done.started.load(Relaxed));
                }
            }
            _ = &mut linger, if armed.is_some() => {
                let (at, started) = (armed.take().unwrap_or_default(), done.started.load(Relaxed));
                match at_linger(at, started, done.finished.load(Relaxed)) {
                    AtLinger::Stop => Pin::new(&mut *conn).graceful_shutdown(),
                    AtLinger::Wait => {}
                    AtLinger::Again => {
                        linger.as_mut().reset(tokio::time::Instant::now() + linger_for);
                        armed = Some(started);
                    }
                }
            }
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => { r?; break }
        }
    }
    let parts = conn.into_parts();
    let Rewind { io: mut tcp, ahead: unread } = parts.io.into_inner();
    // An empty `Bytes` may still hold hyper's whole read buffer: keep only real bytes.
    let ahead = match (unread.is_empty(), parts.read_buf.is_empty()) {
        (true, true) => Bytes::new(),
        (true, false) => Bytes::copy_from_slice(&parts.read_buf),
        _ => [unread, parts.read_buf].concat().into(),
    };
    if done.close.load(Relaxed) {
        let _ = tcp.shutdown().await;
        return Ok(None);
    }
    Ok(Some((tcp, ahead)))
}

/// One connection's linger, which grows while the client keeps coming back soon after being
/// parked (see `MAX_LINGER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Linger(std::time::Duration);

impl Default for Linger {
    fn default() -> Self {
        Linger(MIN_LINGER)
    }
}

impl Linger {
    /// The linger after the client sent again, `parked` after its connection was parked:
    /// longer if its whole pause (linger and parked time) was under `MAX_LINGER`, else back
    /// to the shortest, so a client pausing longer than that is parked at once again.
    fn woke_after(self, parked: std::time::Duration) -> Linger {
        if self.0 + parked < MAX_LINGER {
            Linger((self.0 * 2).min(MAX_LINGER))
        } else {
            Linger::default()
        }
    }
}

/// What a connection does when its linger runs out.
#[derive(Debug, PartialEq, Eq)]
enum AtLinger {
    /// Nothing came since the linger was armed: park it.
    Stop,
    /// A request is being answered: stopping now would make hyper send `Connection:
    /// close`, which the client obeys; that answer's end arms the linger again.
    Wait,
    /// Requests came and were answered meanwhile: linger on from now.
    Again,
}

/// The linger was armed when `armed_at` requests had started; `started` have now, of
/// which `finished` are answered.
fn at_linger(armed_at: u64, started: u64, finished: u64) -> AtLinger {
    if started != finished {
        AtLinger::Wait
    } else if started == armed_at {
        AtLinger::Stop
    } else {
        AtLinger::Again
    }
}

/// What one hyper connection's requests tell the loop.
#[derive(Default)]
struct Done {
    /// A response body has gone out: the connection may stop after it.
    ended: Notify,
    /// The client asked to close (`Connection: close`, or HTTP/1.0 without keep-alive).
    close: AtomicBool,
    /// Requests handed to the service, and answers ended (or dropped).
    started: AtomicU64,
    finished: AtomicU64,
}

/// `svc`, with each response's end signalled to the loop. Its futures are boxed, which
/// `poll_without_shutdown` needs and which frees their slot between requests.
#[derive(Clone)]
struct Ended<S>(S, Arc<Done>);

impl<S, F> hyper::service::Service<Request<Incoming>> for Ended<S>
where
    S: Fn(Request<Incoming>) -> F,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    type Response = Response<EndBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<EndBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.1.started.fetch_add(1, Relaxed);
        if wants_close(&req) {
            self.1.close.store(true, Relaxed);
        }
        Box::pin(Tagged { fut: (self.0)(req), done: Some(self.1.clone()) })
    }
}

pin_project_lite::pin_project! {
    /// The service's future, with its response's body made to signal its end. A plain
    /// struct: an `async move` block around `fut` would hold it twice, once as captured
    /// and once as awaited (45 KB per request for the proxy's 22 KB future, measured with
    /// `-Zprint-type-sizes`), and copy it between the two.
    struct Tagged<F> {
        #[pin]
        fut: F,
        done: Option<Arc<Done>>,
    }
}

impl<F: Future<Output = Result<Response<Body>, Infallible>>> Future for Tagged<F> {
    type Output = Result<Response<EndBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.fut.poll(cx))?;
        let done = this.done.take();
        Poll::Ready(Ok(resp.map(|body| EndBody { body, done })))
    }
}

fn wants_close<B>(req: &Request<B>) -> bool {
    let says = |token: &str| {
        req.headers()
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    match req.version() {
        hyper::Version::HTTP_10 => !says("keep-alive"),
        _ => says("close"),
    }
}

/// A response body that tells the loop when it has ended (or was dropped unfinished).
pub struct EndBody {
    body: Body,
    done: Option<Arc<Done>>,
}

impl EndBody {
    fn end(&mut self) {
        if let Some(d) = self.done.take() {
            d.finished.fetch_add(1, Relaxed);
            d.ended.notify_one();
        }
    }
}

impl Drop for EndBody {
    fn drop(&mut self) {
        self.end();
    }
}

impl hyper::body::Body for EndBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket with bytes already read from it in front.
struct Rewind {
    io: TcpStream,
    ahead: Bytes,
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            buf.put_slice(&self.ahead[..n]);
            self.ahead.advance(n);
            if self.ahead.is_empty() {
                self.ahead = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    /// An echo of the request's path, served by `serve` on a real socket.
    fn server() -> std::net::SocketAddr {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            rt.block_on(async move {
                let builder = Arc::new(crate::listen::http_builder(&crate::limits::Limits::default()));
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let builder = builder.clone();
                    tokio::spawn(async move {
                        let _ = serve(tcp, &builder, path_echo).await;
                    });
                }
            })
        });
        addr
    }

    async fn path_echo(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        use http_body_util::BodyExt;
        if req.uri().path().starts_with("/slow") {
            // An answer that takes a while, as a proxied one does.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let body = http_body_util::Full::new(Bytes::from(req.uri().path().to_string()));
        Ok(Response::new(body.map_err(|e| match e {}).boxed()))
    }

    fn get(path: &str, extra: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n")
    }

    /// Reads one response with a Content-Length body; returns its body.
    fn read_response(s: &mut std::net::TcpStream) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .unwrap();
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
        String::from_utf8(body).unwrap()
    }

    #[test]
    fn a_linger_parks_only_a_connection_nothing_came_to() {
        assert_eq!(at_linger(3, 3, 3), AtLinger::Stop);
        assert_eq!(at_linger(3, 4, 3), AtLinger::Wait, "a request under way");
        assert_eq!(at_linger(3, 5, 5), AtLinger::Again, "requests came and went");
    }

    #[test]
    fn a_client_that_comes_back_soon_lingers_longer_and_one_that_pauses_starts_over() {
        let ms = Duration::from_millis;
        let mut l = Linger::default();
        assert_eq!(l.0, MIN_LINGER);
        // A keep-alive client sending every few milliseconds: parked, back at once, each time.
        let mut steps = vec![l.0];
        while l.0 < MAX_LINGER {
            l = l.woke_after(ms(1));
            steps.push(l.0);
        }
        assert_eq!(steps, [10, 20, 40, 80, 160, 250].map(ms), "doubles up to the cap");
        assert_eq!(Linger(ms(160)).woke_after(ms(5)).0, MAX_LINGER, "capped");
        // A pause as long as the longest linger: the client is slow, park it early again.
        assert_eq!(l.woke_after(MAX_LINGER), Linger::default());
        // A client polling every 300 ms after a burst grew its linger: its pause (the linger
        // and the time parked) is over the cap, so it starts over and stays short.
        let after_burst = Linger(MAX_LINGER);
        let polled = after_burst.woke_after(ms(300) - MAX_LINGER + ms(1));
        assert_eq!(polled, Linger::default());
        assert_eq!(polled.woke_after(ms(290)), Linger::default(), "300 ms polls keep the shortest linger");
        // One polling every 100 ms grows, but only while its pauses stay under the cap.
        assert_eq!(Linger(ms(40)).woke_after(ms(60)).0, ms(80));
        assert_eq!(Linger::default().woke_after(Duration::from_secs(30)), Linger::default());
    }

    #[test]
    fn a_parked_connection_serves_again_keeps_pipelined_requests_in_order_and_closes_when_asked() {
        let addr = server();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Idle gaps between requests on one connection.
        for path in ["/a", "/b", "/c"] {
            s.write_all(get(path, "").as_bytes()).unwrap();
            assert_eq!(read_response(&mut s), path);
            std::thread::sleep(Duration::from_millis(30));
        }
        // Three requests in one write: the ones hyper read ahead are served next, in order.
        s.write_all(format!("{}{}{}", get("/1", ""), get("/2", ""), get("/3", "")).as_bytes()).unwrap();
        for path in ["/1", "/2", "/3"] {
            assert_eq!(read_response(&mut s), path);
        }
        // A request read while the one before it ends, answered later: its answer must not
        // say `Connection: close` (read_response checks) and the connection goes on.
        s.write_all(format!("{}{}", get("/4", ""), get("/slow5", "")).as_bytes()).unwrap();
        for path in ["/4", "/slow5"] {
            assert_eq!(read_response(&mut s), path);
        }
        // A request split across writes, with a pause inside its headers.
        s.write_all(b"GET /split HTTP/1.1\r\nHo").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        s.write_all(b"st: x\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut s), "/split");
        // `Connection: close`: the answer, then the server closes.
        s.write_all(get("/last", "Connection: close\r\n").as_bytes()).unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert!(rest.ends_with("/last"), "{rest}");
        // HTTP/1.0 without keep-alive is closed too.
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /old HTTP/1.0\r\n\r\n").unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        assert!(all.starts_with("HTTP/1.0 200") && all.ends_with("/old"), "{all}");
        // A client that connects and leaves costs nothing and breaks nothing.
        drop(std::net::TcpStream::connect(addr).unwrap());
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(get("/after", "").as_bytes()).unwrap();
        assert_eq!(read_response(&mut s), "/after");
    }
}
