//! The rate limiter's clock settings, shared by the node side and the owner side.

use std::time::Duration;

/// ExchangeTiming of the exchange. The defaults give a reaction to a load step of about two ticks.
#[derive(Clone, Debug)]
pub struct ExchangeTiming {
    /// How often demand is reported (and shares renewed).
    pub tick: Duration,
    /// A report older than this no longer counts at the owner.
    pub stale: Duration,
    /// How long a granted share holds without renewal before the node falls back to an even
    /// split of its side's limit.
    pub lease: Duration,
    /// How long a crashed member's share stays held (see [`super::side::SideView`]).
    pub down_grace: Duration,
    /// Keys idle this long stop being reported; idle much longer, they are forgotten.
    pub idle_after: Duration,
    /// Keys one node tracks at most; beyond that new values share one overflow bucket.
    pub max_keys: usize,
    /// A bucket holds at least this long of its rate (see `capacity` in the limiter).
    pub smoothing: Duration,
    /// Weight of the newest tick in the demand estimate (see `estimate` in the limiter).
    pub demand_weight: f64,
}

impl Default for ExchangeTiming {
    fn default() -> ExchangeTiming {
        ExchangeTiming {
            tick: Duration::from_millis(50),
            stale: Duration::from_millis(150),
            lease: Duration::from_millis(300),
            down_grace: Duration::from_secs(5),
            idle_after: Duration::from_secs(1),
            max_keys: 100_000,
            smoothing: Duration::from_millis(250),
            demand_weight: 0.25,
        }
    }
}
