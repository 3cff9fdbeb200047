//! An S3-compatible backend (feature `s3`), built on `object_store`.
//!
//! Objects are named `<prefix><namespace>/<64 hex>` in one bucket, for
//! example `snapvm/blocks/3fa2…`. The client is asynchronous; the backend
//! owns a private Tokio runtime (one worker thread) and blocks on it, so the
//! store's API stays synchronous. Do not call it from inside another Tokio
//! runtime's async context (use `spawn_blocking`).
//!
//! `put_if_absent` always PUTs, and a HEAD before it only says which
//! outcome to report. A HEAD that finds an object proves less than a write
//! acknowledged at the server's write quorum: a replicated server (Garage
//! with `replication_factor = 3`) answers "present" when one node holds the
//! object, for example one left behind by a put that failed when two nodes
//! died, and a store that trusted it committed manifests whose blocks other
//! nodes could not serve. So the object is written whatever the HEAD says;
//! names are content addresses (or random), so writing an existing name
//! again stores identical bytes and is harmless, also when two writers race.
//! Within one put, the store writes each block once (see `stream.rs`).

use std::fmt;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

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
    /// How long a failed request (a server error such as Garage's "could
    /// not reach quorum", a refused connection, a timeout) is retried, with
    /// exponential backoff, counted from its first attempt, before the
    /// operation fails with [`BackendError::S3`]. It bounds how long one
    /// store operation waits on an unreachable or quorum-less server (plus
    /// the last attempt's own time). [`S3Config::DEFAULT_RETRY_TIMEOUT`] is
    /// 30 s; `Duration::ZERO` disables retries.
    pub retry_timeout: Duration,
}

impl S3Config {
    /// The usual [`S3Config::retry_timeout`]: 30 seconds.
    pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(30);
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
            .field("retry_timeout", &self.retry_timeout)
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
            .with_retry(RetryConfig {
                backoff: Default::default(),
                max_retries: if config.retry_timeout.is_zero() {
                    0
                } else {
                    10
                },
                retry_timeout: config.retry_timeout,
            })
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

    /// One put: a HEAD for the report, then the PUT whatever it said.
    async fn put_one(&self, name: &ObjectName, bytes: &[u8]) -> Result<PutOutcome, BackendError> {
        let path = self.path(name);
        // Only for the report: a found object may be held by fewer nodes
        // than the write quorum, so it is written anyway.
        let outcome = match self.client.head(&path).await {
            Ok(_) => PutOutcome::AlreadyPresent,
            Err(e) if not_found(&e) => PutOutcome::Stored,
            Err(e) => return Err(e.into()),
        };
        let payload = PutPayload::from(bytes.to_vec());
        self.client.put(&path, payload).await?;
        Ok(outcome)
    }
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// The most requests one [`Backend::put_many`] call keeps in flight.
const MAX_PUTS_IN_FLIGHT: usize = 64;

impl Backend for S3Backend {
    fn put_if_absent(&self, name: &ObjectName, bytes: &[u8]) -> Result<PutOutcome, BackendError> {
        self.runtime.block_on(self.put_one(name, bytes))
    }

    /// Issues the puts concurrently, up to 64 at a time; each is a HEAD
    /// and a PUT as in [`Backend::put_if_absent`].
    fn put_many(&self, objects: &[(ObjectName, &[u8])]) -> Vec<Result<PutOutcome, BackendError>> {
        let puts = objects
            .iter()
            .map(|(name, bytes)| self.put_one(name, bytes));
        self.runtime.block_on(
            futures_util::stream::iter(puts)
                .buffered(MAX_PUTS_IN_FLIGHT)
                .collect(),
        )
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
