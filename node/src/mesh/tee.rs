//! The copy of a request body for its mirror (see `mirror`): frames shared as they pass.

use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use tokio::sync::oneshot;

/// Largest request body mirrored; a bigger one is passed on, and its copy dropped.
pub const MAX_MIRROR_BODY: usize = 1 << 20;

/// The copy of a request body under way: frames collected until the end.
pub struct Tee {
    frames: Vec<Bytes>,
    len: usize,
    done: Option<oneshot::Sender<Bytes>>,
}

impl Tee {
    pub fn new(done: oneshot::Sender<Bytes>) -> Tee {
        Tee { frames: Vec::new(), len: 0, done: Some(done) }
    }

    /// Shares one data frame with the copy; past the bound the copy is abandoned.
    pub fn push(&mut self, data: &Bytes) {
        if self.done.is_none() {
            return;
        }
        self.len += data.len();
        if self.len > MAX_MIRROR_BODY {
            self.abandon();
            return;
        }
        self.frames.push(data.clone());
    }

    /// The body has ended: the copy may leave.
    pub fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let body: Bytes = match self.frames.len() {
                0 => Bytes::new(),
                1 => self.frames.pop().expect("one frame"),
                _ => self.frames.concat().into(),
            };
            let _ = done.send(body);
        }
    }

    fn abandon(&mut self) {
        self.done = None;
        self.frames = Vec::new();
    }
}

/// Mirrored requests, by outcome, for `/metrics`.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Copies the subset's instance answered (any status).
    pub sent: AtomicU64,
    /// Copies that found no instance, or no answer within the service's timeout.
    pub failed: AtomicU64,
    /// Copies dropped: the body was over [`super::tee::MAX_MIRROR_BODY`] or the client went away.
    pub skipped: AtomicU64,
}
