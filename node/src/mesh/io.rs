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

/// A byte stream of the data plane: to an instance, local or through a peer, or from a
/// peer or this node's own forwarder.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {
    /// The QUIC stream pair underneath, and the counters its bytes go to: a copy through it
    /// hands whole chunks to QUIC and takes whole chunks from it, two copies per byte fewer
    /// than through `AsyncRead`/`AsyncWrite`.
    fn quic(&mut self) -> Option<QuicParts<'_>> {
        None
    }
}
pub type Io = Box<dyn Stream>;

impl Stream for TcpStream {}
impl Stream for tokio::io::DuplexStream {}
impl Stream for Box<dyn Stream> {
    fn quic(&mut self) -> Option<QuicParts<'_>> {
        (**self).quic()
    }
}

/// A QUIC stream pair as one byte stream.
pub struct QuicIo {
    pub recv: quinn::RecvStream,
    pub send: quinn::SendStream,
}

impl Stream for QuicIo {
    fn quic(&mut self) -> Option<QuicParts<'_>> {
        Some(QuicParts { io: self, sent: None, received: None })
    }
}

/// A QUIC stream pair borrowed for a chunked copy, with the counters of a [`Metered`] around it.
pub struct QuicParts<'a> {
    io: &'a mut QuicIo,
    sent: Option<&'a AtomicU64>,
    received: Option<&'a AtomicU64>,
}

impl tokio::io::AsyncRead for QuicIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for QuicIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.send), cx)
    }
}

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

impl Stream for Metered {
    fn quic(&mut self) -> Option<QuicParts<'_>> {
        let parts = self.io.quic()?;
        Some(QuicParts { sent: Some(&self.sent), received: Some(&self.received), ..parts })
    }
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

/// Moves bytes both ways between a TCP connection and a stream until both sides have
/// closed; returns the bytes moved (TCP to stream, stream to TCP). Through QUIC whole chunks
/// move, else as `copy_bidirectional` with larger buffers.
pub(crate) async fn relay<S: Stream + ?Sized>(tcp: &mut TcpStream, s: &mut S) -> std::io::Result<(u64, u64)> {
    if let Some(q) = s.quic() {
        return relay_chunks(tcp, q).await;
    }
    tokio::io::copy_bidirectional_with_sizes(tcp, s, COPY_BUFFER, COPY_BUFFER).await
}

/// [`relay`] through QUIC: what TCP reads is handed to QUIC as it is (`write_chunk`), and
/// what QUIC received goes to TCP from its own buffers (`read_chunks`, one `writev` for
/// several).
async fn relay_chunks(tcp: &mut TcpStream, q: QuicParts<'_>) -> std::io::Result<(u64, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let QuicParts { io, sent, received } = q;
    let (recv, send) = (&mut io.recv, &mut io.send);
    let (mut rd, mut wr) = tcp.split();
    let up = async {
        let mut buf = bytes::BytesMut::new();
        let mut total = 0u64;
        loop {
            // Small reads share one block until it runs low: each chunk pins its block until
            // QUIC has it acknowledged, and a fresh 32 KiB per 100-byte message would pile up.
            if buf.capacity() < COPY_BUFFER / 4 {
                buf.reserve(COPY_BUFFER);
            }
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                let _ = send.finish();
                return Ok(total);
            }
            send.write_chunk(buf.split().freeze()).await.map_err(std::io::Error::from)?;
            total += n as u64;
            if let Some(c) = sent {
                c.fetch_add(n as u64, Relaxed);
            }
        }
    };
    let down = async {
        let mut chunks: [bytes::Bytes; CHUNKS_PER_WRITE] = Default::default();
        let mut total = 0u64;
        while let Some(n) = recv.read_chunks(&mut chunks).await.map_err(std::io::Error::from)? {
            let len: usize = chunks[..n].iter().map(bytes::Bytes::len).sum();
            write_all_chunks(&mut wr, &mut chunks[..n]).await?;
            total += len as u64;
            if let Some(c) = received {
                c.fetch_add(len as u64, Relaxed);
            }
        }
        wr.shutdown().await?;
        Ok(total)
    };
    tokio::try_join!(up, down)
}

/// Chunks QUIC hands over per read in [`relay_chunks`]: about 70 KiB at an 8952-byte MTU.
const CHUNKS_PER_WRITE: usize = 8;

/// Writes every chunk, in as few `writev` calls as the socket takes.
async fn write_all_chunks<W>(w: &mut W, chunks: &mut [bytes::Bytes]) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use bytes::Buf;
    use tokio::io::AsyncWriteExt;
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        let mut n = {
            let mut slices = [std::io::IoSlice::new(&[]); CHUNKS_PER_WRITE];
            let rest = &chunks[first..];
            for (s, c) in slices.iter_mut().zip(rest) {
                *s = std::io::IoSlice::new(c);
            }
            w.write_vectored(&slices[..rest.len().min(CHUNKS_PER_WRITE)]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let step = n.min(chunks[first].len());
            chunks[first].advance(step);
            n -= step;
            if chunks[first].is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}

/// A TCP connection to an instance on this host, within [`CONNECT_TIMEOUT`].
pub(crate) async fn connect(ip: std::net::IpAddr, port: u16) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await??;
    s.set_nodelay(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn chunks_arrive_whole_and_in_order_through_short_writes() {
        // A pipe that takes at most 7 bytes per write, and more chunks than one writev holds,
        // some empty.
        let (mut w, mut r) = tokio::io::duplex(7);
        let mut chunks: Vec<bytes::Bytes> =
            (0..20u8).map(|i| bytes::Bytes::from(vec![i; usize::from(i % 4) * 5])).collect();
        let want: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.map(|_| got)
        });
        write_all_chunks(&mut w, &mut chunks).await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap().unwrap(), want);
        assert!(chunks.iter().all(bytes::Bytes::is_empty), "every chunk consumed");
    }
}
