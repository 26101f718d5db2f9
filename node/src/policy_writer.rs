//! Writes to the cluster's policy from this node: validated and logged to disk off the
//! async threads, then spread to every member. The one way subsystems and the API write.

use std::sync::Arc;

use trellis_core::policy::{Key, Version};
use trellis_proto::PolicyEntry;

use crate::membership::Members;
use crate::policy::{Policy, WriteError};

#[derive(Clone)]
pub struct PolicyWriter {
    pub policy: Arc<Policy>,
    pub members: Members,
}

impl PolicyWriter {
    /// Writes (or with `body: None` deletes) `key`, then publishes the entry.
    pub async fn write(
        &self,
        key: Key,
        body: Option<Vec<u8>>,
        cas: Option<Version>,
    ) -> Result<PolicyEntry, WriteError> {
        let policy = self.policy.clone();
        let entry = tokio::task::spawn_blocking(move || policy.write(key, body.as_deref(), cas))
            .await
            .map_err(|e| WriteError::Io(std::io::Error::other(format!("the write task failed: {e}"))))??;
        self.members.publish(entry.clone()).await;
        Ok(entry)
    }
}
