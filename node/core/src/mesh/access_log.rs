//! Access log lines: what one request through one agent was, which ones are kept (sampling,
//! errors and slow requests), and the three ways to write them (JSON, `key=value` text, and
//! Envoy's default format byte for byte, so the parsers operators already have work).

use std::fmt::Write;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Which side of the mesh wrote the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The caller's agent (its proxy or upstream listener).
    Outbound,
    /// The instance's agent.
    Inbound,
}

/// One request as an agent saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// Milliseconds since the Unix epoch when the request arrived.
    pub start_ms: u64,
    pub side: Side,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub span_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// Who called: the calling node's SPIFFE id (inbound), or the client's socket address.
    pub source: String,
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// `<id>@<node>` of the instance that answered, when one was picked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The instance's address (`ip:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// Path and query as the client sent them.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, or `TCP` for an opaque connection (which has no method, path,
    /// authority or ids).
    pub protocol: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub authority: String,
    /// 0 when no answer started (the client went away first).
    pub status: u16,
    /// Why a proxy answered in the instance's place (`x-trellis-reason`), if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub duration_ms: u64,
    /// Body bytes from the client, and to it (all bytes, for a TCP connection).
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub attempts: u32,
    /// The request headers the operator asked to log (`access_log.headers`), by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// For the Envoy format only, which always carries them: X-Forwarded-For and User-Agent.
    #[serde(skip)]
    pub envoy: EnvoyHeaders,
}

/// The request headers Envoy's default format prints.
#[derive(Clone, Debug, Default)]
pub struct EnvoyHeaders {
    pub forwarded_for: Option<String>,
    pub user_agent: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    /// `key=value` pairs, values quoted when they hold spaces or quotes.
    Text,
    /// Envoy's default access log format.
    Envoy,
}

/// Which requests get a line.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    /// Share (0..=1) of ordinary requests logged.
    pub sample: f64,
    /// Log only errors (5xx, or a proxy's own answer) and slow requests.
    pub errors_only: bool,
    /// Requests at least this slow are always logged.
    pub slow: Option<Duration>,
}

impl Default for Filter {
    fn default() -> Self {
        Filter { sample: 1.0, errors_only: false, slow: None }
    }
}

impl Filter {
    /// Errors ([`Entry::is_error`]) and slow requests are always kept; the rest by
    /// `sample`, `roll` being a uniform draw in [0, 1).
    pub fn keep(&self, error: bool, took: Duration, roll: f64) -> bool {
        let slow = self.slow.is_some_and(|s| took >= s);
        error || slow || (!self.errors_only && roll < self.sample)
    }
}

impl Entry {
    /// A 5xx, an answer that never started, or a proxy's own answer (a TCP connection has
    /// no status: only a proxy's reason makes it an error).
    pub fn is_error(&self) -> bool {
        let http_error = self.protocol != "TCP" && (self.status == 0 || self.status >= 500);
        http_error || self.reason.is_some()
    }

    /// The line, newline included.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => {
                let mut s = serde_json::to_string(self).unwrap_or_default();
                s.push('\n');
                s
            }
            Format::Text => self.text(),
            Format::Envoy => self.envoy(),
        }
    }

    fn text(&self) -> String {
        let mut s = format!("time={}", rfc3339_ms(self.start_ms));
        let side = match self.side {
            Side::Outbound => "outbound",
            Side::Inbound => "inbound",
        };
        let pairs: [(&str, Option<&str>); 13] = [
            ("side", Some(side)),
            ("request_id", Some(&self.request_id)),
            ("trace_id", Some(&self.trace_id)),
            ("span_id", Some(&self.span_id)),
            ("parent_span_id", self.parent_span_id.as_deref()),
            ("source", Some(&self.source)),
            ("service", Some(&self.service)),
            ("route", self.route.as_deref()),
            ("instance", self.instance.as_deref()),
            ("upstream", self.upstream.as_deref()),
            ("method", Some(&self.method)),
            ("path", Some(&self.path)),
            ("reason", self.reason.as_deref()),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                let _ = write!(s, " {k}={}", quoted(v));
            }
        }
        let _ = write!(
            s,
            " status={} duration_ms={} bytes_received={} bytes_sent={} attempts={}",
            self.status, self.duration_ms, self.bytes_received, self.bytes_sent, self.attempts
        );
        for (k, v) in &self.headers {
            let _ = write!(s, " header.{k}={}", quoted(v));
        }
        s.push('\n');
        s
    }

    /// `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
    /// %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    /// %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    /// "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"`, with `-` for every
    /// unset value, as Envoy writes it.
    fn envoy(&self) -> String {
        let dash = |v: Option<&str>| v.filter(|v| !v.is_empty()).unwrap_or("-").to_string();
        // Envoy prints a TCP connection's request line as `"- - -"`.
        let protocol = if self.protocol == "TCP" { "-" } else { self.protocol };
        format!(
            "[{}] \"{} {} {}\" {} {} {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"\n",
            rfc3339_ms(self.start_ms),
            dash(Some(&self.method)),
            dash(Some(&self.path)),
            protocol,
            self.status,
            response_flags(self.reason.as_deref()),
            self.bytes_received,
            self.bytes_sent,
            self.duration_ms,
            "-",
            dash(self.envoy.forwarded_for.as_deref()),
            dash(self.envoy.user_agent.as_deref()),
            dash(Some(&self.request_id)),
            dash(Some(&self.authority)),
            dash(self.upstream.as_deref()),
        )
    }
}

/// Envoy's response flag for a proxy's own answer, `-` for an instance's.
pub fn response_flags(reason: Option<&str>) -> &'static str {
    match reason {
        None => "-",
        Some("no_instance") => "UH",
        Some("unreachable" | "handshake") => "UF",
        Some("circuit_open") => "UO",
        Some("no_host") => "NR",
        Some("timeout" | "per_try_timeout") => "UT",
        Some("upstream") => "UR",
        Some("instance_gone") => "UC",
        Some("rate_limited") => "RL",
        Some("denied") => "UAEX",
        Some("retry_budget") => "URX",
        Some(_) => "-",
    }
}

/// `2016-04-15T20:17:00.310Z`, Envoy's START_TIME.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn quoted(v: &str) -> String {
    if v.is_empty() || v.contains([' ', '"', '=', '\\']) || v.chars().any(char::is_control) {
        format!("{v:?}")
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            start_ms: 1_460_751_420_310,
            side: Side::Outbound,
            request_id: "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_span_id: None,
            source: "127.0.0.1:50000".into(),
            service: "locations".into(),
            route: None,
            instance: Some("loc-1@n2".into()),
            upstream: Some("10.0.2.1:80".into()),
            method: "POST".into(),
            path: "/api/v1/locations".into(),
            protocol: "HTTP/2",
            authority: "locations".into(),
            status: 204,
            reason: None,
            duration_ms: 226,
            bytes_received: 154,
            bytes_sent: 0,
            attempts: 1,
            headers: vec![],
            envoy: EnvoyHeaders { forwarded_for: Some("10.0.35.28".into()), user_agent: Some("nsq2http".into()) },
        }
    }

    #[test]
    fn the_envoy_format_matches_envoys_documented_example() {
        // Envoy's own example line, but for %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% (Envoy's
        // own header, which Trellis does not set: `-`) and UPSTREAM_HOST without its scheme.
        assert_eq!(
            entry().render(Format::Envoy),
            "[2016-04-15T20:17:00.310Z] \"POST /api/v1/locations HTTP/2\" 204 - 154 0 226 - \"10.0.35.28\" \"nsq2http\" \"cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2\" \"locations\" \"10.0.2.1:80\"\n"
        );
        let mut e = entry();
        (e.status, e.reason, e.upstream, e.envoy) = (503, Some("no_instance".into()), None, EnvoyHeaders::default());
        let line = e.render(Format::Envoy);
        assert!(line.contains("\" 503 UH 154 0 226 - \"-\" \"-\" \"cc21"), "{line}");
        assert!(line.ends_with("\"locations\" \"-\"\n"), "{line}");
    }

    #[test]
    fn a_tcp_connection_reads_as_envoy_writes_one() {
        let mut e = entry();
        (e.method, e.path, e.protocol, e.status, e.request_id, e.authority) =
            (String::new(), String::new(), "TCP", 0, String::new(), String::new());
        e.envoy = EnvoyHeaders::default();
        assert_eq!(
            e.render(Format::Envoy),
            "[2016-04-15T20:17:00.310Z] \"- - -\" 0 - 154 0 226 - \"-\" \"-\" \"-\" \"-\" \"10.0.2.1:80\"\n"
        );
        let v: serde_json::Value = serde_json::from_str(&e.render(Format::Json)).unwrap();
        assert!(v.get("method").is_none() && v.get("request_id").is_none(), "{v}");
        assert_eq!(v["protocol"], "TCP");
    }

    #[test]
    fn json_and_text_carry_the_ids_and_leave_out_what_is_unset() {
        let v: serde_json::Value = serde_json::from_str(&entry().render(Format::Json)).unwrap();
        assert_eq!(v["request_id"], "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!((v["side"].as_str(), v["status"].as_u64()), (Some("outbound"), Some(204)));
        assert!(v.get("route").is_none() && v.get("parent_span_id").is_none());
        assert!(v.get("envoy").is_none(), "header values not asked for are never logged");
        let mut e = entry();
        e.headers = vec![("x-tenant".into(), "a b".into())];
        let t = e.render(Format::Text);
        assert!(t.starts_with("time=2016-04-15T20:17:00.310Z side=outbound request_id=cc21"), "{t}");
        assert!(
            t.ends_with(
                " status=204 duration_ms=226 bytes_received=154 bytes_sent=0 attempts=1 header.x-tenant=\"a b\"\n"
            ),
            "{t}"
        );
        assert!(!t.contains("nsq2http"));
    }

    #[test]
    fn errors_and_slow_requests_are_always_kept_the_rest_sampled() {
        let f = Filter { sample: 0.1, errors_only: false, slow: Some(Duration::from_millis(500)) };
        let ms = Duration::from_millis;
        let error = |status: u16, reason: Option<&str>, protocol: &'static str| {
            Entry { status, reason: reason.map(str::to_string), protocol, ..entry() }.is_error()
        };
        assert!(!error(200, None, "HTTP/1.1") && error(503, None, "HTTP/1.1") && error(0, None, "HTTP/2"));
        assert!(error(429, Some("rate_limited"), "HTTP/1.1"), "the proxy's own answer");
        assert!(!error(0, None, "TCP") && error(0, Some("unreachable"), "TCP"));
        assert!(f.keep(false, ms(1), 0.05));
        assert!(!f.keep(false, ms(1), 0.5));
        assert!(f.keep(true, ms(1), 0.99), "errors");
        assert!(f.keep(false, ms(600), 0.99), "slow");
        let errors = Filter { errors_only: true, ..f };
        assert!(!errors.keep(false, ms(1), 0.0));
        assert!(errors.keep(true, ms(1), 0.99));
    }
}
