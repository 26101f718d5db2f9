//! The policy object model: typed, validated, with defaults for everything but the
//! essentials. The same parse-and-validate runs on the API and on every object a peer sends.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rollout::{self, Rollout, RolloutStatus};

/// The kinds of policy objects, as they appear in API paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Services,
    Subsets,
    Routes,
    Splits,
    Ratelimits,
    Intentions,
    Settings,
    /// Service instances registered on nodes: per-node state, written only by its node.
    Instances,
    /// Revoked node identities, by node name: refused at every handshake.
    Revocations,
    /// Progressive rollouts (canaries), as the operator asks for them.
    Rollouts,
    /// Where each rollout is, written by the agent driving it (and operators' commands).
    Rolloutstatus,
}

impl Kind {
    /// Kinds the operator API may not write: each object belongs to the node that wrote it.
    pub fn node_owned(self) -> bool {
        self == Kind::Instances
    }

    pub const ALL: [Kind; 11] = [
        Kind::Services,
        Kind::Subsets,
        Kind::Routes,
        Kind::Splits,
        Kind::Ratelimits,
        Kind::Intentions,
        Kind::Settings,
        Kind::Instances,
        Kind::Revocations,
        Kind::Rollouts,
        Kind::Rolloutstatus,
    ];

    /// Kinds whose writer matters, so their versions carry a signed writer proof: a node's
    /// own instances, and revocations (which the revoked node must not undo).
    pub fn is_attributed(self) -> bool {
        matches!(self, Kind::Instances | Kind::Revocations)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Services => "services",
            Kind::Subsets => "subsets",
            Kind::Routes => "routes",
            Kind::Splits => "splits",
            Kind::Ratelimits => "ratelimits",
            Kind::Intentions => "intentions",
            Kind::Settings => "settings",
            Kind::Instances => "instances",
            Kind::Revocations => "revocations",
            Kind::Rollouts => "rollouts",
            Kind::Rolloutstatus => "rolloutstatus",
        }
    }

    pub fn parse(s: &str) -> Result<Kind, FieldError> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| FieldError {
            path: "kind".into(),
            message: format!("unknown policy kind {s:?}"),
            fix: "use one of services, subsets, routes, splits, ratelimits, intentions, settings, revocations, rollouts, rolloutstatus".into(),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validation error: the field path, what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldError {}

fn err(path: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> FieldError {
    FieldError { path: path.into(), message: message.into(), fix: fix.into() }
}

/// Largest encoded policy object accepted from anyone.
pub const MAX_OBJECT_BYTES: usize = 64 * 1024;

/// Object names: DNS-label-like, so they fit in paths, metrics and hostnames.
pub fn validate_name(kind: Kind, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c) || (kind == Kind::Instances && c == '@')
        })
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok {
        return Err(err(
            format!("{kind}.{name}"),
            "invalid object name",
            "use 1-63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit",
        ));
    }
    if kind == Kind::Settings && name != "mesh" {
        return Err(err(
            format!("settings.{name}"),
            "the only settings object is `mesh`",
            "PUT /v1/policy/settings/mesh",
        ));
    }
    Ok(())
}

mod dur {
    pub use humantime_serde::{deserialize, serialize};
}

fn d(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Http2,
    Grpc,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    Random,
    Weighted,
    LeastRequest,
    PeakEwma,
    RingHash,
    Maglev,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadBalancing {
    pub policy: LbPolicy,
    /// Header hashed by ring_hash and maglev.
    pub hash_header: Option<String>,
    /// Prefer instances in the caller's zone, then region, then anywhere.
    pub locality: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    ConnectFailure,
    Reset,
    #[serde(rename = "5xx")]
    ServerError,
    GatewayError,
    Timeout,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    #[serde(with = "humantime_serde")]
    pub per_try_timeout: Option<Duration>,
    /// Retries allowed as a share (percent) of requests...
    pub budget_percent: f64,
    /// ...plus this many per second regardless.
    pub min_retries_per_second: u32,
    #[serde(with = "dur")]
    pub backoff_base: Duration,
    #[serde(with = "dur")]
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            on: vec![RetryOn::ConnectFailure, RetryOn::Reset, RetryOn::GatewayError],
            per_try_timeout: None,
            budget_percent: 20.0,
            min_retries_per_second: 10,
            backoff_base: d(25),
            backoff_max: d(250),
        }
    }
}

/// Limits on what this node sends to a service, as Envoy's thresholds, plus a breaker
/// that opens on the service's error rate and lets one probe through after `open_for`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreaker {
    /// Connections open to the service's instances (pooled HTTP and TCP streams).
    pub max_connections: u32,
    /// Requests waiting for a connection while `max_connections` are in use.
    pub max_pending: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Opens the circuit when this share (percent) of the answers within `window` were
    /// 5xx or failures; 0 turns it off.
    pub failure_rate_percent: f64,
    /// Answers within `window` needed before the rate counts.
    pub min_requests: u32,
    #[serde(with = "dur")]
    pub window: Duration,
    /// How long an open circuit refuses before one probe request is let through.
    #[serde(with = "dur")]
    pub open_for: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            max_connections: 1024,
            max_pending: 1024,
            max_requests: 1024,
            failure_rate_percent: 0.0,
            min_requests: 20,
            window: d(10_000),
            open_for: d(5_000),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    /// Gateway failures in a row that eject: no connection, a reset, no answer, or a
    /// 502, 503 or 504 (Envoy's `consecutive_gateway_failure`); 0 turns it off.
    pub consecutive_failures: u32,
    /// Any 5xx or gateway failure in a row that ejects (Envoy's `consecutive_5xx`); 0
    /// turns it off.
    pub consecutive_5xx: u32,
    #[serde(with = "dur")]
    pub base_ejection_time: Duration,
    /// Ejection time grows by this factor with each repeat ejection.
    pub ejection_growth: f64,
    pub max_ejected_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            consecutive_5xx: 5,
            base_ejection_time: d(30_000),
            ejection_growth: 2.0,
            max_ejected_percent: 50,
        }
    }
}

/// The service's defaults for its instances' checks: an instance's `check` takes each
/// value it does not set from here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckDefaults {
    #[serde(with = "dur")]
    pub interval: Duration,
    #[serde(with = "dur")]
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckDefaults {
    fn default() -> Self {
        HealthCheckDefaults { interval: d(5_000), timeout: d(1_000), healthy_threshold: 2, unhealthy_threshold: 3 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Service {
    pub protocol: Protocol,
    pub lb: LoadBalancing,
    #[serde(with = "dur")]
    pub connect_timeout: Duration,
    /// Whole-request timeout.
    #[serde(with = "dur")]
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub circuit_breaker: CircuitBreaker,
    pub outlier_detection: OutlierDetection,
    pub health_check: HealthCheckDefaults,
    /// The ports the service's virtual address listens on (`web.trellis:8080`); when
    /// empty, the ports its instances registered.
    pub ports: Vec<u16>,
}

/// Most ports one service's virtual address listens on: a bound on listeners per service.
pub const MAX_SERVICE_PORTS: usize = 16;

impl Default for Service {
    fn default() -> Self {
        Service {
            protocol: Protocol::Http,
            lb: LoadBalancing::default(),
            connect_timeout: d(2_000),
            timeout: d(15_000),
            retry: RetryPolicy::default(),
            circuit_breaker: CircuitBreaker::default(),
            outlier_detection: OutlierDetection::default(),
            health_check: HealthCheckDefaults::default(),
            ports: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    pub service: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    /// Exact value; absent means "present with any value".
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub methods: Vec<String>,
    pub headers: Vec<ValueMatch>,
    pub query: Vec<ValueMatch>,
}

/// Where a matched request goes: exactly one of the three.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Destination {
    pub service: Option<String>,
    pub subset: Option<String>,
    pub split: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The service (host) whose requests this route applies to.
    pub service: String,
    /// Routes of a service are evaluated by descending priority, then by name.
    #[serde(default)]
    pub priority: i32,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    pub destination: Destination,
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
    /// A copy of this share of the route's requests goes to a subset; its answers are
    /// discarded, and the caller never waits for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

/// Where a route's mirrored requests go, and how many.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// A `subsets/<name>` of the route's service.
    pub subset: String,
    /// Share of the route's requests mirrored, within (0, 100].
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub subset: Option<String>,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub service: String,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub service: String,
    #[serde(default)]
    pub route: Option<String>,
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: Option<u32>,
    /// `header:<name>` or `caller`: one bucket per value instead of one for all.
    #[serde(default)]
    pub per: Option<String>,
    /// `reject` (429 at once) or `delay`: a request over the limit waits for its token, up
    /// to `max_delay`, smoothing bursts into the rate (traffic shaping).
    #[serde(default)]
    pub mode: LimitMode,
    /// The longest a `delay` request waits before it is refused after all.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<Duration>,
}

/// What a rate limit does with a request over it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    #[default]
    Reject,
    Delay,
}

/// The longest `max_delay`: a request held longer is better refused and retried.
pub const MAX_LIMIT_DELAY: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// The prefix of an intention source naming a calling service rather than a node.
pub const SERVICE_SOURCE: &str = "svc:";

/// Who may call a service. `paths`, `methods` and `headers` narrow it to some HTTP
/// requests (L7): each list that is given must match (any of its paths, any of its
/// methods, all of its headers). Precedence is in [`crate::mesh::authz`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intention {
    /// Caller identity (`spiffe://<cluster>/node/<name>`), a calling service (`svc:web`,
    /// see [`Instance::run_as`]) or `*`.
    pub source: String,
    pub destination: String,
    pub action: Action,
    /// Exact paths (`/admin`), or a path and everything below it (`/api/*`, by segments).
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

impl Intention {
    /// Does it look into HTTP requests (so it cannot apply to opaque TCP streams)?
    pub fn is_l7(&self) -> bool {
        !(self.paths.is_empty() && self.methods.is_empty() && self.headers.is_empty())
    }
}

/// One running instance of a service on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub service: String,
    /// The node the instance runs on; filled in by that node's agent.
    #[serde(default)]
    pub node: String,
    pub address: std::net::IpAddr,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub weight: u32,
    /// An active health check the instance's own agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// The check's verdict, written by the instance's agent. Critical instances get no
    /// traffic; unknown ones (not checked yet, or no check) do.
    #[serde(default)]
    pub health: Health,
    /// The Unix user (name or uid) the instance runs as: local connections from that
    /// user's processes are calls by this service (`svc:<service>` in intentions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    #[default]
    Unknown,
    Passing,
    Critical,
}

/// An HTTP GET of `http` (a path) expecting `expect_status` (any 2xx when unset), or a TCP
/// connect when `tcp` is true; `rise` passes in a row make it passing, `fall` failures in a
/// row critical. Unset timings come from the service's `health_check`, then the defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    #[serde(default)]
    pub http: Option<String>,
    #[serde(default)]
    pub tcp: bool,
    #[serde(default)]
    pub expect_status: Option<u16>,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
}

/// A check's timings once the service's defaults have filled what it leaves unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckTiming {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Check {
    pub fn timing(&self, defaults: &HealthCheckDefaults) -> CheckTiming {
        CheckTiming {
            interval: self.interval.unwrap_or(defaults.interval),
            timeout: self.timeout.unwrap_or(defaults.timeout),
            rise: self.rise.unwrap_or(defaults.healthy_threshold),
            fall: self.fall.unwrap_or(defaults.unhealthy_threshold),
        }
    }
}

fn validate_timing(p: &str, t: &CheckTiming) -> Result<(), FieldError> {
    if t.interval < d(100) || t.timeout.is_zero() || t.timeout > t.interval {
        return Err(err(
            format!("{p}.interval"),
            "interval must be at least 100ms, timeout above zero and at most the interval",
            "e.g. interval \"1s\", timeout \"500ms\"",
        ));
    }
    if t.rise == 0 || t.fall == 0 {
        return Err(err(
            format!("{p}.rise"),
            "rise and fall (healthy_threshold, unhealthy_threshold) must be at least 1",
            "e.g. rise 2, fall 3",
        ));
    }
    Ok(())
}

fn validate_check(p: &str, c: &Check) -> Result<(), FieldError> {
    if c.http.is_some() == c.tcp {
        return Err(err(format!("{p}.check"), "give exactly one of http and tcp", "e.g. {\"http\": \"/healthz\"}"));
    }
    if c.http.as_deref().is_some_and(|h| !h.starts_with('/')) {
        return Err(err(format!("{p}.check.http"), "must be a path", "e.g. \"/healthz\""));
    }
    // Checked against the built-in defaults here; the service's may differ, and the
    // health shell clamps what a combination of the two makes invalid.
    validate_timing(&format!("{p}.check"), &c.timing(&HealthCheckDefaults::default()))
}

#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// What happens when no intention matches.
    pub intention_default: Action,
}

/// A revoked node identity: `revocations/<node-name>`. Every peer refuses the node's
/// certificate at the handshake and drops its connections; delete the object to undo.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Revocation {
    /// Why, for the operators reading it later.
    pub reason: Option<String>,
}

/// Longest revocation reason.
pub const MAX_REASON_LEN: usize = 256;

/// A parsed, validated object of any kind.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Object {
    Service(Service),
    Subset(Subset),
    Route(Route),
    Split(Split),
    RateLimit(RateLimit),
    Intention(Intention),
    Settings(Settings),
    Instance(Instance),
    Revocation(Revocation),
    Rollout(Rollout),
    RolloutStatus(RolloutStatus),
}

fn parse_as<T: serde::de::DeserializeOwned>(prefix: &str, json: &[u8]) -> Result<T, FieldError> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let path = if path == "." { prefix.to_string() } else { format!("{prefix}.{path}") };
        err(path, inner.to_string(), "see README.md, section Policy, for the fields and their types")
    })
}

/// Parses and validates an object body (JSON). Used for API input and peer input alike.
pub fn parse(kind: Kind, name: &str, json: &[u8]) -> Result<Object, FieldError> {
    validate_name(kind, name)?;
    let p = format!("{kind}.{name}");
    if json.len() > MAX_OBJECT_BYTES {
        return Err(err(p, format!("object is {} bytes, at most {MAX_OBJECT_BYTES}", json.len()), "split it up"));
    }
    let obj = match kind {
        Kind::Services => Object::Service(parse_as(&p, json)?),
        Kind::Subsets => Object::Subset(parse_as(&p, json)?),
        Kind::Routes => Object::Route(parse_as(&p, json)?),
        Kind::Splits => Object::Split(parse_as(&p, json)?),
        Kind::Ratelimits => Object::RateLimit(parse_as(&p, json)?),
        Kind::Intentions => Object::Intention(parse_as(&p, json)?),
        Kind::Settings => Object::Settings(parse_as(&p, json)?),
        Kind::Instances => Object::Instance(parse_as(&p, json)?),
        Kind::Revocations => Object::Revocation(parse_as(&p, json)?),
        Kind::Rollouts => Object::Rollout(parse_as(&p, json)?),
        Kind::Rolloutstatus => Object::RolloutStatus(parse_as(&p, json)?),
    };
    obj.validate(&p)?;
    Ok(obj)
}

fn validate_breaker(p: &str, b: &CircuitBreaker) -> Result<(), FieldError> {
    for (f, v) in
        [("max_connections", b.max_connections), ("max_pending", b.max_pending), ("max_requests", b.max_requests)]
    {
        if v == 0 {
            return Err(err(format!("{p}.{f}"), "must be at least 1", "a limit of 0 would refuse everything"));
        }
    }
    if !(0.0..=100.0).contains(&b.failure_rate_percent) {
        return Err(err(format!("{p}.failure_rate_percent"), "must be within 0..100", "0 turns it off"));
    }
    if b.min_requests == 0 || b.window.is_zero() || b.open_for.is_zero() {
        return Err(err(
            format!("{p}.window"),
            "min_requests, window and open_for must be above zero",
            "e.g. min_requests 20, window \"10s\", open_for \"5s\"",
        ));
    }
    Ok(())
}

/// Path rules are exact (`/admin`) or a prefix by segments (`/api/*`); `*` goes nowhere else.
fn validate_l7(p: &str, i: &Intention) -> Result<(), FieldError> {
    for (n, path) in i.paths.iter().enumerate() {
        let stem = path.strip_suffix("/*").unwrap_or(path);
        if !path.starts_with('/') || stem.contains('*') {
            return Err(err(
                format!("{p}.paths[{n}]"),
                format!("{path:?} is not a path rule"),
                "give an exact path such as \"/admin\", or \"/api/*\" for /api and everything below it",
            ));
        }
    }
    for (n, m) in i.methods.iter().enumerate() {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(err(format!("{p}.methods[{n}]"), format!("{m:?} is not an HTTP method"), "e.g. \"GET\""));
        }
    }
    for (n, h) in i.headers.iter().enumerate() {
        need(format!("{p}.headers[{n}].name"), &h.name, "header name")?;
        if let Some(re) = &h.regex {
            check_regex(format!("{p}.headers[{n}].regex"), re)?;
        }
    }
    Ok(())
}

fn need(path: String, v: &str, what: &str) -> Result<(), FieldError> {
    if v.is_empty() {
        return Err(err(path, format!("{what} is empty"), format!("name the {what}")));
    }
    Ok(())
}

fn check_regex(path: String, re: &str) -> Result<(), FieldError> {
    regex::Regex::new(re)
        .map(|_| ())
        .map_err(|e| err(path, format!("invalid regex: {e}"), "fix the regular expression"))
}

impl Object {
    /// Checks the rules that span fields (serde has checked types and names).
    pub fn validate(&self, p: &str) -> Result<(), FieldError> {
        match self {
            Object::Service(s) => {
                if s.timeout.is_zero() || s.connect_timeout.is_zero() {
                    return Err(err(format!("{p}.timeout"), "timeouts must be above zero", "e.g. \"2s\""));
                }
                if !(0.0..=100.0).contains(&s.retry.budget_percent) {
                    return Err(err(format!("{p}.retry.budget_percent"), "must be within 0..100", ""));
                }
                if s.retry.attempts > 10 {
                    return Err(err(format!("{p}.retry.attempts"), "at most 10", "retries multiply load"));
                }
                if s.outlier_detection.max_ejected_percent > 100 {
                    return Err(err(format!("{p}.outlier_detection.max_ejected_percent"), "must be within 0..100", ""));
                }
                let h = &s.health_check;
                let t = CheckTiming {
                    interval: h.interval,
                    timeout: h.timeout,
                    rise: h.healthy_threshold,
                    fall: h.unhealthy_threshold,
                };
                validate_timing(&format!("{p}.health_check"), &t)?;
                validate_breaker(&format!("{p}.circuit_breaker"), &s.circuit_breaker)?;
                if s.ports.len() > MAX_SERVICE_PORTS {
                    return Err(err(
                        format!("{p}.ports"),
                        format!("{} ports given, at most {MAX_SERVICE_PORTS}", s.ports.len()),
                        "list the ports clients dial",
                    ));
                }
                if let Some(i) = s.ports.iter().position(|&port| port == 0) {
                    return Err(err(format!("{p}.ports[{i}]"), "port 0 is not a port", "e.g. 8080"));
                }
                if matches!(s.lb.policy, LbPolicy::RingHash | LbPolicy::Maglev) && s.lb.hash_header.is_none() {
                    return Err(err(
                        format!("{p}.lb.hash_header"),
                        "hash policies need a header to hash",
                        "set lb.hash_header, e.g. \"x-user\"",
                    ));
                }
                Ok(())
            }
            Object::Subset(s) => {
                need(format!("{p}.service"), &s.service, "service")?;
                if s.labels.is_empty() {
                    return Err(err(
                        format!("{p}.labels"),
                        "a subset needs at least one label",
                        "e.g. {\"version\": \"v2\"}",
                    ));
                }
                Ok(())
            }
            Object::Route(r) => {
                need(format!("{p}.service"), &r.service, "service")?;
                if let Some(m) = &r.mirror {
                    validate_name(Kind::Subsets, &m.subset)
                        .map_err(|e| FieldError { path: format!("{p}.mirror.subset"), ..e })?;
                    if !(m.percent > 0.0 && m.percent <= 100.0) {
                        return Err(err(format!("{p}.mirror.percent"), "must be above 0 and at most 100", "e.g. 10"));
                    }
                }
                let d = &r.destination;
                let set = [&d.service, &d.subset, &d.split].iter().filter(|x| x.is_some()).count();
                if set != 1 {
                    return Err(err(
                        format!("{p}.destination"),
                        format!("{set} destinations given"),
                        "give exactly one of service, subset, split",
                    ));
                }
                if let Some(PathMatch::Regex(re)) = &r.matches.path {
                    check_regex(format!("{p}.match.path.regex"), re)?;
                }
                for (i, h) in r.matches.headers.iter().chain(&r.matches.query).enumerate() {
                    if let Some(re) = &h.regex {
                        check_regex(format!("{p}.match.headers[{i}].regex"), re)?;
                    }
                }
                Ok(())
            }
            Object::Split(s) => {
                need(format!("{p}.service"), &s.service, "service")?;
                if s.backends.is_empty() {
                    return Err(err(format!("{p}.backends"), "no backends", "list at least one backend"));
                }
                for (i, b) in s.backends.iter().enumerate() {
                    if b.service.is_some() == b.subset.is_some() {
                        return Err(err(format!("{p}.backends[{i}]"), "needs exactly one of service or subset", ""));
                    }
                }
                let sum: u64 = s.backends.iter().map(|b| u64::from(b.weight)).sum();
                if sum != 100 {
                    let last = s.backends.len() - 1;
                    return Err(err(
                        format!("{p}.backends[{last}].weight"),
                        format!("weights sum to {sum}, must be 100"),
                        "adjust the weights",
                    ));
                }
                Ok(())
            }
            Object::RateLimit(r) => {
                need(format!("{p}.service"), &r.service, "service")?;
                if !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0) {
                    return Err(err(format!("{p}.requests_per_second"), "must be a number above zero", "e.g. 1000"));
                }
                match (r.mode, r.max_delay) {
                    (LimitMode::Delay, None) => {
                        return Err(err(format!("{p}.max_delay"), "delay mode needs max_delay", "e.g. \"500ms\""));
                    }
                    (LimitMode::Reject, Some(_)) => {
                        return Err(err(
                            format!("{p}.max_delay"),
                            "max_delay applies to delay mode only",
                            "set mode = \"delay\", or drop max_delay",
                        ));
                    }
                    (_, Some(d)) if d.is_zero() || d > MAX_LIMIT_DELAY => {
                        return Err(err(
                            format!("{p}.max_delay"),
                            "must be above zero and at most 30s",
                            "e.g. \"500ms\"",
                        ));
                    }
                    _ => {}
                }
                match r.per.as_deref() {
                    None | Some("caller") => Ok(()),
                    Some(h) if h.strip_prefix("header:").is_some_and(|n| !n.is_empty()) => Ok(()),
                    Some(other) => Err(err(
                        format!("{p}.per"),
                        format!("{other:?} is not a key"),
                        "use \"caller\" or \"header:<name>\"",
                    )),
                }
            }
            Object::Intention(i) => {
                need(format!("{p}.destination"), &i.destination, "destination")?;
                validate_l7(p, i)?;
                let svc = i.source.strip_prefix(SERVICE_SOURCE);
                if svc.is_some_and(|s| validate_name(Kind::Services, s).is_err()) {
                    return Err(err(
                        format!("{p}.source"),
                        format!("{:?} does not name a service", i.source),
                        "use svc:<service>, e.g. \"svc:web\"",
                    ));
                }
                if i.source != "*" && svc.is_none() && !i.source.starts_with("spiffe://") {
                    return Err(err(
                        format!("{p}.source"),
                        format!("{:?} is not an identity", i.source),
                        "use \"*\", svc:<service> or spiffe://<cluster>/node/<name>",
                    ));
                }
                Ok(())
            }
            Object::Settings(_) => Ok(()),
            Object::Rollout(r) => validate_rollout(p, r),
            Object::RolloutStatus(s) => validate_rollout_status(p, s),
            Object::Revocation(r) => {
                if r.reason.as_ref().is_some_and(|s| s.len() > MAX_REASON_LEN || s.chars().any(char::is_control)) {
                    return Err(err(
                        format!("{p}.reason"),
                        format!("at most {MAX_REASON_LEN} bytes of printable text"),
                        "shorten the reason",
                    ));
                }
                Ok(())
            }
            Object::Instance(i) => {
                need(format!("{p}.service"), &i.service, "service")?;
                if let Some(c) = &i.check {
                    validate_check(p, c)?;
                }
                if i.port == 0 {
                    return Err(err(
                        format!("{p}.port"),
                        "port 0 is not a port",
                        "give the port the instance listens on",
                    ));
                }
                if !(1..=1000).contains(&i.weight) {
                    return Err(err(format!("{p}.weight"), "must be within 1..1000", ""));
                }
                if let Some(user) = &i.run_as {
                    let ok = !user.is_empty()
                        && user.len() <= 32
                        && user.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
                    if !ok {
                        return Err(err(
                            format!("{p}.run_as"),
                            format!("{user:?} is not a Unix user name or uid"),
                            "e.g. \"www-data\" or \"1001\"",
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

fn validate_rollout(p: &str, r: &Rollout) -> Result<(), FieldError> {
    for (field, name) in [("service", &r.service), ("stable", &r.stable), ("canary", &r.canary)] {
        let kind = if field == "service" { Kind::Services } else { Kind::Subsets };
        validate_name(kind, name).map_err(|e| FieldError { path: format!("{p}.{field}"), ..e })?;
    }
    if r.stable == r.canary {
        return Err(err(format!("{p}.canary"), "the canary is the stable subset", "name two subsets"));
    }
    let rising = r.steps.windows(2).all(|w| w[0] < w[1]);
    let bounded = r.steps.iter().all(|w| (1..=100).contains(w));
    if r.steps.is_empty() || r.steps.len() > rollout::MAX_STEPS || !rising || !bounded {
        return Err(err(
            format!("{p}.steps"),
            format!("steps must be 1 to {} rising weights within 1..100", rollout::MAX_STEPS),
            "e.g. [5, 25, 50, 100]",
        ));
    }
    if r.interval < Duration::from_secs(1) || r.interval > Duration::from_secs(24 * 3600) {
        return Err(err(format!("{p}.interval"), "must be within 1s..24h", "e.g. \"1m\""));
    }
    let a = &r.analysis;
    let pct = |v: f64| v.is_finite() && (0.0..=100.0).contains(&v);
    if !pct(a.min_success_rate) {
        return Err(err(format!("{p}.analysis.min_success_rate"), "must be within 0..100", "e.g. 99"));
    }
    if a.max_success_drop.is_some_and(|d| !pct(d)) {
        return Err(err(format!("{p}.analysis.max_success_drop"), "must be within 0..100", "e.g. 1"));
    }
    if a.max_p99.is_some_and(|d| d.is_zero()) {
        return Err(err(format!("{p}.analysis.max_p99"), "must be above zero", "e.g. \"500ms\""));
    }
    if a.min_requests == 0 {
        return Err(err(format!("{p}.analysis.min_requests"), "must be at least 1", "e.g. 20"));
    }
    Ok(())
}

fn validate_rollout_status(p: &str, s: &RolloutStatus) -> Result<(), FieldError> {
    if s.weight > 100 || s.step as usize >= rollout::MAX_STEPS {
        return Err(err(format!("{p}.weight"), "weight within 0..100 and step below 20", ""));
    }
    if s.members.len() > 4096 || s.members.iter().any(|m| m.is_empty() || m.len() > 63) {
        return Err(err(format!("{p}.members"), "at most 4096 node names", ""));
    }
    let long = |s: &str| s.len() > rollout::MAX_TEXT || s.chars().any(char::is_control);
    if long(&s.reason) || s.timeline.len() > rollout::MAX_EVENTS || s.timeline.iter().any(|e| long(&e.note)) {
        return Err(err(
            format!("{p}.timeline"),
            format!(
                "at most {} events; reasons and notes of at most {} printable bytes",
                rollout::MAX_EVENTS,
                rollout::MAX_TEXT
            ),
            "",
        ));
    }
    Ok(())
}

/// The object name of instance `id` registered on `node`.
pub fn instance_name(id: &str, node: &str) -> String {
    format!("{id}@{node}")
}

/// The node an instance name (`<id>@<node>`) says it is registered on.
pub fn instance_node(name: &str) -> Option<&str> {
    name.rsplit_once('@').map(|(_, node)| node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_sources_ports_and_run_as_are_checked_and_name_the_field() {
        let intention = |source: &str| format!(r#"{{"source": "{source}", "destination": "db", "action": "deny"}}"#);
        assert!(parse(Kind::Intentions, "x", intention("svc:batch").as_bytes()).is_ok());
        let e = parse(Kind::Intentions, "x", intention("svc:").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("source") && e.to_string().contains("svc:<service>"), "{e}");
        let e = parse(Kind::Intentions, "x", intention("batch").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("svc:<service>"), "{e}");
        assert!(parse(Kind::Services, "web", br#"{"ports": [8080, 9090]}"#).is_ok());
        let e = parse(Kind::Services, "web", br#"{"ports": [8080, 0]}"#).unwrap_err();
        assert!(e.to_string().contains("ports[1]"), "{e}");
        let many = format!(r#"{{"ports": {:?}}}"#, (1..=17).collect::<Vec<u16>>());
        assert!(parse(Kind::Services, "web", many.as_bytes()).unwrap_err().to_string().contains("at most 16"));
        let inst =
            |run_as: &str| format!(r#"{{"service": "web", "address": "127.0.0.1", "port": 80, "run_as": "{run_as}"}}"#);
        assert!(parse(Kind::Instances, "w@n", inst("www-data").as_bytes()).is_ok());
        let e = parse(Kind::Instances, "w@n", inst("a b").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("run_as"), "{e}");
    }

    #[test]
    fn delay_mode_needs_a_bounded_max_delay() {
        let rl = |extra: &str| format!(r#"{{"service": "web", "requests_per_second": 10{extra}}}"#);
        assert!(parse(Kind::Ratelimits, "x", rl(r#", "mode": "delay", "max_delay": "500ms""#).as_bytes()).is_ok());
        for (extra, want) in [
            (r#", "mode": "delay""#, "needs max_delay"),
            (r#", "max_delay": "1s""#, "delay mode only"),
            (r#", "mode": "delay", "max_delay": "31s""#, "at most 30s"),
            (r#", "mode": "delay", "max_delay": "0s""#, "above zero"),
        ] {
            let e = parse(Kind::Ratelimits, "x", rl(extra).as_bytes()).unwrap_err().to_string();
            assert!(e.contains("max_delay") && e.contains(want), "{extra}: {e}");
        }
        assert!(parse(Kind::Ratelimits, "x", rl(r#", "mode": "queue""#).as_bytes()).is_err());
    }

    #[test]
    fn rollouts_and_their_status_are_checked_field_by_field() {
        let ok = r#"{"service": "web", "stable": "v1", "canary": "v2", "steps": [5, 50, 100], "interval": "30s"}"#;
        let Object::Rollout(r) = parse(Kind::Rollouts, "web-v2", ok.as_bytes()).unwrap() else { panic!() };
        assert_eq!((r.analysis.min_success_rate, r.analysis.min_requests), (99.0, 20), "default gates");
        for (bad, field) in [
            (ok.replace("[5, 50, 100]", "[50, 5]"), "steps"),
            (ok.replace("[5, 50, 100]", "[]"), "steps"),
            (ok.replace("[5, 50, 100]", "[5, 101]"), "steps"),
            (ok.replace("\"v2\"", "\"v1\""), "canary"),
            (ok.replace("30s", "10ms"), "interval"),
            (ok.replace("}", r#", "analysis": {"min_requests": 0}}"#), "analysis.min_requests"),
            (ok.replace("}", r#", "analysis": {"min_success_rate": 101}}"#), "analysis.min_success_rate"),
            (ok.replace("}", r#", "analysis": {"max_p99": "0s"}}"#), "analysis.max_p99"),
        ] {
            let e = parse(Kind::Rollouts, "web-v2", bad.as_bytes()).unwrap_err();
            assert_eq!(e.path, format!("rollouts.web-v2.{field}"), "{bad}: {e}");
        }
        let status = |weight: u32| {
            format!(
                r#"{{"phase": "progressing", "step": 0, "weight": {weight}, "step_started_ms": 1, "failures": 0, "members": ["a"]}}"#
            )
        };
        assert!(parse(Kind::Rolloutstatus, "web-v2", status(5).as_bytes()).is_ok());
        assert!(parse(Kind::Rolloutstatus, "web-v2", status(101).as_bytes()).is_err());
        assert!(parse(Kind::Rolloutstatus, "web-v2", br#"{"phase": "done"}"#).is_err());
    }

    #[test]
    fn smallest_useful_objects_parse_with_defaults() {
        let s = parse(
            Kind::Services,
            "web",
            br#"{"protocol": "http", "lb": {"policy": "least_request"}, "timeout": "2s"}"#,
        )
        .unwrap();
        let Object::Service(s) = s else { panic!() };
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.lb.policy, LbPolicy::LeastRequest);
        assert_eq!(s.retry.attempts, 2);
        parse(
            Kind::Splits,
            "web-canary",
            br#"{"service": "web", "backends": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}"#,
        )
        .unwrap();
        parse(
            Kind::Ratelimits,
            "web",
            br#"{"service": "web", "requests_per_second": 1000, "burst": 200, "per": "header:x-user"}"#,
        )
        .unwrap();
    }

    #[test]
    fn split_weights_error_names_the_field() {
        let e = parse(
            Kind::Splits,
            "canary",
            br#"{"service": "web", "backends": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 7}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "splits.canary.backends[1].weight: weights sum to 97, must be 100; adjust the weights"
        );
    }

    #[test]
    fn type_errors_and_unknown_fields_name_the_path() {
        let e = parse(Kind::Services, "web", br#"{"retry": {"attempts": "many"}}"#).unwrap_err();
        assert_eq!(e.path, "services.web.retry.attempts");
        let e = parse(Kind::Services, "web", br#"{"timout": "2s"}"#).unwrap_err();
        assert!(e.message.contains("unknown field `timout`"), "{e}");
        let e = parse(
            Kind::Routes,
            "r",
            br#"{"service": "web", "match": {"path": {"regex": "("}}, "destination": {"service": "web"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.path, "routes.r.match.path.regex");
    }

    #[test]
    fn revocations_take_an_optional_reason_and_refuse_anything_else() {
        assert_eq!(parse(Kind::Revocations, "web-3", b"{}").unwrap(), Object::Revocation(Revocation::default()));
        let Object::Revocation(r) = parse(Kind::Revocations, "web-3", br#"{"reason": "key leaked"}"#).unwrap() else {
            panic!()
        };
        assert_eq!(r.reason.as_deref(), Some("key leaked"));
        let e = parse(Kind::Revocations, "web-3", br#"{"reson": "x"}"#).unwrap_err();
        assert!(e.message.contains("unknown field `reson`"), "{e}");
        let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(300));
        assert_eq!(parse(Kind::Revocations, "web-3", long.as_bytes()).unwrap_err().path, "revocations.web-3.reason");
        assert!(parse(Kind::Revocations, "Web 3", b"{}").is_err(), "names follow node-name rules");
        assert_eq!(Kind::parse("revocations").unwrap(), Kind::Revocations);
    }

    #[test]
    fn bad_names_and_oversized_bodies_are_refused() {
        assert!(parse(Kind::Services, "Web App", b"{}").is_err());
        assert!(parse(Kind::Settings, "other", b"{}").is_err());
        let big = format!("{{\"service\": \"{}\", \"labels\": {{\"a\": \"b\"}}}}", "x".repeat(MAX_OBJECT_BYTES));
        assert!(parse(Kind::Subsets, "s", big.as_bytes()).unwrap_err().message.contains("bytes"));
    }
}
