//! Every bound a peer or a client can push against, in one place: the `[limits]` table of
//! the agent config. Defaults are safe for a cluster of a few hundred nodes; each field has
//! a range outside which an agent would either break honest traffic or stop protecting
//! itself, and a value outside it is refused with the field named.

use std::time::Duration;

use serde::Deserialize;
use trellis_proto::limits as wire;

/// The resolved bounds of one agent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message a peer may send on a stream (policy sync batches, large gossip), bytes.
    pub max_stream_message: usize,
    /// Largest QUIC datagram accepted from a peer, bytes. Larger ones are dropped and counted.
    pub max_datagram: usize,
    /// Streams a peer may have open at once on one connection, per direction type.
    pub max_concurrent_bidi_streams: u32,
    pub max_concurrent_uni_streams: u32,
    /// What one service stream from a peer may have in flight unread, bytes: a stream moves
    /// at most this per round trip (quinn's 1.25 MB default held a stream to 25 MB/s at a
    /// 50 ms RTT), and buffers at most this when its far end stops reading.
    pub stream_receive_window: u64,
    /// The same for all streams of one peer connection together, and what this agent keeps
    /// unacknowledged towards one peer: the memory a stalled peer can hold here.
    pub connection_receive_window: u64,
    /// A peer's unidirectional stream must be complete within this time, or it is reset
    /// (a peer trickling bytes would otherwise hold a stream slot for ever).
    #[serde(with = "humantime_serde")]
    pub stream_read_timeout: Duration,
    /// Outgoing messages queued for a peer while its connection is being set up.
    pub max_pending_per_peer: usize,
    /// A silent peer connection is closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Inbound peer connections, in all and from one IP address.
    pub max_peer_connections: usize,
    pub max_peer_connections_per_ip: usize,
    /// Messages (datagrams and stream messages) taken from one peer connection per second,
    /// with bursts of twice that; the rest are dropped and counted.
    pub peer_messages_per_second: u32,
    /// Open client connections to the HTTP proxy and to the API, each, in all and from one
    /// IP address.
    pub max_client_connections: usize,
    pub max_client_connections_per_ip: usize,
    /// An HTTP/1 client must finish sending its request headers within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stream_message: wire::MAX_STREAM_MESSAGE,
            max_datagram: wire::MAX_DATAGRAM,
            max_concurrent_bidi_streams: 256,
            max_concurrent_uni_streams: 64,
            stream_receive_window: 16 << 20,
            connection_receive_window: 24 << 20,
            stream_read_timeout: Duration::from_secs(10),
            max_pending_per_peer: 64,
            idle_timeout: Duration::from_secs(30),
            max_peer_connections: 1024,
            max_peer_connections_per_ip: 16,
            peer_messages_per_second: 2000,
            max_client_connections: 4096,
            max_client_connections_per_ip: 1024,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// The keep-alive the transport sends on idle connections; the idle timeout must leave room
/// for two of them, or honest idle peers would be cut.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

impl Limits {
    /// Checks every field against its range; each problem names `limits.<field>`.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut range = |field: &str, v: u64, lo: u64, hi: u64, why: &str| {
            if v < lo || v > hi {
                problems.push(format!("limits.{field}: {v} is outside {lo}..={hi} ({why})"));
            }
        };
        range(
            "max_stream_message",
            self.max_stream_message as u64,
            256 * 1024,
            wire::MAX_STREAM_MESSAGE as u64,
            "bytes; the decoders cap at 4 MiB, and policy sync batches need 256 KiB",
        );
        range(
            "max_datagram",
            self.max_datagram as u64,
            wire::MAX_DATAGRAM as u64,
            65_527,
            "bytes; peers send datagrams of up to 1100 bytes",
        );
        range("max_concurrent_bidi_streams", self.max_concurrent_bidi_streams.into(), 1, 65_536, "streams");
        range("max_concurrent_uni_streams", self.max_concurrent_uni_streams.into(), 1, 65_536, "streams");
        let window = "bytes, 64 KiB..1 GiB; a stream moves at most its window per round trip";
        range("stream_receive_window", self.stream_receive_window, 64 << 10, 1 << 30, window);
        range("connection_receive_window", self.connection_receive_window, 64 << 10, 1 << 30, window);
        range("max_pending_per_peer", self.max_pending_per_peer as u64, 1, 65_536, "messages");
        range("max_peer_connections", self.max_peer_connections as u64, 1, 1_000_000, "connections");
        range("max_peer_connections_per_ip", self.max_peer_connections_per_ip as u64, 1, 1_000_000, "connections");
        range("peer_messages_per_second", self.peer_messages_per_second.into(), 100, 10_000_000, "messages/s");
        range("max_client_connections", self.max_client_connections as u64, 1, 1_000_000, "connections");
        range("max_client_connections_per_ip", self.max_client_connections_per_ip as u64, 1, 1_000_000, "connections");
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        range("stream_read_timeout", ms(self.stream_read_timeout), 100, 600_000, "milliseconds, 100ms..10min");
        range("idle_timeout", ms(self.idle_timeout), 2 * ms(KEEP_ALIVE), 3_600_000, "milliseconds, 10s..1h");
        range("header_read_timeout", ms(self.header_read_timeout), 100, 600_000, "milliseconds, 100ms..10min");
        if self.connection_receive_window < self.stream_receive_window {
            problems.push(format!(
                "limits.connection_receive_window: {} is below stream_receive_window {} (one stream could never fill its window; raise it)",
                self.connection_receive_window, self.stream_receive_window
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_wire_caps() {
        let l = Limits::default();
        assert_eq!(l.validate(), Ok(()));
        assert_eq!(l.max_stream_message, wire::MAX_STREAM_MESSAGE);
        assert_eq!(l.max_datagram, wire::MAX_DATAGRAM);
    }

    #[test]
    fn out_of_range_values_name_the_field_and_the_range() {
        let l = Limits {
            max_stream_message: 10,
            max_concurrent_uni_streams: 0,
            idle_timeout: Duration::from_secs(1),
            ..Limits::default()
        };
        let errs = l.validate().unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        let windows =
            Limits { stream_receive_window: 1 << 20, connection_receive_window: 1 << 10, ..Limits::default() };
        let werrs = windows.validate().unwrap_err();
        assert_eq!(werrs.len(), 2, "{werrs:?}");
        let huge = Limits { stream_receive_window: 2 << 30, connection_receive_window: 2 << 30, ..Limits::default() };
        let herrs = huge.validate().unwrap_err();
        assert_eq!(herrs.len(), 2, "{herrs:?}");
        assert!(herrs[0].starts_with("limits.stream_receive_window: 2147483648 is outside"), "{herrs:?}");
        assert!(
            werrs[0].starts_with("limits.connection_receive_window: 1024 is outside 65536..=1073741824"),
            "{werrs:?}"
        );
        assert!(werrs[1].contains("is below stream_receive_window 1048576"), "{werrs:?}");
        assert!(errs[0].starts_with("limits.max_stream_message: 10 is outside 262144..=4194304"), "{errs:?}");
        assert!(errs[1].starts_with("limits.max_concurrent_uni_streams: 0 is outside 1..=65536"), "{errs:?}");
        assert!(errs[2].starts_with("limits.idle_timeout: 1000 is outside 10000..=3600000"), "{errs:?}");
    }
}
