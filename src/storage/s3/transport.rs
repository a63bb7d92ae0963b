//! `Transport`: the one seam between the S3 object store and the wire. A request goes either
//! through the SDK ([`Sdk`]) or, for whole-object GETs, unconditional PUTs and single DELETEs on
//! an `http://` endpoint, through the [`DirectClient`], which does them on the caller's thread
//! at half the CPU; this is the one place that chooses.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::direct::DirectClient;
use super::retry::RetryPolicy;
use super::sdk::{sdk_client, Fetched, Sdk};
use super::{runtime, S3Config};
use crate::storage::objects::{Put, ReadInto};
use crate::storage::BlockBuf;
use crate::{Error, Result};

/// How requests reach one bucket: the SDK's client, and the direct path where it applies.
#[derive(Clone, Debug)]
pub struct Transport {
    /// Every request the direct path does not take.
    pub sdk: Client,
    direct: Option<Arc<DirectClient>>,
    /// The SDK's retries, counted by its client.
    sdk_retries: Arc<AtomicU64>,
}

impl From<Client> for Transport {
    /// Everything through `sdk`, whose retries this does not count.
    fn from(sdk: Client) -> Self {
        Transport { sdk, direct: None, sdk_retries: Arc::default() }
    }
}

impl Transport {
    /// The transport of `config`'s bucket: the SDK under the plugin's [`RetryPolicy`], and the
    /// direct path where it applies. Must run inside a tokio runtime.
    pub async fn new(config: &S3Config) -> Self {
        let sdk_retries = Arc::default();
        let (sdk, credentials) = sdk_client(config, RetryPolicy::REQUESTS, &sdk_retries).await;
        let direct = match credentials {
            Some(credentials) => DirectClient::new(config, &credentials).await.map(Arc::new),
            None => None,
        };
        Transport { sdk, direct, sdk_retries }
    }

    /// The SDK alone under `policy` (the start-up probes).
    pub(super) async fn sdk_only(config: &S3Config, policy: RetryPolicy) -> Self {
        let sdk_retries = Arc::default();
        let (sdk, _) = sdk_client(config, policy, &sdk_retries).await;
        Transport { sdk, direct: None, sdk_retries }
    }

    /// This transport with every request through the SDK, as on an `https://` endpoint.
    pub fn without_direct(&self) -> Self {
        Transport { direct: None, ..self.clone() }
    }

    /// Whether whole-object GETs, PUTs and DELETEs take the direct path.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Requests sent again after a transient failure, both paths together.
    pub fn retries(&self) -> u64 {
        self.sdk_retries.load(Relaxed) + self.direct.as_ref().map_or(0, |d| d.retries())
    }

    /// The SDK's view of `bucket`, naming `store` in messages.
    pub(super) fn sdk<'a>(&'a self, bucket: &'a str, store: &'a str) -> Sdk<'a> {
        Sdk { client: &self.sdk, bucket, store }
    }

    /// Reads `buf.len()` bytes of the object at `key` into `buf` (see
    /// [`ObjectStore::read_into`](crate::storage::ObjectStore::read_into)).
    pub(super) fn read_into(
        &self,
        sdk: Sdk<'_>,
        key: &str,
        offset: Option<u64>,
        buf: &mut BlockBuf,
    ) -> Result<ReadInto> {
        if let (Some(direct), None) = (&self.direct, offset) {
            return direct.get(sdk.store, key, buf);
        }
        // The body reaches the runtime in many chunks; awaited on this (nbdkit) thread, each one
        // would cost a thread wake-up. A task on the runtime gathers the whole block into a
        // buffer of its own, wakes this thread once, and the buffers are swapped.
        let (client, bucket, store, key_owned) =
            (sdk.client.clone(), sdk.bucket.to_string(), sdk.store.to_string(), key.to_string());
        let len = buf.len();
        let rt = runtime()?;
        let task = rt.spawn(async move {
            let sdk = Sdk { client: &client, bucket: &bucket, store: &store };
            sdk.read(&key_owned, offset, len).await
        });
        let fetched = rt
            .block_on(task)
            .map_err(|e| Error::backend_caused(sdk.store, format!("GET {key}: the request's task failed: {e}"), e))??;
        Ok(match fetched {
            Fetched::Missing => ReadInto::Missing,
            Fetched::WrongSize(n) => ReadInto::WrongSize(n),
            Fetched::Filled(block) => {
                *buf = block;
                ReadInto::Filled
            }
        })
    }

    /// PUTs `data` at `key` if `condition` holds, no byte of it sent after `deadline`.
    pub(super) fn put(
        &self,
        sdk: Sdk<'_>,
        key: &str,
        data: &[u8],
        condition: Put<'_>,
        deadline: Instant,
    ) -> Result<Option<String>> {
        if let (Some(direct), Put::Always) = (&self.direct, condition) {
            return direct.put(sdk.store, key, data, deadline).map(Some);
        }
        // The SDK needs an owned body (it may resend it); a recycled buffer spares the page
        // faults of a fresh one.
        let body = ByteStream::from(Bytes::from_owner(BlockBuf::copy_of(data)));
        runtime()?.block_on(sdk.put(key, body, condition, deadline))
    }

    /// DELETEs the object at `key`, not sent after `deadline`.
    pub(super) fn delete(&self, sdk: Sdk<'_>, key: &str, deadline: Instant) -> Result<()> {
        match &self.direct {
            Some(direct) => direct.delete(sdk.store, key, deadline),
            None => runtime()?.block_on(sdk.delete(key, deadline)),
        }
    }
}
