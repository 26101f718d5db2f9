//! The body of an instance's answer on its way to the client: it keeps its request in
//! flight for the balancer, ends when the instance's node goes, and hands its HTTP/1.1
//! connection back to the pool once read to the end, without a task of its own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::instance_http::Sender;
use super::io::InFlight;

type Gone = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Puts a connection to the named instance back where the next request finds it.
pub type GiveBack = std::sync::Arc<dyn Fn(&str, Sender) + Send + Sync>;

/// What a body does with its connection when it has been read to the end.
pub struct Reuse {
    pub sender: Sender,
    /// The instance it is a connection to: the pool's key.
    pub name: String,
    pub give_back: GiveBack,
}

/// An instance's response body: keeps its request in flight until dropped, fails when
/// `gone` resolves (the instance's node left or was declared down), so a body from a dead
/// node ends at detection rather than at QUIC's idle timeout, and returns its connection
/// to the pool when dropped after its end.
pub struct Answer<B: hyper::body::Body> {
    body: B,
    _in_flight: InFlight,
    // In a Mutex only to be Sync for `BoxBody`; polled through `get_mut`, never locked.
    gone: Option<std::sync::Mutex<Gone>>,
    reuse: Option<Reuse>,
}

impl<B: hyper::body::Body> Answer<B> {
    pub fn new(
        body: B,
        in_flight: InFlight,
        gone: Option<impl Future<Output = ()> + Send + 'static>,
        reuse: Option<Reuse>,
    ) -> Self {
        let gone = gone.map(|g| std::sync::Mutex::new(Box::pin(g) as Gone));
        Answer { body, _in_flight: in_flight, gone, reuse }
    }
}

impl<B: hyper::body::Body> Drop for Answer<B> {
    fn drop(&mut self) {
        // A body left unread would hold up the connection's next response: only one read
        // to its end goes back.
        if self.body.is_end_stream() {
            if let Some(r) = self.reuse.take() {
                (r.give_back)(&r.name, r.sender);
            }
        }
    }
}

/// Why a response body stopped before its end.
#[derive(Debug, thiserror::Error)]
#[error("the instance's node left the cluster or was declared down while its answer was streaming")]
pub struct NodeGone;

impl<B> hyper::body::Body for Answer<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, Self::Error>>> {
        let this = self.get_mut();
        // The node is looked at only while the body waits, not on every frame it hands on.
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if frame.is_pending() {
            if let Some(gone) = this.gone.as_mut() {
                let gone = gone.get_mut().unwrap_or_else(|p| p.into_inner());
                if gone.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Box::new(NodeGone))));
                }
            }
        }
        frame.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
