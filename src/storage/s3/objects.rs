//! `S3Objects`: the object layer on an S3 bucket: every stored format (block layouts, records,
//! leases) reaches the bucket through it, and it reaches the wire through the one
//! [`Transport`].
//!
//! The [`ObjectStore`] trait is synchronous because nbdkit calls us on its own threads; each call
//! here runs on the caller's thread (the direct path) or blocks on the process-wide runtime.
//! Concurrency comes from the callers: nbdkit's worker threads, and the write-back workers of the
//! [`BlockCache`](crate::volume::BlockCache), each blocking on their own request.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

use super::sdk::Sdk;
use super::transport::Transport;
use super::{runtime, S3Config};
use crate::storage::keys::LEASE_PREFIX;
use crate::storage::objects::{Listed, Object, ObjectStore, Put, ReadInto};
use crate::storage::{BlockBuf, Fence};
use crate::Result;

/// S3 allows at most this many keys in one DeleteObjects request.
const MAX_DELETE_BATCH: usize = 1000;

/// The objects of one bucket.
#[derive(Debug)]
pub struct S3Objects {
    transport: Transport,
    bucket: String,
    /// `s3://bucket (endpoint)`, for messages.
    name: String,
    /// `s3-timeout`: the deadline of a write or delete no fence gave one.
    timeout: Duration,
    /// One permit per PUT or DELETE in flight: however many callers (write-behind, the background
    /// writer, writers past `max-dirty`, FLUSH) write back at once, `s3-concurrency` bounds the
    /// requests, and the memory of the PUT bodies with them. A fenced request asks its fence only
    /// once it holds a permit, so a wait for one cannot outlast the lease. GETs take none: a read
    /// waits for them, and through the SDK small GETs from a server that leaves Nagle on (Garage)
    /// can each stall ~40 ms behind our delayed ACK, so reads need all the concurrency their
    /// callers give them.
    permits: Semaphore,
    /// How many permits a store with request slots of its own starts with.
    concurrency: usize,
    /// Whether the server honours conditional writes, found out once per bucket.
    conditional_writes: Arc<OnceLock<bool>>,
}

impl S3Objects {
    /// The objects of `config.bucket` through `transport`; `conditional_writes` is what a
    /// start-up probe found, if one ran.
    pub fn new(transport: Transport, config: &S3Config) -> Self {
        let conditional_writes = Arc::new(OnceLock::new());
        if let Some(known) = super::probed_conditional_writes(config) {
            let _ = conditional_writes.set(known);
        }
        let concurrency = config.concurrency.max(1);
        S3Objects {
            transport,
            bucket: config.bucket.clone(),
            name: config.describe(),
            timeout: config.timeout,
            permits: Semaphore::new(concurrency),
            concurrency,
            conditional_writes,
        }
    }

    /// The same bucket with `s3-concurrency` request slots of its own (one export's blocks), so
    /// that one export's write-back never queues the records, leases or other exports behind it.
    pub fn with_own_request_slots(&self) -> Self {
        S3Objects {
            transport: self.transport.clone(),
            bucket: self.bucket.clone(),
            name: self.name.clone(),
            timeout: self.timeout,
            permits: Semaphore::new(self.concurrency),
            concurrency: self.concurrency,
            conditional_writes: Arc::clone(&self.conditional_writes),
        }
    }

    fn sdk(&self) -> Sdk<'_> {
        self.transport.sdk(&self.bucket, &self.name)
    }

    /// Waits for a request permit. The semaphore is never closed, so this yields `None` never.
    fn permit(&self) -> Result<Option<SemaphorePermit<'_>>> {
        Ok(runtime()?.block_on(self.permits.acquire()).ok())
    }

    /// The instant a write or delete may not be sent after: what `fence` says, or `s3-timeout`
    /// from now.
    fn deadline(&self, fence: Option<Fence<'_>>) -> Result<Instant> {
        fence.map_or_else(|| Ok(Instant::now() + self.timeout), |fence| fence())
    }
}

impl fmt::Display for S3Objects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl ObjectStore for S3Objects {
    fn get(&self, key: &str, max_len: usize) -> Result<Option<Object>> {
        runtime()?.block_on(self.sdk().get(key, max_len))
    }

    fn read_into(&self, key: &str, offset: Option<u64>, buf: &mut BlockBuf) -> Result<ReadInto> {
        self.transport.read_into(self.sdk(), key, offset, buf)
    }

    fn put(&self, key: &str, data: &[u8], condition: Put<'_>, fence: Option<Fence<'_>>) -> Result<Option<String>> {
        let _permit = self.permit()?;
        let deadline = self.deadline(fence)?;
        self.transport.put(self.sdk(), key, data, condition, deadline)
    }

    fn delete(&self, keys: &[String], fence: Option<Fence<'_>>) -> Result<()> {
        if let [key] = keys {
            let _permit = self.permit()?;
            let deadline = self.deadline(fence)?;
            return self.transport.delete(self.sdk(), key, deadline);
        }
        for chunk in keys.chunks(MAX_DELETE_BATCH) {
            let _permit = self.permit()?;
            let deadline = self.deadline(fence)?;
            runtime()?.block_on(self.sdk().delete_batch(chunk, deadline))?;
        }
        Ok(())
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, visit: &mut dyn FnMut(Listed) -> bool) -> Result<()> {
        runtime()?.block_on(self.sdk().list(prefix, start_after, visit))
    }

    fn sync(&self) -> Result<()> {
        // S3 acknowledges a PUT or DELETE only once it is durable: there is nothing to sync.
        Ok(())
    }

    fn conditional_writes(&self) -> Result<bool> {
        if let Some(&known) = self.conditional_writes.get() {
            return Ok(known);
        }
        let honoured = runtime()?.block_on(probe(self.sdk(), self.timeout))?;
        Ok(*self.conditional_writes.get_or_init(|| honoured))
    }

    /// The bucket's transport's retries, all stores on it together: they share its connections.
    fn retries(&self) -> u64 {
        self.transport.retries()
    }
}

/// Finds out whether the server honours `If-None-Match: *`, by creating a probe object twice.
pub(super) async fn probe(sdk: Sdk<'_>, timeout: Duration) -> Result<bool> {
    // "/" never appears in an export name, so the probe never meets a real lease.
    let key = format!("{LEASE_PREFIX}probe/{}-{}", std::process::id(), crate::unix_nanos());
    let created = || async { sdk.put(&key, b"probe".to_vec().into(), Put::IfAbsent, Instant::now() + timeout).await };
    created().await?;
    let honoured = created().await?.is_none();
    if let Err(e) = sdk.delete(&key, Instant::now() + timeout).await {
        log::warn!("{}: could not delete the probe object {key}: {e}", sdk.store);
    }
    Ok(honoured)
}
