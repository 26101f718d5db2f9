//! The byte streams of the data plane: a stream to an instance (local pipe or QUIC), the
//! guard a request holds while in flight, and the byte counting around them.

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

/// Copy buffer per direction of a carried TCP connection. Tokio's 8 KiB default turns each
/// 8 KiB into a QUIC stream write and a wake of the connection driver; 32 KiB moves bulk data in
/// a quarter of the steps at 64 KiB per open connection (HAProxy holds two 16 KiB buffers).
const COPY_BUFFER: usize = 32 * 1024;

/// Moves bytes both ways until both sides have closed, as `copy_bidirectional` with larger buffers.
pub(crate) async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

/// A TCP connection to an instance on this host, within [`CONNECT_TIMEOUT`].
pub(crate) async fn connect(ip: std::net::IpAddr, port: u16) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await??;
    s.set_nodelay(true)?;
    Ok(s)
}
