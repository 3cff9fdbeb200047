//! An in-memory backend, for tests and for caches that need no persistence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Backend, Namespace, ObjectName, PutOutcome};
use crate::store::error::BackendError;

/// A [`Backend`] holding every object in memory. Cloning it gives another
/// handle to the same objects (as two processes sharing one bucket would see).
#[derive(Debug, Default, Clone)]
pub struct MemoryBackend {
    objects: Arc<Mutex<HashMap<ObjectName, Arc<[u8]>>>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ObjectName, Arc<[u8]>>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every operation is a single insert/remove), so poisoning is moot.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces an object's bytes unconditionally, bypassing put-if-absent:
    /// for fault-injection tests (a bit flip, a truncated object).
    pub fn overwrite(&self, name: &ObjectName, bytes: &[u8]) {
        self.lock().insert(*name, bytes.into());
    }

    /// Number of objects in `namespace`.
    pub fn count(&self, namespace: Namespace) -> usize {
        self.lock()
            .keys()
            .filter(|n| n.namespace == namespace)
            .count()
    }

    /// Total bytes held in `namespace`.
    pub fn bytes(&self, namespace: Namespace) -> u64 {
        self.lock()
            .iter()
            .filter(|(n, _)| n.namespace == namespace)
            .map(|(_, v)| v.len() as u64)
            .sum()
    }
}

impl Backend for MemoryBackend {
    fn put_if_absent(&self, name: &ObjectName, bytes: &[u8]) -> Result<PutOutcome, BackendError> {
        let mut map = self.lock();
        // Like FsBackend: an existing object with other bytes was damaged
        // (see `overwrite`); replace it.
        if map.get(name).is_some_and(|old| **old == *bytes) {
            return Ok(PutOutcome::AlreadyPresent);
        }
        map.insert(*name, bytes.into());
        Ok(PutOutcome::Stored)
    }

    fn get(&self, name: &ObjectName, limit: u64) -> Result<Option<Vec<u8>>, BackendError> {
        let Some(obj) = self.lock().get(name).cloned() else {
            return Ok(None);
        };
        if obj.len() as u64 > limit {
            return Err(BackendError::TooLarge {
                len: obj.len() as u64,
                limit,
            });
        }
        Ok(Some(obj.to_vec()))
    }

    fn has(&self, name: &ObjectName) -> Result<bool, BackendError> {
        Ok(self.lock().contains_key(name))
    }

    fn delete(&self, name: &ObjectName) -> Result<(), BackendError> {
        self.lock().remove(name);
        Ok(())
    }

    fn list(&self, namespace: Namespace) -> Result<Vec<ObjectName>, BackendError> {
        Ok(self
            .lock()
            .keys()
            .filter(|n| n.namespace == namespace)
            .copied()
            .collect())
    }
}
