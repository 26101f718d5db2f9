//! Spans of proxied requests, exported with OpenTelemetry over OTLP/HTTP (protobuf).
//!
//! Ids and sampling are decided per request by `trellis_core::mesh::trace`; this module only
//! turns a finished hop into OpenTelemetry's `SpanData` and hands it to the SDK's batch
//! processor. That processor owns a bounded queue and its own thread: a request never waits
//! for the collector, and when the collector is slow or down, spans past the queue are
//! dropped (counted by the SDK), never buffered without bound.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanExporter, SpanProcessor};
use serde::Deserialize;
use trellis_core::mesh::access_log::Side;
use trellis_core::mesh::trace::{span_error, Hop};

/// `[traces]` in the agent's config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// On when the section is present, unless set false.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The collector: `http://host:4318` (spans go to `/v1/traces`) or a full URL with a path.
    pub endpoint: String,
    /// Share (0 to 1) of new traces sampled; a caller's `traceparent` decides for its own.
    #[serde(default = "one")]
    pub sample: f64,
    /// Finished spans held for export at most; more are dropped until the queue drains.
    #[serde(default = "queue")]
    pub max_queue: usize,
    /// Spans per export request at most.
    #[serde(default = "batch")]
    pub max_batch: usize,
    /// How long spans wait to be batched.
    #[serde(default = "delay", with = "humantime_serde")]
    pub delay: Duration,
    /// How long one export may take before it is abandoned.
    #[serde(default = "timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn queue() -> usize {
    2048
}
fn batch() -> usize {
    512
}
fn delay() -> Duration {
    Duration::from_secs(1)
}
fn timeout() -> Duration {
    Duration::from_secs(10)
}

impl TracesConfig {
    /// The defaults, exporting to `endpoint` (the `--otlp-endpoint` flag).
    pub fn to(endpoint: &str) -> TracesConfig {
        // The defaults come from an empty endpoint; the flag's text is set after, never parsed
        // as TOML (a control character in it would not be valid TOML).
        let mut c: TracesConfig = toml::from_str("endpoint = \"\"").expect("every other field has a default");
        c.endpoint = endpoint.to_string();
        c
    }

    /// Field errors, named as the config file spells them.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample) {
            return Err(format!("traces.sample: {} is not a share; use 0 to 1 (e.g. 0.01 for 1%)", self.sample));
        }
        if self.max_queue == 0 || self.max_batch == 0 || self.max_batch > self.max_queue {
            return Err(format!(
                "traces.max_batch: {} must be at least 1 and at most traces.max_queue ({})",
                self.max_batch, self.max_queue
            ));
        }
        self.url().map(|_| ())
    }

    /// The export URL: `/v1/traces` appended to a bare `http://host:port`, as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is read.
    pub fn url(&self) -> Result<String, String> {
        let Some(rest) = self.endpoint.strip_prefix("http://").map(|r| r.trim_end_matches('/')) else {
            return Err(format!(
                "traces.endpoint: {:?} is not an http:// URL; export to a collector over plain HTTP (e.g. http://127.0.0.1:4318, an OpenTelemetry Collector on this host)",
                self.endpoint
            ));
        };
        match rest.split_once('/') {
            Some((host, _)) if !host.is_empty() => Ok(format!("http://{rest}")),
            None if !rest.is_empty() => Ok(format!("http://{rest}/v1/traces")),
            _ => Err(format!("traces.endpoint: {:?} names no host; e.g. http://127.0.0.1:4318", self.endpoint)),
        }
    }
}

/// The exporter of this agent's spans.
pub struct Spans {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
    sample: f64,
    /// Spans handed to the exporter's queue.
    pub ended: AtomicU64,
    /// Spans the collector accepted, and those in batches it refused or never got.
    pub counts: Arc<Exported>,
}

/// What became of the spans sent.
#[derive(Debug, Default)]
pub struct Exported {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spans").field("sample", &self.sample).finish_non_exhaustive()
    }
}

impl Spans {
    /// Starts the exporter for node `node` (its batching thread begins now).
    pub fn start(cfg: &TracesConfig, node: &str) -> anyhow::Result<Arc<Spans>> {
        let url = cfg.url().map_err(anyhow::Error::msg)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Ureq::new(cfg.timeout))
            .with_endpoint(url)
            .with_timeout(cfg.timeout)
            .build()?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(cfg.max_queue)
            .with_max_export_batch_size(cfg.max_batch)
            .with_scheduled_delay(cfg.delay)
            .build();
        let counts = Arc::new(Exported::default());
        let exporter = Counting { inner: exporter, counts: counts.clone() };
        let mut processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name("trellis")
            .with_attributes([
                KeyValue::new("service.instance.id", node.to_string()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        processor.set_resource(&resource);
        let scope = InstrumentationScope::builder("trellis").with_version(env!("CARGO_PKG_VERSION")).build();
        Ok(Arc::new(Spans { processor, scope, sample: cfg.sample, ended: AtomicU64::new(0), counts }))
    }

    /// The share of new traces sampled.
    pub fn ratio(&self) -> f64 {
        self.sample
    }

    /// Exports what is queued, waiting at most the export timeout (at shutdown).
    pub fn flush(&self) {
        if let Err(e) = self.processor.force_flush() {
            tracing::debug!(error = %e, "spans not flushed");
        }
    }

    fn end(&self, span: &OpenSpan, status: Status, attributes: Vec<KeyValue>) {
        let flags = TraceFlags::SAMPLED;
        let data = SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(span.hop.trace_id),
                SpanId::from_bytes(span.hop.span_id),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: span.hop.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: span.remote_parent,
            span_kind: span.kind.clone(),
            name: span.name.clone(),
            start_time: span.start,
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        };
        self.ended.fetch_add(1, Relaxed);
        self.processor.on_end(data);
    }
}

/// A span begun and not yet ended.
pub struct OpenSpan {
    spans: Arc<Spans>,
    hop: Hop,
    side: Side,
    kind: SpanKind,
    remote_parent: bool,
    name: Cow<'static, str>,
    start: SystemTime,
    /// Attributes known at the start; the answer's are added at the end.
    pub attributes: Vec<KeyValue>,
}

impl OpenSpan {
    /// Begins `hop`'s span when it is sampled and this agent exports spans; `remote_parent`
    /// when its parent is another process's span.
    pub fn begin(
        spans: Option<&Arc<Spans>>,
        hop: &Hop,
        side: Side,
        name: Cow<'static, str>,
        remote_parent: bool,
    ) -> Option<OpenSpan> {
        let spans = spans.filter(|_| hop.sampled)?;
        let kind = match side {
            Side::Outbound => SpanKind::Client,
            Side::Inbound => SpanKind::Server,
        };
        Some(OpenSpan {
            spans: spans.clone(),
            hop: *hop,
            side,
            kind,
            remote_parent,
            name,
            start: SystemTime::now(),
            attributes: Vec::with_capacity(12),
        })
    }

    /// What this span's children need, to carry in the request's extensions.
    pub fn parent(&self) -> Parent {
        Parent { spans: self.spans.clone(), hop: self.hop, side: self.side }
    }

    /// Ends the span with the answer's `status` (0: none came) and the proxy's `reason`.
    pub fn end(mut self, status: u16, reason: Option<&str>) {
        if status != 0 {
            self.attributes.push(KeyValue::new("http.response.status_code", i64::from(status)));
        }
        if let Some(r) = reason {
            self.attributes.push(KeyValue::new("trellis.reason", r.to_string()));
        }
        let s = match span_error(self.side, status, reason) {
            Some(e) => Status::error(e),
            None => Status::Unset,
        };
        let attributes = std::mem::take(&mut self.attributes);
        self.spans.end(&self, s, attributes);
    }
}

/// A span that children (the request's attempts) may begin under.
#[derive(Clone)]
pub struct Parent {
    spans: Arc<Spans>,
    hop: Hop,
    side: Side,
}

impl Parent {
    /// A child span `hop` (made with `Hop::child`), begun now.
    pub fn child(&self, hop: Hop, name: Cow<'static, str>) -> OpenSpan {
        OpenSpan {
            spans: self.spans.clone(),
            hop,
            side: self.side,
            kind: SpanKind::Client,
            remote_parent: false,
            name,
            start: SystemTime::now(),
            attributes: Vec::with_capacity(6),
        }
    }

    pub fn hop(&self) -> &Hop {
        &self.hop
    }
}

/// A response body that ends its request's span when dropped: after the last byte went to
/// the client, or when the client went away.
pub struct Traced<B> {
    inner: B,
    span: Option<(OpenSpan, u16, Option<String>)>,
}

impl<B> Traced<B> {
    pub fn new(inner: B, span: OpenSpan, status: u16, reason: Option<String>) -> Traced<B> {
        Traced { inner, span: Some((span, status, reason)) }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Traced<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Traced<B> {
    fn drop(&mut self) {
        if let Some((span, status, reason)) = self.span.take() {
            span.end(status, reason.as_deref());
        }
    }
}

/// The OTLP exporter, counting what each batch became (the SDK drops a failed batch; the
/// operator sees it in `trellis_trace_spans_total`).
#[derive(Debug)]
struct Counting<E> {
    inner: E,
    counts: Arc<Exported>,
}

impl<E: SpanExporter> SpanExporter for Counting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let r = self.inner.export(batch).await;
        match &r {
            Ok(()) => self.counts.sent.fetch_add(n, Relaxed),
            Err(e) => {
                tracing::debug!(error = %e, spans = n, "span export failed");
                self.counts.failed.fetch_add(n, Relaxed)
            }
        };
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter's HTTP client: blocking ureq, called on the batch processor's own thread.
#[derive(Debug)]
struct Ureq(ureq::Agent);

impl Ureq {
    fn new(timeout: Duration) -> Ureq {
        Ureq(ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into())
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Ureq {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (head, body) = request.into_parts();
        let mut resp = self.0.run(http::Request::from_parts(head, body.to_vec()))?;
        // The collector's answer is small (a partial-success message at most); read a bounded amount.
        let body = resp.body_mut().with_config().limit(1 << 20).read_to_vec()?;
        let (head, _) = resp.into_parts();
        Ok(http::Response::from_parts(head, Bytes::from(body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_the_signal_path_unless_they_name_one() {
        assert_eq!(TracesConfig::to("http://127.0.0.1:4318").url().unwrap(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(TracesConfig::to("http://c:4318/").url().unwrap(), "http://c:4318/v1/traces");
        assert_eq!(TracesConfig::to("http://c:4318/otlp/v1/traces").url().unwrap(), "http://c:4318/otlp/v1/traces");
        let e = TracesConfig::to("https://c:4318").check().unwrap_err();
        assert!(e.starts_with("traces.endpoint:") && e.contains("http://"), "{e}");
        assert!(TracesConfig::to("http://").check().unwrap_err().contains("names no host"));
        // Whatever the flag carries is an error to report, never a panic.
        for odd in ["\u{1}", "http://c:1/\u{7f}", "\"quoted\"", "\\"] {
            assert_eq!(TracesConfig::to(odd).endpoint, odd);
        }
    }

    #[test]
    fn bad_shares_and_batches_name_their_field() {
        let mut c = TracesConfig::to("http://c:4318");
        c.sample = 1.5;
        assert!(c.check().unwrap_err().starts_with("traces.sample:"));
        c.sample = 0.5;
        c.max_batch = 4096;
        assert!(c.check().unwrap_err().starts_with("traces.max_batch:"));
        assert_eq!(toml::from_str::<TracesConfig>("endpoint = \"http://c:1\"\nsample = 0.01").unwrap().max_queue, 2048);
        assert!(toml::from_str::<TracesConfig>("endpoint = \"http://c:1\"\nsampel = 1").is_err());
    }
}
