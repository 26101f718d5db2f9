//! Request ids and W3C trace context (`traceparent`) across hops: each agent a request passes
//! through continues the caller's trace with a span of its own, or starts one. Ids come from
//! the caller's random source, so every rule here is tested with fixed bytes.

use super::access_log::Side;

/// The header W3C Trace Context names.
pub const TRACEPARENT: &str = "traceparent";
/// The request id header Envoy and most proxies use.
pub const REQUEST_ID: &str = "x-request-id";
/// Longest `x-request-id` kept from a client; a longer one is replaced (it is logged on every
/// hop, so a client must not make log lines arbitrarily long).
pub const MAX_REQUEST_ID: usize = 128;

/// A parsed `traceparent`: version 00, a 16-byte trace id, the 8-byte id of the span that
/// sent it, and the flags (bit 0: sampled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses the header as the W3C spec reads it: lowercase hex, non-zero ids, version 00
    /// exactly (a later version's first four fields also parse, its tail is ignored); None
    /// for anything else, and the hop then starts a new trace.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let v = value.trim();
        let mut parts = v.split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let future = version != "00";
        if version.len() != 2 || version == "ff" || !lower_hex(version) || (!future && parts.next().is_some()) {
            return None;
        }
        let p =
            TraceParent { trace_id: hex_array(trace)?, span_id: hex_array(span)?, flags: hex_array::<1>(flags)?[0] };
        (p.trace_id != [0; 16] && p.span_id != [0; 8]).then_some(p)
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The header value, `00-<trace id>-<span id>-<flags>`, in place: every request sends
    /// one, so it is made without allocating.
    pub fn header(&self) -> [u8; 55] {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&self.trace_id, &mut out[3..35]);
        hex_into(&self.span_id, &mut out[36..52]);
        hex_into(&[self.flags], &mut out[53..55]);
        out
    }
}

/// This hop's span of a request: the trace it belongs to, its own id, and its parent's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The span that called this hop; None at the root of a trace.
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
}

impl Hop {
    /// Continues `incoming` (a valid `traceparent`) with `span_id`, keeping its sampling
    /// decision (parent-based); without one, starts trace `trace_id`, sampled at `ratio`
    /// ([`sampled_at`]).
    pub fn next(incoming: Option<&str>, trace_id: [u8; 16], span_id: [u8; 8], ratio: f64) -> Hop {
        match incoming.and_then(TraceParent::parse) {
            Some(p) => Hop { trace_id: p.trace_id, span_id, parent: Some(p.span_id), sampled: p.sampled() },
            None => Hop { trace_id, span_id, parent: None, sampled: sampled_at(&trace_id, ratio) },
        }
    }

    /// A span under this one (an attempt of the request), in the same trace.
    pub fn child(&self, span_id: [u8; 8]) -> Hop {
        Hop { span_id, parent: Some(self.span_id), ..*self }
    }

    /// The `traceparent` this hop sends on: itself as the parent of the next.
    pub fn outgoing(&self) -> TraceParent {
        TraceParent { trace_id: self.trace_id, span_id: self.span_id, flags: u8::from(self.sampled) }
    }

    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_hex(&self) -> String {
        hex(&self.span_id)
    }

    pub fn parent_hex(&self) -> Option<String> {
        self.parent.map(|p| hex(&p))
    }
}

/// Whether a new trace is sampled at `ratio` (0 to 1): decided by its id alone, as
/// OpenTelemetry's `TraceIdRatioBased` does (the id's last 8 bytes, read as a number, below
/// `ratio` of their range), so any hop can recompute the decision from the id.
pub fn sampled_at(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
    ratio > 0.0 && (low >> 1) < (ratio * (1u64 << 63) as f64) as u64
}

/// The error a span reports for an answer with `status` (0: none came), None when it
/// succeeded. OpenTelemetry's HTTP conventions count 4xx as errors only on the calling side,
/// 5xx on both; when the proxy answered itself, its reason names the error.
pub fn span_error(side: Side, status: u16, reason: Option<&str>) -> Option<String> {
    let failed = match side {
        Side::Outbound => status == 0 || status >= 400,
        Side::Inbound => status == 0 || status >= 500,
    };
    failed.then(|| match (reason, status) {
        (Some(r), _) => r.to_string(),
        (None, 0) => "no answer".to_string(),
        (None, s) => format!("HTTP {s}"),
    })
}

/// The request id to carry: the client's when it is printable ASCII within
/// [`MAX_REQUEST_ID`], else a new one made from `fresh` (formatted as a UUID).
pub fn request_id(incoming: Option<&str>, fresh: [u8; 16]) -> Option<[u8; 36]> {
    match incoming {
        Some(id) if !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic()) => None,
        _ => Some(uuid(fresh)),
    }
}

/// A version 4 UUID from 16 random bytes, as ASCII.
pub fn uuid(mut b: [u8; 16]) -> [u8; 36] {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    for (at, range) in [(0, 0..4), (9, 4..6), (14, 6..8), (19, 8..10), (24, 10..16)] {
        let n = 2 * range.len();
        hex_into(&b[range], &mut out[at..at + n]);
    }
    out
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Lowercase hex into `out` (twice as long as `bytes`), by table: it runs on every
/// request's ids.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

fn lower_hex(s: &str) -> bool {
    s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !lower_hex(s) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text<const N: usize>(b: [u8; N]) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_w3c_example_round_trips() {
        let p = TraceParent::parse(VALID).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled());
        assert_eq!(text(p.header()), VALID);
    }

    #[test]
    fn malformed_headers_are_ignored_not_repaired() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b), None, "{b:?}");
        }
        // A later version: its first four fields are read, the rest ignored.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what").is_some());
    }

    #[test]
    fn a_hop_continues_the_callers_trace_or_starts_one() {
        let hop = Hop::next(Some(VALID), [7; 16], [9; 8], 0.0);
        assert_eq!(hop.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
        assert_eq!(hop.parent_hex().as_deref(), Some("00f067aa0ba902b7"), "the caller's span is the parent");
        assert!(hop.sampled, "the parent's sampling decision wins over ours");
        assert_eq!(text(hop.outgoing().header()), "00-4bf92f3577b34da6a3ce929d0e0e4736-0909090909090909-01");
        let root = Hop::next(Some("garbage"), [7; 16], [9; 8], 0.0);
        assert_eq!((root.trace_id, root.parent, root.sampled), ([7; 16], None, false));
        assert_eq!(text(root.outgoing().header()), format!("00-{}-{}-00", "07".repeat(16), "09".repeat(8)));
        let attempt = hop.child([5; 8]);
        assert_eq!((attempt.trace_id, attempt.parent, attempt.sampled), (hop.trace_id, Some(hop.span_id), true));
    }

    #[test]
    fn new_traces_are_sampled_by_their_id_at_the_ratio() {
        let id = |low: u64| {
            let mut t = [0xab; 16];
            t[8..].copy_from_slice(&low.to_be_bytes());
            t
        };
        assert!(sampled_at(&id(u64::MAX), 1.0) && !sampled_at(&id(0), 0.0));
        assert!(sampled_at(&id(u64::MAX / 100 - 1000), 0.01) && !sampled_at(&id(u64::MAX / 100 + 1000), 0.01));
        // Over many ids the share matches the ratio; the decision is the same every time.
        let (mut hits, mut x) = (0, 0x9e37_79b9_7f4a_7c15u64);
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            hits += usize::from(sampled_at(&id(x), 0.25));
        }
        assert!((24_000..26_000).contains(&hits), "{hits} of 100000 at 25%");
        assert!(Hop::next(None, id(1), [1; 8], 0.5).sampled && !Hop::next(None, id(u64::MAX), [1; 8], 0.5).sampled);
    }

    #[test]
    fn errors_follow_the_http_conventions_of_each_side() {
        assert_eq!(span_error(Side::Outbound, 200, None), None);
        assert_eq!(span_error(Side::Outbound, 404, None).as_deref(), Some("HTTP 404"));
        assert_eq!(span_error(Side::Inbound, 404, None), None, "a server's 4xx is the client's fault");
        assert_eq!(span_error(Side::Inbound, 403, Some("denied")), None);
        assert_eq!(span_error(Side::Inbound, 502, Some("upstream")).as_deref(), Some("upstream"));
        assert_eq!(span_error(Side::Outbound, 0, None).as_deref(), Some("no answer"));
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        assert_eq!(request_id(Some("abc-123"), [0; 16]), None);
        let made = request_id(None, [0xff; 16]).unwrap();
        assert_eq!(text(made), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(text(uuid(*b"0123456789abcdef")), "30313233-3435-4637-b839-616263646566");
        assert!(request_id(Some("has space"), [1; 16]).is_some());
        assert!(request_id(Some(&"x".repeat(MAX_REQUEST_ID + 1)), [1; 16]).is_some());
        assert!(request_id(Some(""), [1; 16]).is_some());
    }
}
