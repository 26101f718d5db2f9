//! A delay injected under QUIC, for the chaos harness and the WAN benchmark: this kernel has
//! no `tc netem`, and a delay added to whole messages or streams above QUIC leaves its RTT,
//! congestion window and flow-control windows as on loopback. Every datagram the socket
//! sends is held for the set time, then sent in order; the queue is bounded like a router's.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use quinn::udp::{EcnCodepoint, Transmit};
use tokio::time::Instant;

/// What a delayed link holds at most before it drops datagrams: 64 MiB, a second of a
/// 500 Mbit/s link.
const MAX_HELD: usize = 64 << 20;

/// One held send (a datagram, or a GSO batch of them).
#[derive(Debug)]
pub struct Held {
    pub due: Instant,
    pub destination: SocketAddr,
    pub ecn: Option<EcnCodepoint>,
    pub contents: Vec<u8>,
    pub segment_size: Option<usize>,
    pub src_ip: Option<IpAddr>,
}

impl Held {
    pub fn transmit(&self) -> Transmit<'_> {
        Transmit {
            destination: self.destination,
            ecn: self.ecn,
            contents: &self.contents,
            segment_size: self.segment_size,
            src_ip: self.src_ip,
        }
    }
}

/// The held sends, oldest first. Each waits the delay in force when it was held, and none
/// leaves before one held earlier, so a changed delay never reorders the link.
#[derive(Debug, Default)]
pub struct DelayLine {
    nanos: AtomicU64,
    queue: Mutex<Queue>,
    /// Woken when the queue stops being empty, or the socket is gone.
    pub woken: tokio::sync::Notify,
    /// Whether the task that sends held datagrams runs (started on the first delay set).
    pub started: AtomicBool,
}

#[derive(Debug, Default)]
struct Queue {
    held: VecDeque<Held>,
    bytes: usize,
    /// One was taken to be sent and is not out yet (its socket's buffer may be full): later
    /// sends must still queue behind it.
    sending: bool,
}

impl DelayLine {
    /// The delay now in force; zero sends at once.
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Relaxed))
    }

    pub fn set(&self, delay: Duration) {
        self.nanos.store(delay.as_nanos().min(u64::MAX.into()) as u64, Relaxed);
    }

    /// Whether sends are held: a delay is set, or datagrams held under an earlier one are
    /// still queued (a send overtaking them would reorder the link).
    pub fn holding(&self) -> bool {
        let q = self.queue.lock().expect("delay line lock");
        !self.delay().is_zero() || !q.held.is_empty() || q.sending
    }

    /// Holds a copy of `t` until `now + delay`; false when the line is full and it was dropped.
    pub fn hold(&self, t: &Transmit, now: Instant) -> bool {
        let mut q = self.queue.lock().expect("delay line lock");
        if q.bytes + t.contents.len() > MAX_HELD {
            return false;
        }
        q.bytes += t.contents.len();
        let was_empty = q.held.is_empty();
        // Never due before the one ahead of it, should the delay have shrunk meanwhile.
        let due = q.held.back().map_or(now + self.delay(), |last| last.due.max(now + self.delay()));
        q.held.push_back(Held {
            due,
            destination: t.destination,
            ecn: t.ecn,
            contents: t.contents.to_vec(),
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        });
        drop(q);
        // The sender sleeps until the front's due time, which a later send cannot move.
        if was_empty {
            self.woken.notify_one();
        }
        true
    }

    /// The oldest held send if it is due at `now`, else when the next one is (None: empty).
    /// A send taken counts as held until [`DelayLine::sent`].
    pub fn next(&self, now: Instant) -> Result<Held, Option<Instant>> {
        let mut q = self.queue.lock().expect("delay line lock");
        match q.held.front() {
            Some(h) if h.due <= now => {
                let h = q.held.pop_front().expect("front exists");
                q.bytes -= h.contents.len();
                q.sending = true;
                Ok(h)
            }
            Some(h) => Err(Some(h.due)),
            None => Err(None),
        }
    }

    /// The send last taken by [`DelayLine::next`] is out (or dropped).
    pub fn sent(&self) {
        self.queue.lock().expect("delay line lock").sending = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(contents: &[u8]) -> Transmit<'_> {
        Transmit { destination: "127.0.0.1:9".parse().unwrap(), ecn: None, contents, segment_size: None, src_ip: None }
    }

    #[test]
    fn sends_are_held_for_the_delay_in_order_and_a_full_line_drops() {
        let line = DelayLine::default();
        line.set(Duration::from_millis(25));
        let t0 = Instant::now();
        assert!(line.hold(&transmit(b"one"), t0));
        assert!(line.hold(&transmit(b"two"), t0 + Duration::from_millis(1)));
        assert_eq!(line.next(t0).unwrap_err(), Some(t0 + Duration::from_millis(25)), "nothing due yet");
        let later = t0 + Duration::from_millis(30);
        assert_eq!(line.next(later).unwrap().contents, b"one");
        assert!(line.holding(), "one taken but not out yet: later sends queue behind it");
        line.sent();
        assert_eq!(line.next(later).unwrap().contents, b"two");
        line.sent();
        assert_eq!(line.next(later).unwrap_err(), None, "empty");
        // A shorter delay set meanwhile does not let a later send overtake an earlier one.
        line.set(Duration::from_millis(100));
        assert!(line.hold(&transmit(b"slow"), t0));
        line.set(Duration::from_millis(1));
        assert!(line.hold(&transmit(b"fast"), t0));
        assert_eq!(line.next(t0 + Duration::from_millis(50)).unwrap_err(), Some(t0 + Duration::from_millis(100)));
        let late = t0 + Duration::from_millis(100);
        assert_eq!(line.next(late).unwrap().contents, b"slow");
        line.sent();
        assert_eq!(line.next(late).unwrap().contents, b"fast");
        line.sent();
        line.set(Duration::from_millis(25));
        // Past MAX_HELD bytes held, a send is dropped, as a full router queue drops.
        let big = vec![0u8; MAX_HELD / 2];
        assert!(line.hold(&transmit(&big), t0) && line.hold(&transmit(&big), t0));
        assert!(!line.hold(&transmit(b"x"), t0), "over the bound");
        assert!(line.next(later).is_ok(), "draining makes room");
        line.sent();
        assert!(line.hold(&transmit(b"x"), t0));
        // Delay off while datagrams are still held: sends keep holding, in order, until drained.
        line.set(Duration::ZERO);
        assert!(line.holding(), "held datagrams remain");
        while line.next(later).is_ok() {
            line.sent();
        }
        assert!(!line.holding(), "drained and off");
    }
}
