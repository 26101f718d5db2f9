//! Idle upstream connections kept for reuse, by instance. Reusing one skips the QUIC
//! stream open, the far agent's answer and its TCP connect: a round trip and two
//! handshakes per request. Plain logic over any connection type; the caller says whether a
//! connection is still usable, and the time comes in as an argument.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// At most `max_per_key` idle connections per instance, none older than `max_idle`.
pub struct IdlePool<C> {
    idle: HashMap<String, Vec<(C, Instant)>>,
    max_per_key: usize,
    max_idle: Duration,
}

impl<C> IdlePool<C> {
    pub fn new(max_per_key: usize, max_idle: Duration) -> Self {
        IdlePool { idle: HashMap::new(), max_per_key, max_idle }
    }

    /// The most recently returned connection to `key` that `usable` accepts; stale and
    /// unusable ones met on the way are dropped. Newest first keeps few connections hot,
    /// so the rest age out.
    pub fn take(&mut self, key: &str, now: Instant, usable: impl Fn(&C) -> bool) -> Option<C> {
        let list = self.idle.get_mut(key)?;
        let mut found = None;
        while let Some((conn, since)) = list.pop() {
            if now.saturating_duration_since(since) <= self.max_idle && usable(&conn) {
                found = Some(conn);
                break;
            }
        }
        if list.is_empty() {
            self.idle.remove(key);
        }
        found
    }

    /// Keeps `conn` for reuse; false (and `conn` is dropped) when `key` already holds
    /// its maximum. Connections idle too long are dropped from every key here, so the
    /// pool never needs a timer of its own.
    pub fn put(&mut self, key: &str, conn: C, now: Instant) -> bool {
        let max_idle = self.max_idle;
        self.idle.retain(|_, list| {
            list.retain(|(_, since)| now.saturating_duration_since(*since) <= max_idle);
            !list.is_empty()
        });
        let list = super::keyed::at(&mut self.idle, key, Default::default);
        if list.len() >= self.max_per_key {
            return false;
        }
        list.push((conn, now));
        true
    }

    /// Idle connections held, over all keys.
    pub fn len(&self) -> usize {
        self.idle.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.idle.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(30);

    #[test]
    fn the_newest_connection_is_reused_first() {
        let t = Instant::now();
        let mut p = IdlePool::new(4, IDLE);
        assert!(p.put("web-1", 1, t));
        assert!(p.put("web-1", 2, t + Duration::from_secs(1)));
        assert_eq!(p.take("web-1", t + Duration::from_secs(2), |_| true), Some(2));
        assert_eq!(p.take("web-1", t + Duration::from_secs(2), |_| true), Some(1));
        assert_eq!(p.take("web-1", t + Duration::from_secs(2), |_| true), None);
        assert!(p.is_empty());
    }

    #[test]
    fn instances_do_not_share_connections() {
        let t = Instant::now();
        let mut p = IdlePool::new(4, IDLE);
        p.put("web-1", 1, t);
        assert_eq!(p.take("web-2", t, |_| true), None);
        assert_eq!(p.take("web-1", t, |_| true), Some(1));
    }

    #[test]
    fn closed_and_stale_connections_are_dropped_not_returned() {
        let t = Instant::now();
        let mut p = IdlePool::new(8, IDLE);
        p.put("web-1", 1, t);
        p.put("web-1", 2, t + Duration::from_secs(20));
        p.put("web-1", 3, t + Duration::from_secs(25));
        // 3 is closed, 1 is older than the idle limit at t+40: only 2 is usable.
        assert_eq!(p.take("web-1", t + Duration::from_secs(40), |&c| c != 3), Some(2));
        assert_eq!(p.len(), 1, "1 is still held: take stops at the first usable one");
        assert_eq!(p.take("web-1", t + Duration::from_secs(40), |_| true), None);
        assert!(p.is_empty());
    }

    #[test]
    fn a_full_instance_refuses_more_and_put_sweeps_stale_keys() {
        let t = Instant::now();
        let mut p = IdlePool::new(2, IDLE);
        assert!(p.put("a", 1, t) && p.put("a", 2, t));
        assert!(!p.put("a", 3, t), "the third idle connection is refused");
        assert!(p.put("b", 4, t + Duration::from_secs(31)), "a's two went stale and were swept");
        assert_eq!(p.len(), 1);
    }
}
