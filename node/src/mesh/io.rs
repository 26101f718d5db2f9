//! The byte streams of the data plane: a stream to an instance (local pipe or QUIC), the
//! guards a request holds while in flight, a response body that ends when its node goes,
//! and the byte counting around them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use trellis_core::mesh::balance::Balancer;
use trellis_core::mesh::circuit::Slot;

/// How long a TCP connect to an instance on this host may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A byte stream to an instance, local or through a peer.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
pub type Io = Box<dyn Stream>;

/// A request in flight to an instance, for least-request and peak EWMA: it ends when
/// the guard drops (with the response body, or the TCP connection).
pub struct InFlight {
    name: String,
    balancer: Arc<Mutex<Balancer>>,
}

impl InFlight {
    pub(crate) fn new(name: String, balancer: Arc<Mutex<Balancer>>) -> InFlight {
        InFlight { name, balancer }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut b) = self.balancer.lock() {
            b.end(&self.name);
        }
    }
}

/// A response body that keeps its request in flight until it is dropped, and fails
/// when `gone` resolves (the instance's node left or was declared down), so a body
/// from a dead node ends at detection rather than at QUIC's idle timeout.
pub struct Counted<B> {
    body: B,
    _in_flight: InFlight,
    // In a Mutex only to be Sync for `BoxBody`; polled through `get_mut`, never locked.
    gone: Option<Mutex<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
}

impl<B> Counted<B> {
    pub fn new(
        body: B,
        in_flight: InFlight,
        gone: Option<impl std::future::Future<Output = ()> + Send + 'static>,
    ) -> Self {
        let gone =
            gone.map(|g| Mutex::new(Box::pin(g) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>));
        Counted { body, _in_flight: in_flight, gone }
    }
}

/// Why a response body stopped before its end.
#[derive(Debug, thiserror::Error)]
#[error("the instance's node left the cluster or was declared down while its answer was streaming")]
pub struct NodeGone;

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, Self::Error>>> {
        let this = self.get_mut();
        // The node is looked at only while the body waits, not on every frame it hands on.
        let frame = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        if frame.is_pending() {
            if let Some(gone) = this.gone.as_mut() {
                let gone = gone.get_mut().unwrap_or_else(|p| p.into_inner());
                if gone.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(Some(Err(Box::new(NodeGone))));
                }
            }
        }
        frame.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A stream to an instance that counts the bytes it moves; for a TCP listener's
/// connection it also holds the connection in flight until dropped.
pub(crate) struct Metered {
    pub(crate) io: Io,
    pub(crate) sent: Arc<AtomicU64>,
    pub(crate) received: Arc<AtomicU64>,
    pub(crate) _in_flight: Option<InFlight>,
    pub(crate) _slot: Option<Slot>,
}

impl tokio::io::AsyncRead for Metered {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        self.received.fetch_add((buf.filled().len() - before) as u64, Relaxed);
        r
    }
}

impl tokio::io::AsyncWrite for Metered {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.sent.fetch_add(n as u64, Relaxed);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A TCP connection to an instance on this host, within [`CONNECT_TIMEOUT`].
pub(crate) async fn connect(ip: std::net::IpAddr, port: u16) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await??;
    s.set_nodelay(true)?;
    Ok(s)
}
