//! An S3-compatible backend (feature `s3`), built on `object_store`.
//!
//! Objects are named `<prefix><namespace>/<64 hex>` in one bucket, for
//! example `snapvm/blocks/3fa2…`. The client is asynchronous; the backend
//! owns a private Tokio runtime (one worker thread) and blocks on it, so the
//! store's API stays synchronous. Do not call it from inside another Tokio
//! runtime's async context (use `spawn_blocking`).
//!
//! `put_if_absent` is a HEAD followed by a PUT when the object is missing.
//! Two writers racing on the same name write identical bytes (names are
//! content addresses or random), so the race is harmless.

use std::fmt;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{Backend, Namespace, ObjectName, PutOutcome};
use crate::store::error::BackendError;

/// Where an [`S3Backend`] keeps its objects, and how it signs requests.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:3900` (path-style requests are
    /// used, so any S3-compatible server works).
    pub endpoint: String,
    /// Region name the server expects (`garage` for a default Garage).
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// Prefix of every object name, e.g. `snapvm/` (may be empty).
    pub prefix: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Allow plain `http://` endpoints (loopback tests, private networks).
    pub allow_http: bool,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

/// A [`Backend`] over an S3-compatible object store.
pub struct S3Backend {
    client: AmazonS3,
    prefix: String,
    runtime: tokio::runtime::Runtime,
}

impl fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Backend")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl S3Backend {
    /// Connects (lazily: no request is made until the first operation).
    pub fn new(config: &S3Config) -> Result<Self, BackendError> {
        let client = AmazonS3Builder::new()
            .with_endpoint(&config.endpoint)
            .with_region(&config.region)
            .with_bucket_name(&config.bucket)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_allow_http(config.allow_http)
            .with_virtual_hosted_style_request(false)
            .build()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("snapvm-s3")
            .enable_all()
            .build()?;
        Ok(Self {
            client,
            prefix: config.prefix.clone(),
            runtime,
        })
    }

    fn path(&self, name: &ObjectName) -> Path {
        Path::from(format!("{}{}/{}", self.prefix, name.namespace, name.hex()))
    }
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl Backend for S3Backend {
    fn put_if_absent(&self, name: &ObjectName, bytes: &[u8]) -> Result<PutOutcome, BackendError> {
        let path = self.path(name);
        self.runtime.block_on(async {
            match self.client.head(&path).await {
                Ok(_) => return Ok(PutOutcome::AlreadyPresent),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
            let payload = PutPayload::from(bytes.to_vec());
            self.client.put(&path, payload).await?;
            Ok(PutOutcome::Stored)
        })
    }

    fn get(&self, name: &ObjectName, limit: u64) -> Result<Option<Vec<u8>>, BackendError> {
        let path = self.path(name);
        self.runtime.block_on(async {
            let result = match self.client.get(&path).await {
                Ok(r) => r,
                Err(e) if not_found(&e) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            // The size comes with the response headers: refuse before
            // reading the body.
            if result.meta.size > limit {
                return Err(BackendError::TooLarge {
                    len: result.meta.size,
                    limit,
                });
            }
            let mut out = Vec::with_capacity(result.meta.size as usize);
            let mut stream = result.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if (out.len() + chunk.len()) as u64 > limit {
                    return Err(BackendError::TooLarge {
                        len: (out.len() + chunk.len()) as u64,
                        limit,
                    });
                }
                out.extend_from_slice(&chunk);
            }
            Ok(Some(out))
        })
    }

    fn has(&self, name: &ObjectName) -> Result<bool, BackendError> {
        let path = self.path(name);
        self.runtime.block_on(async {
            match self.client.head(&path).await {
                Ok(_) => Ok(true),
                Err(e) if not_found(&e) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn delete(&self, name: &ObjectName) -> Result<(), BackendError> {
        let path = self.path(name);
        self.runtime.block_on(async {
            match self.client.delete(&path).await {
                Ok(()) => Ok(()),
                Err(e) if not_found(&e) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn list(&self, namespace: Namespace) -> Result<Vec<ObjectName>, BackendError> {
        let prefix = Path::from(format!("{}{}", self.prefix, namespace));
        self.runtime.block_on(async {
            let mut out = Vec::new();
            let mut stream = self.client.list(Some(&prefix));
            while let Some(meta) = stream.next().await {
                let meta = meta?;
                if let Some(name) = meta
                    .location
                    .filename()
                    .and_then(|f| ObjectName::parse(namespace, f))
                {
                    out.push(name);
                }
            }
            Ok(out)
        })
    }
}
