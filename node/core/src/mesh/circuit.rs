//! Circuit breaking, per service and per node. By concurrency, as Envoy does: at most
//! `max_requests` requests to a service in flight from this node; past that, requests fail
//! at once with 503 instead of queueing behind a service that is already saturated. And by
//! error rate ([`RateBreaker`]): a service answering mostly 5xx is refused for a while,
//! then one probe request decides whether it closes again. Sans-IO: time is an argument.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::policy::model::CircuitBreaker;

/// In-flight requests, open connections, requests waiting for a connection, and
/// error-rate breakers, per service.
#[derive(Debug, Default)]
pub struct Breakers {
    inflight: HashMap<String, u32>,
    connections: HashMap<String, u32>,
    pending: HashMap<String, u32>,
    rates: HashMap<String, RateBreaker>,
}

/// What a [`Slot`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// An open connection to one of the service's instances (`max_connections`).
    Connection,
    /// A request waiting for a connection while all are in use (`max_pending`).
    Pending,
}

/// Held while a connection is open or a request waits for one; gives its place back
/// when dropped, and then calls `freed` so waiters look again.
pub struct Slot {
    breakers: Arc<Mutex<Breakers>>,
    service: String,
    kind: SlotKind,
    freed: Arc<dyn Fn() + Send + Sync>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut b) = self.breakers.lock() {
            if let Some(n) = b.counts(self.kind).get_mut(&self.service) {
                *n = n.saturating_sub(1);
            }
        }
        (self.freed)();
    }
}

/// What the error-rate breaker says to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Let through as the half-open probe: its answer closes or reopens the circuit.
    Probe,
    No,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// Waiting for a probe's answer, sent at `since` (another is let through if that one
    /// never answers within `open_for`).
    HalfOpen {
        since: Instant,
    },
}

/// Answers counted over a fixed window; opens when `failure_rate_percent` of at least
/// `min_requests` answers failed.
#[derive(Debug, Clone)]
pub struct RateBreaker {
    window_start: Instant,
    total: u32,
    failed: u32,
    state: State,
}

impl RateBreaker {
    pub fn new(now: Instant) -> RateBreaker {
        RateBreaker { window_start: now, total: 0, failed: 0, state: State::Closed }
    }

    pub fn admit(&mut self, now: Instant, cfg: &CircuitBreaker) -> Admit {
        match self.state {
            State::Closed => Admit::Yes,
            State::Open { until } if now < until => Admit::No,
            State::HalfOpen { since } if now < since + cfg.open_for => Admit::No,
            _ => {
                self.state = State::HalfOpen { since: now };
                Admit::Probe
            }
        }
    }

    /// One answer (`failed`: a 5xx or no answer); `probe` as [`RateBreaker::admit`] said.
    pub fn record(&mut self, now: Instant, failed: bool, probe: bool, cfg: &CircuitBreaker) {
        if probe {
            self.state = if failed { State::Open { until: now + cfg.open_for } } else { State::Closed };
            self.restart(now);
            return;
        }
        if self.state != State::Closed {
            return;
        }
        if now >= self.window_start + cfg.window {
            self.restart(now);
        }
        self.total += 1;
        self.failed += u32::from(failed);
        let rate = f64::from(self.failed) * 100.0 / f64::from(self.total);
        if cfg.failure_rate_percent > 0.0 && self.total >= cfg.min_requests && rate >= cfg.failure_rate_percent {
            self.state = State::Open { until: now + cfg.open_for };
            self.restart(now);
        }
    }

    pub fn is_open(&self, now: Instant) -> bool {
        matches!(self.state, State::Open { until } if now < until)
    }

    fn restart(&mut self, now: Instant) {
        (self.window_start, self.total, self.failed) = (now, 0, 0);
    }
}

/// Held while a request is in flight; releases its slot when dropped.
pub struct Permit {
    breakers: Arc<Mutex<Breakers>>,
    service: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut b) = self.breakers.lock() {
            if let Some(n) = b.inflight.get_mut(&self.service) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl Breakers {
    /// Takes a slot for `service`, or None when `max` are in flight (the circuit is open).
    pub fn acquire(this: &Arc<Mutex<Breakers>>, service: &str, max: u32) -> Option<Permit> {
        let mut b = this.lock().expect("breakers lock");
        let n = super::keyed::at(&mut b.inflight, service, Default::default);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Permit { breakers: this.clone(), service: service.to_string() })
    }

    /// Takes a connection or pending place for `service`, or None when `max` are taken.
    pub fn slot(
        this: &Arc<Mutex<Breakers>>,
        service: &str,
        kind: SlotKind,
        max: u32,
        freed: Arc<dyn Fn() + Send + Sync>,
    ) -> Option<Slot> {
        let mut b = this.lock().expect("breakers lock");
        let n = super::keyed::at(b.counts(kind), service, Default::default);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot { breakers: this.clone(), service: service.to_string(), kind, freed })
    }

    fn counts(&mut self, kind: SlotKind) -> &mut HashMap<String, u32> {
        match kind {
            SlotKind::Connection => &mut self.connections,
            SlotKind::Pending => &mut self.pending,
        }
    }

    /// The error-rate breaker's word on a new request to `service` (always yes when the
    /// service does not use one).
    pub fn admit(&mut self, now: Instant, service: &str, cfg: &CircuitBreaker) -> Admit {
        if cfg.failure_rate_percent <= 0.0 {
            return Admit::Yes;
        }
        super::keyed::at(&mut self.rates, service, || RateBreaker::new(now)).admit(now, cfg)
    }

    pub fn record(&mut self, now: Instant, service: &str, failed: bool, probe: bool, cfg: &CircuitBreaker) {
        if cfg.failure_rate_percent > 0.0 {
            let b = super::keyed::at(&mut self.rates, service, || RateBreaker::new(now));
            b.record(now, failed, probe, cfg);
        }
    }

    pub fn inflight(&self, service: &str) -> u32 {
        self.inflight.get(service).copied().unwrap_or(0)
    }

    /// Services at their limit now, or open on their error rate: the open circuits.
    pub fn open(&self, max_of: impl Fn(&str) -> u32) -> usize {
        let now = Instant::now();
        let full = self.inflight.iter().filter(|(s, n)| **n >= max_of(s)).map(|(s, _)| s);
        let failing = self.rates.iter().filter(|(_, b)| b.is_open(now)).map(|(s, _)| s);
        full.chain(failing).collect::<std::collections::HashSet<_>>().len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg() -> CircuitBreaker {
        CircuitBreaker {
            failure_rate_percent: 50.0,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            ..CircuitBreaker::default()
        }
    }

    #[test]
    fn connection_and_pending_places_are_capped_and_given_back() {
        let b = Arc::new(Mutex::new(Breakers::default()));
        let freed = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let f = freed.clone();
        let on_free: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let conn = Breakers::slot(&b, "web", SlotKind::Connection, 1, on_free.clone()).unwrap();
        assert!(Breakers::slot(&b, "web", SlotKind::Connection, 1, on_free.clone()).is_none());
        let waiting = Breakers::slot(&b, "web", SlotKind::Pending, 1, on_free.clone()).unwrap();
        assert!(Breakers::slot(&b, "web", SlotKind::Pending, 1, on_free.clone()).is_none(), "pending overflow");
        assert!(Breakers::slot(&b, "api", SlotKind::Connection, 1, on_free.clone()).is_some());
        drop(conn);
        assert_eq!(freed.load(std::sync::atomic::Ordering::SeqCst), 2, "each release wakes waiters");
        assert!(Breakers::slot(&b, "web", SlotKind::Connection, 1, on_free.clone()).is_some());
        drop(waiting);
    }

    #[test]
    fn opens_on_error_rate_then_one_probe_closes_or_reopens_it() {
        let (t0, c) = (Instant::now(), cfg());
        let mut b = RateBreaker::new(t0);
        for i in 0..9 {
            assert_eq!(b.admit(t0, &c), Admit::Yes);
            b.record(t0, i % 2 == 0, false, &c);
        }
        assert_eq!(b.admit(t0, &c), Admit::Yes, "nine answers are below min_requests");
        b.record(t0, true, false, &c);
        assert_eq!(b.admit(t0, &c), Admit::No, "6 of 10 failed");
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(t1, &c), Admit::Probe);
        assert_eq!(b.admit(t1, &c), Admit::No, "one probe at a time");
        b.record(t1, true, true, &c);
        assert_eq!(b.admit(t1 + Duration::from_secs(4), &c), Admit::No, "a failed probe reopens it");
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(b.admit(t2, &c), Admit::Probe);
        b.record(t2, false, true, &c);
        assert_eq!(b.admit(t2, &c), Admit::Yes, "a good probe closes it");
    }

    #[test]
    fn a_lost_probe_is_replaced_and_old_windows_are_forgotten() {
        let (t0, c) = (Instant::now(), cfg());
        let mut b = RateBreaker::new(t0);
        for _ in 0..4 {
            b.record(t0, true, false, &c);
        }
        let later = t0 + Duration::from_secs(11);
        for _ in 0..9 {
            b.record(later, false, false, &c);
        }
        b.record(later, true, false, &c);
        assert_eq!(b.admit(later, &c), Admit::Yes, "1 of 10 in this window");
        let mut b = RateBreaker::new(t0);
        for _ in 0..10 {
            b.record(t0, true, false, &c);
        }
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(t1, &c), Admit::Probe);
        assert_eq!(b.admit(t1 + Duration::from_secs(5), &c), Admit::Probe, "the first probe never answered");
    }

    #[test]
    fn the_circuit_opens_at_max_and_closes_as_requests_finish() {
        let b = Arc::new(Mutex::new(Breakers::default()));
        let held: Vec<Permit> = (0..3).map(|_| Breakers::acquire(&b, "web", 3).unwrap()).collect();
        assert!(Breakers::acquire(&b, "web", 3).is_none(), "the fourth request is refused");
        assert!(Breakers::acquire(&b, "api", 3).is_some(), "other services are not affected");
        assert_eq!(b.lock().unwrap().open(|_| 3), 1);
        drop(held);
        assert_eq!(b.lock().unwrap().inflight("web"), 0);
        assert!(Breakers::acquire(&b, "web", 3).is_some());
    }
}
