//! The peer UDP socket as quinn drives it. Quinn's own tokio socket reads until the kernel
//! says `EAGAIN`, so every wake of the endpoint ends with an empty `recvmmsg`: about one
//! system call per request on a lightly loaded link. This one treats a short batch as the
//! end, as tokio's TCP stream does with a short read: the kernel returned fewer datagrams
//! than asked only because its queue was empty, and a datagram arriving after that raises
//! a new edge-triggered readiness event, which clearing the old one does not drop (tokio
//! compares the event's tick).

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;

use crate::delay_line::DelayLine;

/// The most one GSO send may carry: an IPv4 datagram's 65,535 bytes less the IP and UDP
/// headers. The kernel refuses a larger batch outright.
const MAX_GSO_BYTES: usize = 65_507;

#[derive(Debug)]
pub struct QuicSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// Fault injection only: a delay on every datagram sent (zero, and untouched, otherwise).
    line: Arc<DelayLine>,
}

impl QuicSocket {
    /// Wraps a bound socket (made non-blocking here); needs a tokio runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Arc<QuicSocket>> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let io = tokio::net::UdpSocket::from_std(socket)?;
        Ok(Arc::new(QuicSocket { io, state, line: Arc::default() }))
    }

    fn send(&self, transmit: &Transmit) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || self.state.send((&self.io).into(), transmit))
    }

    /// quinn batches up to ten datagrams of the path's MTU without regard to the 64 KiB a
    /// GSO send may carry: past 6,550-byte datagrams a full batch would fail, read as loss,
    /// and black-hole detection would drop the path to QUIC's minimum MTU. Such a batch goes
    /// out in pieces that fit; should a later piece find the buffer full, its datagrams are
    /// left to QUIC's loss recovery rather than the whole batch sent again.
    fn send_batch(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size.filter(|_| transmit.contents.len() > MAX_GSO_BYTES) else {
            return self.send(transmit);
        };
        let piece = (MAX_GSO_BYTES / segment).max(1) * segment;
        for (i, contents) in transmit.contents.chunks(piece).enumerate() {
            let part = Transmit { contents, segment_size: (contents.len() > segment).then_some(segment), ..*transmit };
            match self.send(&part) {
                Err(e) if i > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                sent => sent?,
            }
        }
        Ok(())
    }

    /// Fault injection: holds every datagram sent from now on for `delay` (zero: none), so
    /// QUIC sees a WAN path's round trip. Needs the runtime, as `new` does.
    pub fn set_delay(self: &Arc<Self>, delay: std::time::Duration) {
        self.line.set(delay);
        if !delay.is_zero() && !self.line.started.swap(true, Relaxed) {
            tokio::spawn(drain(self.line.clone(), Arc::downgrade(self)));
        }
    }
}

/// Sends held datagrams as they fall due, until the socket is gone.
async fn drain(line: Arc<DelayLine>, socket: Weak<QuicSocket>) {
    loop {
        match line.next(tokio::time::Instant::now()) {
            Ok(held) => {
                let Some(socket) = socket.upgrade() else { return };
                // A full send buffer is waited out, as a link's queue would be.
                while let Err(e) = socket.send_batch(&held.transmit()) {
                    if e.kind() != io::ErrorKind::WouldBlock || socket.io.writable().await.is_err() {
                        break;
                    }
                }
                line.sent();
            }
            Err(Some(due)) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = line.woken.notified() => {}
                }
            }
            Err(None) if socket.strong_count() == 0 => return,
            Err(None) => line.woken.notified().await,
        }
    }
}

/// Lets a delay line's sender, waiting for datagrams, see the socket is gone and stop.
impl Drop for QuicSocket {
    fn drop(&mut self) {
        self.line.woken.notify_one();
    }
}

/// Waits for room in the socket's send buffer after a send would have blocked.
#[derive(Debug)]
struct Writable(Arc<QuicSocket>);

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.0.io.poll_send_ready(cx)
    }
}

impl AsyncUdpSocket for QuicSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.line.started.load(Relaxed) && self.line.holding() {
            // Held, or dropped as a full link drops: either way gone from quinn's hands.
            self.line.hold(transmit, tokio::time::Instant::now());
            return Ok(());
        }
        self.send_batch(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // What one `recvmmsg` asks for (quinn-udp reads at most BATCH_SIZE at a time).
        let asked = bufs.len().min(meta.len()).min(quinn::udp::BATCH_SIZE);
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            // `try_io` clears readiness when its closure says "would block": on a short
            // batch the datagrams are kept aside and the closure says so.
            let mut got = None;
            let _ = self.io.try_io(Interest::READABLE, || {
                let n = self.state.recv((&self.io).into(), bufs, meta)?;
                got = Some(n);
                if n < asked {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            // Other errors are passed over, as quinn's own socket does: the endpoint would
            // stop on one.
            if let Some(n) = got {
                return Poll::Ready(Ok(n));
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads until `want` datagrams came (counting each coalesced one), failing if a wake-up is lost for a second.
    async fn read_all(sock: &QuicSocket, want: usize) -> usize {
        // Room for datagrams the kernel coalesces (GRO), as quinn gives.
        let mut storage = vec![vec![0u8; 64 * 1024]; quinn::udp::BATCH_SIZE];
        let mut meta = vec![RecvMeta::default(); quinn::udp::BATCH_SIZE];
        let mut got = 0;
        while got < want {
            let mut bufs: Vec<io::IoSliceMut<'_>> = storage.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
            let read = std::future::poll_fn(|cx| sock.poll_recv(cx, &mut bufs, &mut meta));
            let n = tokio::time::timeout(std::time::Duration::from_secs(1), read).await.expect("woken").unwrap();
            got += meta[..n].iter().map(|m| m.len.div_ceil(m.stride.max(1))).sum::<usize>();
        }
        got
    }

    #[test]
    fn a_batch_of_jumbo_datagrams_past_64_kib_arrives_whole() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        rt.block_on(async {
            let sock = QuicSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
            sock.io.writable().await.unwrap();
            // Ten datagrams of 8,952 bytes, each filled with its number, as quinn hands over
            // a full batch.
            let contents: Vec<u8> = (0..10u8).flat_map(|i| [i; 8952]).collect();
            let segment_size = (sock.max_transmit_segments() > 1).then_some(8952);
            let destination = rx.local_addr().unwrap();
            let t = Transmit { destination, ecn: None, contents: &contents, segment_size, src_ip: None };
            if segment_size.is_some() {
                sock.try_send(&t).unwrap();
            } else {
                for d in contents.chunks(8952) {
                    sock.try_send(&Transmit { contents: d, ..t }).unwrap();
                }
            }
        });
        let mut buf = vec![0u8; 65_536];
        let got: Vec<u8> = (0..10)
            .map(|_| {
                let n = rx.recv(&mut buf).expect("every datagram of the batch arrives");
                assert!(n == 8952 && buf[..n].iter().all(|&b| b == buf[0]), "a whole datagram");
                buf[0]
            })
            .collect();
        assert_eq!(got, (0..10).collect::<Vec<u8>>(), "in order");
    }

    #[test]
    fn a_set_delay_holds_every_datagram_and_keeps_their_order() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let destination = rx.local_addr().unwrap();
        let delay = std::time::Duration::from_millis(60);
        let send = |sock: &QuicSocket, i: u8| {
            let t = Transmit { destination, ecn: None, contents: &[i; 100], segment_size: None, src_ip: None };
            sock.try_send(&t).unwrap();
        };
        let mut buf = [0u8; 200];
        rt.block_on(async {
            let sock = QuicSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
            sock.set_delay(delay);
            for i in 0..4u8 {
                send(&sock, i);
            }
            // The sender runs meanwhile; nothing may leave before the delay is up.
            tokio::time::sleep(delay / 2).await;
            rx.set_nonblocking(true).unwrap();
            assert!(rx.recv(&mut buf).is_err(), "a datagram went out before its delay");
            // Delay off while those are held: a new send must not overtake them.
            sock.set_delay(std::time::Duration::ZERO);
            send(&sock, 4);
            tokio::time::sleep(delay).await;
        });
        rx.set_nonblocking(false).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        for i in 0..5u8 {
            let n = rx.recv(&mut buf).expect("held datagrams go out");
            assert_eq!(&buf[..n], &[i; 100], "whole and in order");
        }
    }

    #[test]
    fn datagrams_after_a_short_batch_still_wake_the_reader() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let sock = QuicSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
            let to = sock.local_addr().unwrap();
            let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            // Bursts shorter and longer than one batch, each read while the next is sent.
            for (round, burst) in [1, 3, 1, 40, 2, 33, 1, 5].into_iter().cycle().take(64).enumerate() {
                let sender = tx.try_clone().unwrap();
                let send = std::thread::spawn(move || {
                    for i in 0..burst {
                        sender.send_to(&[round as u8, i as u8], to).unwrap();
                    }
                });
                assert_eq!(read_all(&sock, burst).await, burst, "round {round}");
                send.join().unwrap();
            }
        });
    }
}
