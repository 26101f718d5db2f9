//! SWIM timing profiles. LAN is the default; WAN tolerates long, lossy paths; `fast` is for
//! tests and local development, where a crash should be noticed in about a second.

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The timing knobs an operator may set; anything unset comes from the profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    /// How often each node probes one random member.
    #[serde(with = "humantime_serde")]
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others to probe indirectly.
    #[serde(with = "humantime_serde")]
    pub probe_rtt: Duration,
    /// How long a suspect member has to refute before it is declared down.
    #[serde(with = "humantime_serde")]
    pub suspect_to_down_after: Duration,
    /// How long a down member is remembered (and listed) before it is forgotten.
    #[serde(with = "humantime_serde")]
    pub remove_down_after: Duration,
    /// How often fresh updates are pushed to a few random members.
    #[serde(with = "humantime_serde")]
    pub gossip_interval: Duration,
    /// How many members each gossip round goes to.
    pub gossip_fanout: usize,
    /// How often to re-announce to a random member, which heals partitions.
    #[serde(with = "humantime_serde")]
    pub announce_interval: Duration,
    /// How often each node compares policy with one random member (anti-entropy).
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// How long a policy delete (tombstone) is kept before it may be collected.
    #[serde(with = "humantime_serde")]
    pub tombstone_grace: Duration,
}

impl std::str::FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Profile, String> {
        match s {
            "lan" => Ok(Profile::Lan),
            "wan" => Ok(Profile::Wan),
            "fast" => Ok(Profile::Fast),
            _ => Err(format!("{s:?} is not a timing profile; use one of {}", Profile::NAMES.join(", "))),
        }
    }
}

/// Named timing profiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Lan,
    Wan,
    Fast,
}

impl Profile {
    pub const NAMES: [&'static str; 3] = ["lan", "wan", "fast"];

    pub fn timing(self) -> Timing {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        match self {
            // A probe every 500 ms: the worst crash detection of 20 trials at N = 1000 is
            // 6.4 s (simulator, BENCHMARKS.md), against 11.9 s with 1 s probes, for 237
            // rather than 137 B/s of gossip per node, and still no false downs at 5% loss.
            Profile::Lan => Timing {
                probe_period: ms(500),
                probe_rtt: ms(200),
                suspect_to_down_after: s(3),
                remove_down_after: s(15 * 60),
                gossip_interval: ms(200),
                gossip_fanout: 3,
                announce_interval: s(30),
                sync_interval: s(5),
                tombstone_grace: s(10 * 60),
            },
            Profile::Wan => Timing {
                probe_period: s(5),
                probe_rtt: s(3),
                suspect_to_down_after: s(20),
                remove_down_after: s(60 * 60),
                gossip_interval: ms(500),
                gossip_fanout: 4,
                announce_interval: s(60),
                sync_interval: s(15),
                tombstone_grace: s(30 * 60),
            },
            Profile::Fast => Timing {
                probe_period: ms(250),
                probe_rtt: ms(100),
                suspect_to_down_after: ms(750),
                remove_down_after: s(120),
                gossip_interval: ms(50),
                gossip_fanout: 3,
                announce_interval: s(5),
                sync_interval: s(1),
                tombstone_grace: s(5),
            },
        }
    }
}

impl Timing {
    /// Refuses settings with which SWIM cannot work; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.probe_period.is_zero() {
            return Err("timing.probe_period must be above zero (e.g. \"1s\")".into());
        }
        if self.probe_rtt >= self.probe_period {
            return Err(format!(
                "timing.probe_rtt ({:?}) must be shorter than timing.probe_period ({:?})",
                self.probe_rtt, self.probe_period
            ));
        }
        if self.suspect_to_down_after < self.probe_period {
            return Err("timing.suspect_to_down_after must be at least one probe_period".into());
        }
        if self.gossip_fanout == 0 || self.gossip_interval.is_zero() {
            return Err("timing.gossip_fanout and timing.gossip_interval must be above zero".into());
        }
        Ok(())
    }

    /// The foca configuration these settings stand for.
    pub fn foca_config(&self, expected_cluster_size: u32) -> foca::Config {
        let size = std::num::NonZeroU32::new(expected_cluster_size.max(1)).expect("max(1)");
        let nz = |n: usize| NonZeroUsize::new(n.max(1)).expect("max(1)");
        let mut c = foca::Config::new_lan(size);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.suspect_to_down_after = self.suspect_to_down_after;
        c.remove_down_after = Some(self.remove_down_after);
        c.max_packet_size = nz(trellis_proto::limits::MAX_GOSSIP_PACKET);
        c.max_transmissions = max_transmissions(expected_cluster_size);
        c.notify_down_members = true;
        c.periodic_gossip =
            Some(foca::PeriodicParams { frequency: self.gossip_interval, num_members: nz(self.gossip_fanout) });
        c.periodic_announce = Some(foca::PeriodicParams { frequency: self.announce_interval, num_members: nz(1) });
        c.periodic_announce_to_down_members =
            Some(foca::PeriodicParams { frequency: self.announce_interval * 2, num_members: nz(2) });
        c
    }
}

/// How many times each update is piggybacked. foca's default (4 log10 N) leaves a few
/// (viewer, member) pairs unaware of each other at N = 200 in the simulator; twice that
/// reached every node in every seeded run we tried, for a few bytes more per packet.
fn max_transmissions(cluster_size: u32) -> std::num::NonZeroU8 {
    let tx = (8.0 * f64::from(cluster_size.max(1) + 1).log10()).ceil().clamp(6.0, 60.0);
    std::num::NonZeroU8::new(tx as u8).expect("clamped above zero")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_valid() {
        for p in [Profile::Lan, Profile::Wan, Profile::Fast] {
            p.timing().validate().unwrap();
        }
    }

    #[test]
    fn rtt_longer_than_period_is_refused_by_name() {
        let t = Timing { probe_rtt: Duration::from_secs(5), ..Profile::Lan.timing() };
        assert!(t.validate().unwrap_err().contains("timing.probe_rtt"));
    }
}
