//! Circuit breaking by concurrency, as Envoy does: at most `max_requests` requests to a
//! service in flight from this node; past that, requests fail at once with 503 instead of
//! queueing behind a service that is already saturated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// In-flight requests per service.
#[derive(Debug, Default)]
pub struct Breakers {
    inflight: HashMap<String, u32>,
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
        let n = b.inflight.entry(service.to_string()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Permit { breakers: this.clone(), service: service.to_string() })
    }

    pub fn inflight(&self, service: &str) -> u32 {
        self.inflight.get(service).copied().unwrap_or(0)
    }

    /// Services at their limit now: the open circuits.
    pub fn open(&self, max_of: impl Fn(&str) -> u32) -> usize {
        self.inflight.iter().filter(|(s, n)| **n >= max_of(s)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
