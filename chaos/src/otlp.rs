//! An OTLP/HTTP trace receiver for tests and benchmarks: takes `POST /v1/traces` (protobuf),
//! decodes each request with OpenTelemetry's own message types, and keeps the spans with the
//! node that sent them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// A span as received, with the `service.instance.id` of the agent that sent it.
#[derive(Clone, Debug)]
pub struct Received {
    pub node: String,
    pub span: Span,
}

impl Received {
    pub fn attr(&self, key: &str) -> Option<String> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let v = self.span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
        Some(match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
    }

    pub fn trace_hex(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_hex(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_hex(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The receiver; spans accumulate from its own threads.
pub struct Receiver {
    pub addr: SocketAddr,
    store: Arc<Store>,
}

#[derive(Default)]
struct Store {
    /// Keep every span (tests), or only count them (benchmarks).
    keep: bool,
    spans: Mutex<Vec<Received>>,
    count: AtomicU64,
}

impl Receiver {
    /// A receiver that keeps every span it decodes.
    pub fn start() -> Receiver {
        Receiver::bind(true)
    }

    /// A receiver that decodes and counts spans, keeping none (for long benchmark runs).
    pub fn counting() -> Receiver {
        Receiver::bind(false)
    }

    fn bind(keep: bool) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        let addr = l.local_addr().expect("local addr");
        let store = Arc::new(Store { keep, ..Store::default() });
        let shared = store.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let store = shared.clone();
                std::thread::spawn(move || serve(conn, &store));
            }
        });
        Receiver { addr, store }
    }

    pub fn spans(&self) -> Vec<Received> {
        self.store.spans.lock().expect("spans lock").clone()
    }

    /// Spans received so far.
    pub fn count(&self) -> u64 {
        self.store.count.load(Relaxed)
    }
}

/// Requests on one connection until it closes; anything but a decodable export is a 400.
fn serve(conn: TcpStream, store: &Store) {
    let Ok(read) = conn.try_clone() else { return };
    let mut r = BufReader::new(read);
    let mut w = conn;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let status = match (line.starts_with("POST /v1/traces "), ExportTraceServiceRequest::decode(&body[..])) {
            (true, Ok(req)) => {
                for rs in req.resource_spans {
                    use opentelemetry_proto::tonic::common::v1::any_value::Value;
                    let node = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.instance.id")
                        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        store.count.fetch_add(ss.spans.len() as u64, Relaxed);
                        if store.keep {
                            let mut kept = store.spans.lock().expect("spans lock");
                            kept.extend(ss.spans.into_iter().map(|span| Received { node: node.clone(), span }));
                        }
                    }
                }
                "200 OK"
            }
            _ => "400 Bad Request",
        };
        let head = format!("HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
        if w.write_all(head.as_bytes()).is_err() {
            return;
        }
    }
}
