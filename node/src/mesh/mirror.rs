//! Request mirroring (shadowing): a copy of a route's request goes to a subset, fire and
//! forget. The caller's request is never held for it: its body frames are shared with the
//! copy as they pass (`Bytes` clones, no copying), and the copy leaves when the body has
//! ended, on a task of its own whose answer is read and dropped. Which requests and where
//! is `RouteTable::mirror`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, Uri};
use tokio::sync::oneshot;

use super::forward::Forwarder;
use super::tee::Tee;

/// What the copy is sent with.
pub struct Copy {
    pub service: String,
    pub subset: String,
    pub labels: BTreeMap<String, String>,
    pub authority: String,
    pub h2: bool,
    pub timeout: Duration,
    /// The calling service of the original request: intentions judge the copy as it.
    pub caller: Option<Arc<str>>,
}

/// Starts mirroring `req`: returns the tee its body must feed, or None when it has no
/// body (the copy leaves at once).
pub fn start<B: hyper::body::Body>(fwd: &Arc<Forwarder>, req: &Request<B>, copy: Copy) -> Option<Tee> {
    let (tx, rx) = oneshot::channel();
    let head = (req.method().clone(), req.uri().clone(), req.headers().clone());
    tokio::spawn(send(fwd.clone(), head, rx, copy));
    let mut tee = Tee::new(tx);
    if req.body().is_end_stream() {
        tee.finish();
        return None;
    }
    Some(tee)
}

async fn send(
    fwd: Arc<Forwarder>,
    (method, uri, mut headers): (hyper::Method, Uri, hyper::HeaderMap),
    body: oneshot::Receiver<Bytes>,
    c: Copy,
) {
    let stats = &fwd.stats.mirror;
    let Ok(Ok(body)) = tokio::time::timeout(c.timeout, body).await else {
        stats.skipped.fetch_add(1, Relaxed);
        return;
    };
    let Ok((mut pick, _in_flight)) = fwd.pick(&fwd.snapshot(), &c.service, &c.labels, None, &mut Vec::new()) else {
        stats.failed.fetch_add(1, Relaxed);
        return;
    };
    pick.caller = c.caller;
    // The instance can tell a copy from a real request.
    headers.insert("x-trellis-mirror", hyper::header::HeaderValue::from_str(&c.subset).expect("a subset name"));
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(http_body_util::Full::new(body).map_err(|e| match e {}).boxed());
    if let Ok(r) = &mut req {
        *r.headers_mut() = headers;
    }
    let Ok(req) = req else {
        stats.failed.fetch_add(1, Relaxed);
        return;
    };
    let answered = async {
        let (resp, reuse) = fwd.request(&c.service, &pick, req, &c.authority, c.h2).await.ok()?;
        // Read to the end (and dropped), so the connection goes back to the pool.
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            frame.ok()?;
        }
        if let Some(r) = reuse {
            (r.give_back)(&r.name, r.sender);
        }
        Some(())
    };
    match tokio::time::timeout(c.timeout, answered).await {
        Ok(Some(())) => stats.sent.fetch_add(1, Relaxed),
        _ => stats.failed.fetch_add(1, Relaxed),
    };
}
