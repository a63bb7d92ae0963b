//! `S3Storage`: one object per stored block in an S3 bucket, at `blocks/{export}/{offset:016x}`.
//!
//! The [`Storage`] trait is synchronous because nbdkit calls us on its own threads; each call
//! here blocks on one process-wide tokio runtime. That runtime is created on first use, which is
//! after nbdkit forks (threads do not survive a fork); the start-up check in
//! [`check_bucket`] runs on a throw-away runtime that is gone before the fork.
//!
//! Concurrency comes from the callers: nbdkit's worker threads, and the write-back workers of the
//! [`BlockCache`](crate::volume::BlockCache), each blocking on their own request. Retries with
//! backoff (throttling and 5xx included) and timeouts are the SDK's, bounded by `s3-timeout`,
//! without the SDK's process-wide retry quota. A write or delete under an export's lease asks it
//! once it holds a request slot, and no attempt of it goes out past the deadline the lease gives
//! (see [`FencedStorage`](super::FencedStorage)).
//!
//! Block GETs, PUTs and DELETEs to an `http://` endpoint (a local MinIO or Garage, where the
//! server competes with us for the same cores) skip the SDK and the runtime: [`DirectClient`]
//! does them on the caller's thread, with the same checks and retry policy, at half the CPU.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::retry::{RetryPartition, TokenBucket};
use aws_sdk_s3::config::{ConfigBag, Credentials, Intercept, Region, RuntimeComponents, SharedCredentialsProvider};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use bytes::Bytes;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::direct::DirectClient;
use super::keys::{parse_block_leaf, LEASE_PREFIX, RECORD_PREFIX};
use super::s3_errors::classify;
use super::{check_len, Backend, BlockBuf, BlockId, Expect, Fence, S3Config, Storage, VersionedText};
use crate::export::ExportName;
use crate::{Error, Result};

/// S3 allows at most this many keys in one DeleteObjects request.
const MAX_DELETE_BATCH: usize = 1000;

/// The process-wide runtime, created on first use (after nbdkit forks).
///
/// # Errors
/// [`Error::Backend`] if the runtime's threads cannot be started.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("nbds3-s3")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::backend("S3Storage", format!("cannot start the tokio runtime: {e}")))
}

/// The SDK's client, and for block requests the [`DirectClient`] path where it applies.
#[derive(Clone, Debug)]
pub struct S3Client {
    /// Every request but single-block ones, and those too where `direct` is `None`.
    pub sdk: Client,
    direct: Option<Arc<DirectClient>>,
    /// The SDK's retries, counted by [`CountRetries`].
    sdk_retries: Arc<AtomicU64>,
}

impl S3Client {
    /// Whether block GETs, PUTs and DELETEs take the [`DirectClient`] path.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

impl From<Client> for S3Client {
    /// Everything through the SDK, whose retries this does not count (see [`client`]).
    fn from(sdk: Client) -> Self {
        S3Client { sdk, direct: None, sdk_retries: Arc::default() }
    }
}

/// Counts the SDK's retries: every attempt after an operation's first.
#[derive(Debug)]
struct CountRetries(Arc<AtomicU64>);

impl Intercept for CountRetries {
    fn name(&self) -> &'static str {
        "CountRetries"
    }

    fn read_before_attempt(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        if cfg.load::<RequestAttempts>().is_some_and(|a| a.attempts() > 1) {
            self.0.fetch_add(1, Relaxed);
        }
        Ok(())
    }
}

/// Builds an S3 client for `config` that retries transient failures (throttling, 5xx, dropped
/// connections) with backoff, within `config.timeout`. Must run inside a tokio runtime.
pub async fn client(config: &S3Config) -> S3Client {
    let sdk_retries = Arc::default();
    let (sdk, credentials) = build_sdk(config, 5, &sdk_retries).await;
    let direct = match credentials {
        Some(credentials) => DirectClient::new(config, &credentials).await.map(Arc::new),
        None => None,
    };
    S3Client { sdk, direct, sdk_retries }
}

async fn build_client(config: &S3Config, max_attempts: u32) -> Client {
    build_sdk(config, max_attempts, &Arc::default()).await.0
}

/// The SDK's client, counting its retries in `retries`, and the credentials it signs with.
async fn build_sdk(
    config: &S3Config,
    max_attempts: u32,
    retries: &Arc<AtomicU64>,
) -> (Client, Option<SharedCredentialsProvider>) {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        .retry_config(RetryConfig::standard().with_max_attempts(max_attempts))
        .timeout_config(timeouts(config.timeout));
    if let (Some(id), Some(secret)) = (&config.access_key, &config.secret_key) {
        loader = loader.credentials_provider(Credentials::new(id, &secret.0, None, None, "nbds3"));
    }
    let sdk = loader.load().await;
    // The SDK's default retry quota is one bucket of 500 tokens per process, and a throttled
    // retry costs 5: a burst of 503 SlowDown over the requests of one large FLUSH empties it,
    // after which the SDK stops retrying at all and the FLUSH fails. A block device must retry
    // within `s3-timeout` instead; attempts and backoff still bound each request.
    let unlimited = RetryPartition::custom("nbds3").token_bucket(TokenBucket::unlimited()).build();
    let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(config.path_style.unwrap_or(false))
        .retry_partition(unlimited)
        .interceptor(CountRetries(Arc::clone(retries)));
    if let Some(endpoint) = &config.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    (Client::from_conf(builder.build()), sdk.credentials_provider())
}

/// The SDK's bounds on one request, retries included, of at most `operation`.
fn timeouts(operation: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(operation.min(Duration::from_secs(5)))
        .operation_attempt_timeout(operation.min(Duration::from_secs(10)))
        .operation_timeout(operation)
        .build()
}

/// Keeps the SDK from sending any attempt of a request after its deadline (see
/// [`FencedStorage`](super::FencedStorage)): `read_before_transmit` is the SDK's last hook
/// before the request's bytes go to the connection.
#[derive(Debug)]
struct NotSentAfter(Instant);

impl Intercept for NotSentAfter {
    fn name(&self) -> &'static str {
        "NotSentAfter"
    }

    fn read_before_transmit(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        if Instant::now() >= self.0 {
            return Err("not sent: its s3-timeout ran out before it could go out".into());
        }
        Ok(())
    }
}

/// Checks once, at start-up, that the bucket is reachable with these credentials, creating it
/// if it does not exist and the credentials allow that.
///
/// Runs on its own short-lived runtime, so it can be called before nbdkit forks.
///
/// # Errors
/// [`Error::NotFound`], [`Error::PermissionDenied`], [`Error::Unauthenticated`] or
/// [`Error::Backend`], each naming the bucket and endpoint.
pub fn check_bucket(config: &S3Config) -> Result<()> {
    before_fork(config, async {
        // One retry only: a typo in the endpoint should fail in a second, not after backoff.
        let client = build_client(config, 2).await;
        let store = config.describe();
        let probe = client.list_objects_v2().bucket(&config.bucket).prefix("blocks/").max_keys(1).send().await;
        let err = match probe {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if err.code() != Some("NoSuchBucket") {
            return Err(fold(&store, &format!("bucket {}", config.bucket), err));
        }
        log::info!("{store}: bucket {} does not exist, creating it", config.bucket);
        let mut create = client.create_bucket().bucket(&config.bucket);
        if config.region != "us-east-1" {
            create = create.create_bucket_configuration(
                aws_sdk_s3::types::CreateBucketConfiguration::builder()
                    .location_constraint(config.region.as_str().into())
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(e) => {
                let cause = fold(&store, &format!("create bucket {}", config.bucket), e);
                Err(Error::NotFound {
                    store,
                    message: format!("bucket {} does not exist and could not be created ({cause})", config.bucket),
                })
            }
        }
    })
}

/// Runs `work` on a short-lived runtime of its own, which is gone when this returns: safe before
/// nbdkit forks.
fn before_fork<T>(config: &S3Config, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::backend(config.describe(), format!("cannot start a runtime: {e}")))?;
    rt.block_on(work)
}

/// What [`probe_conditional_writes`] found, by store, for the backends opened after the fork.
static CONDITIONAL_WRITES: Mutex<Vec<(String, bool)>> = Mutex::new(Vec::new());

/// Finds out, at start-up, whether the server honours conditional writes (which the export
/// lease relies on), by creating a probe object twice; the backends opened later reuse the
/// answer. Runs on its own short-lived runtime, so it can be called before nbdkit forks.
///
/// # Errors
/// As [`check_bucket`].
pub fn probe_conditional_writes(config: &S3Config) -> Result<bool> {
    let honoured = before_fork(config, async {
        let client = build_client(config, 2).await.into();
        let backend = S3Backend { client, config: config.clone(), atomic_leases: OnceLock::new() };
        backend.probe_conditional_writes().await
    })?;
    crate::lock(&CONDITIONAL_WRITES).push((config.describe(), honoured));
    Ok(honoured)
}

/// The most bytes of a record or lease read: both are a few short lines.
const MAX_TEXT: usize = 64 * 1024;

/// The exports of one bucket: records at `exports/{export}`, leases at `leases/{export}`, blocks
/// under `blocks/{export}/`.
#[derive(Debug)]
pub struct S3Backend {
    client: S3Client,
    config: S3Config,
    /// Whether the server honours conditional writes, found out on first use.
    atomic_leases: OnceLock<bool>,
}

impl S3Backend {
    /// The exports of `config.bucket`, through a client built on the process-wide runtime.
    ///
    /// # Errors
    /// [`Error::Backend`] if the runtime cannot start.
    pub fn new(config: &S3Config) -> Result<Self> {
        let client = runtime()?.block_on(client(config));
        let atomic_leases = OnceLock::new();
        if let Some((_, known)) = crate::lock(&CONDITIONAL_WRITES).iter().find(|(s, _)| *s == config.describe()) {
            let _ = atomic_leases.set(*known);
        }
        Ok(S3Backend { client, config: config.clone(), atomic_leases })
    }

    /// The text at `key` and its ETag, or `None` if there is no such object.
    async fn get_text(&self, key: &str) -> Result<Option<VersionedText>> {
        match self.client.sdk.get_object().bucket(&self.config.bucket).key(key).send().await {
            Ok(mut o) => {
                let version = o.e_tag().unwrap_or_default().to_string();
                // Records and leases are a few lines; an object of any size may be there instead.
                let mut body = Vec::new();
                while let Some(chunk) =
                    o.body.try_next().await.map_err(|e| Error::backend(self, format!("GET {key}: {e}")))?
                {
                    if body.len() + chunk.len() > MAX_TEXT {
                        let why = format!("GET {key}: more than {MAX_TEXT} bytes, so not a record or lease of nbds3");
                        return Err(Error::backend(self, why));
                    }
                    body.extend_from_slice(&chunk);
                }
                let text =
                    String::from_utf8(body).map_err(|_| Error::backend(self, format!("GET {key}: not UTF-8 text")))?;
                Ok(Some(VersionedText { text, version }))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(fold(&self.to_string(), &format!("GET {key}"), e)),
        }
    }

    /// PUTs `text` at `key` if the object is as `expected`; `None` when it is not (HTTP 412, or
    /// 409 for a concurrent conditional write, or 404 for `If-Match` on a deleted object).
    async fn put_text_if(&self, key: &str, expected: Expect<'_>, text: &str) -> Result<Option<String>> {
        let put = self.client.sdk.put_object().bucket(&self.config.bucket).key(key).content_type("text/plain");
        let put = match expected {
            Expect::Absent => put.if_none_match("*"),
            Expect::Version(etag) => put.if_match(etag),
        };
        match put.body(ByteStream::from(text.as_bytes().to_vec())).send().await {
            Ok(o) => Ok(Some(o.e_tag().unwrap_or_default().to_string())),
            Err(e) if matches!(e.raw_response().map(|r| r.status().as_u16()), Some(404 | 409 | 412)) => Ok(None),
            Err(e) => Err(fold(&self.to_string(), &format!("PUT {key}"), e)),
        }
    }

    /// Finds out whether the server honours `If-None-Match: *`, by creating a probe object twice.
    async fn probe_conditional_writes(&self) -> Result<bool> {
        // "/" never appears in an export name, so the probe never meets a real lease.
        let key = format!("{LEASE_PREFIX}probe/{}-{}", std::process::id(), crate::unix_nanos());
        self.put_text_if(&key, Expect::Absent, "probe").await?;
        let honoured = self.put_text_if(&key, Expect::Absent, "probe").await?.is_none();
        if let Err(e) = self.client.sdk.delete_object().bucket(&self.config.bucket).key(&key).send().await {
            log::warn!("{self}: could not delete the probe object {key}: {}", fold(&self.to_string(), "DELETE", e));
        }
        Ok(honoured)
    }
}

impl fmt::Display for S3Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.config.describe())
    }
}

impl Backend for S3Backend {
    fn open(&self, export: &ExportName, block_size: usize) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(S3Storage::new(self.client.clone(), &self.config, export, block_size)))
    }

    fn read_record(&self, export: &ExportName) -> Result<Option<String>> {
        Ok(runtime()?.block_on(self.get_text(&export.record_key()))?.map(|v| v.text))
    }

    fn read_lease(&self, export: &ExportName) -> Result<Option<VersionedText>> {
        runtime()?.block_on(self.get_text(&export.lease_key()))
    }

    fn replace_lease(&self, export: &ExportName, expected: Expect<'_>, text: &str) -> Result<Option<String>> {
        runtime()?.block_on(self.put_text_if(&export.lease_key(), expected, text))
    }

    fn atomic_leases(&self) -> Result<bool> {
        if let Some(&known) = self.atomic_leases.get() {
            return Ok(known);
        }
        let honoured = runtime()?.block_on(self.probe_conditional_writes())?;
        Ok(*self.atomic_leases.get_or_init(|| honoured))
    }

    fn write_record(&self, export: &ExportName, record: &str) -> Result<()> {
        let key = export.record_key();
        let body = ByteStream::from(record.as_bytes().to_vec());
        runtime()?.block_on(async {
            self.client
                .sdk
                .put_object()
                .bucket(&self.config.bucket)
                .key(&key)
                .content_type("text/plain")
                .body(body)
                .send()
                .await
                .map_err(|e| fold(&self.to_string(), &format!("PUT {key}"), e))
                .map(drop)
        })
    }

    fn delete_record(&self, export: &ExportName) -> Result<()> {
        runtime()?.block_on(async {
            for key in [export.record_key(), export.lease_key()] {
                let deleted = self.client.sdk.delete_object().bucket(&self.config.bucket).key(&key).send().await;
                deleted.map_err(|e| fold(&self.to_string(), &format!("DELETE {key}"), e))?;
            }
            Ok(())
        })
    }

    fn list_exports(&self) -> Result<Vec<ExportName>> {
        runtime()?.block_on(async {
            let mut pages = self
                .client
                .sdk
                .list_objects_v2()
                .bucket(&self.config.bucket)
                .prefix(RECORD_PREFIX)
                .into_paginator()
                .send();
            let mut names = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| fold(&self.to_string(), &format!("LIST {RECORD_PREFIX}"), e))?;
                let keys = page.contents().iter().filter_map(|o| o.key());
                names
                    .extend(keys.filter_map(|k| k.strip_prefix(RECORD_PREFIX)).filter_map(|n| ExportName::new(n).ok()));
            }
            names.sort();
            Ok(names)
        })
    }
}

/// The blocks of one export in a bucket.
#[derive(Debug)]
pub struct S3Storage {
    client: Client,
    /// Block GETs, PUTs and DELETEs without the SDK, where that applies.
    direct: Option<Arc<DirectClient>>,
    /// The SDK's retries; shared with the other exports of the bucket, as the client is.
    sdk_retries: Arc<AtomicU64>,
    bucket: String,
    export: ExportName,
    block_size: usize,
    /// `s3-timeout`: the deadline of a block write or delete no fence gave one.
    timeout: Duration,
    /// `S3Storage(endpoint/bucket/blocks/export/)`, for messages.
    name: String,
    /// One permit per block upload or delete in flight: however many callers (write-behind, the
    /// background writer, writers past `max-dirty`, FLUSH) write back at once, `s3-concurrency`
    /// bounds the requests, and the memory of the PUT bodies with them. GETs take none: a read
    /// waits for them, and through the SDK small GETs from a server that leaves Nagle on (Garage)
    /// can each stall ~40 ms behind our delayed ACK, so reads need all the concurrency their
    /// callers give them.
    permits: Semaphore,
}

impl S3Storage {
    /// The store of `export` in `config.bucket`, through `client`.
    pub fn new(client: S3Client, config: &S3Config, export: &ExportName, block_size: usize) -> Self {
        let name = format!(
            "S3Storage({}/{}/{})",
            config.endpoint.as_deref().unwrap_or("aws"),
            config.bucket,
            export.block_prefix()
        );
        let permits = Semaphore::new(config.concurrency.max(1));
        S3Storage {
            client: client.sdk,
            direct: client.direct,
            sdk_retries: client.sdk_retries,
            bucket: config.bucket.clone(),
            export: export.clone(),
            block_size,
            timeout: config.timeout,
            name,
            permits,
        }
    }

    /// Waits for a request permit. The semaphore is never closed, so this cannot fail.
    async fn permit(&self) -> Option<SemaphorePermit<'_>> {
        self.permits.acquire().await.ok()
    }

    fn key(&self, id: BlockId) -> String {
        self.export.block_key(id, self.block_size)
    }

    /// The deadline of a write or delete no fence bounds: `s3-timeout` from now.
    fn unfenced(&self) -> Result<Instant> {
        Ok(Instant::now() + self.timeout)
    }

    /// `fold`, for a block write or delete that had to be sent by `deadline`: one that failed
    /// without an answer once that had passed was stopped by it (the SDK's operation timeout or
    /// [`NotSentAfter`]).
    fn fold_by<E, R>(&self, what: &str, err: SdkError<E, R>, deadline: Instant) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug,
    {
        let answered = matches!(err, SdkError::ServiceError(_) | SdkError::ResponseError(_));
        if !answered && Instant::now() >= deadline {
            let message = format!("{what}: no answer in time, or not sent once its s3-timeout ran out");
            return Error::Timeout { store: self.name.clone(), message };
        }
        fold(&self.name, what, err)
    }
}

/// A request's per-operation settings that keep it within `deadline`: no attempt sent after it,
/// and the whole operation cut off there.
fn within<T, E, B>(
    op: aws_sdk_s3::client::customize::CustomizableOperation<T, E, B>,
    deadline: Instant,
) -> aws_sdk_s3::client::customize::CustomizableOperation<T, E, B> {
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    op.interceptor(NotSentAfter(deadline))
        .config_override(aws_sdk_s3::config::Builder::new().timeout_config(timeouts(left)))
}

impl fmt::Display for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Storage for S3Storage {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn read_block(&self, id: BlockId, buf: &mut BlockBuf) -> Result<bool> {
        check_len(self, self.block_size, buf.len())?;
        if let Some(direct) = &self.direct {
            let stored = direct.get(&self.name, &self.key(id), id, buf)?;
            if !stored {
                buf.fill(0);
            }
            return Ok(stored);
        }
        // The body reaches the runtime in many chunks; awaited on this (nbdkit) thread, each one
        // would cost a thread wake-up. A task on the runtime gathers the whole block into a
        // buffer of its own, wakes this thread once, and the buffers are swapped.
        let get = Get {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: self.key(id),
            name: self.name.clone(),
            block: id,
            len: buf.len(),
        };
        let rt = runtime()?;
        let fetched = rt
            .block_on(rt.spawn(get.run()))
            .map_err(|e| Error::backend(self, format!("GET {}: the request's task failed: {e}", self.key(id))))??;
        match fetched {
            Some(block) => {
                *buf = block;
                Ok(true)
            }
            None => {
                buf.fill(0);
                Ok(false)
            }
        }
    }

    fn write_block(&self, id: BlockId, data: &[u8]) -> Result<()> {
        self.write_block_fenced(id, data, &|| self.unfenced())
    }

    fn delete_block(&self, id: BlockId) -> Result<()> {
        self.delete_block_fenced(id, &|| self.unfenced())
    }

    fn delete_blocks(&self, ids: &[BlockId]) -> Result<()> {
        self.delete_blocks_fenced(ids, &|| self.unfenced())
    }

    fn write_block_fenced(&self, id: BlockId, data: &[u8], fence: Fence<'_>) -> Result<()> {
        check_len(self, self.block_size, data.len())?;
        let key = self.key(id);
        if let Some(direct) = &self.direct {
            let _permit = runtime()?.block_on(self.permit());
            return direct.put(&self.name, &key, id, data, fence()?);
        }
        runtime()?.block_on(async {
            let _permit = self.permit().await;
            let deadline = fence()?;
            // The SDK needs an owned body (it may resend it); a recycled buffer spares the page
            // faults of a fresh one.
            let body = ByteStream::from(Bytes::from_owner(BlockBuf::copy_of(data)));
            let put = self.client.put_object().bucket(&self.bucket).key(&key).body(body).customize();
            // SigV4's payload hash is SHA-256 in software on most CPUs: 70 % of our CPU on 1M
            // PUTs. The SDK's CRC32 checksum (hardware) still guards the bytes.
            within(put, deadline)
                .disable_payload_signing()
                .send()
                .await
                .map_err(|e| self.fold_by(&format!("PUT {key}"), e, deadline))
                .map(drop)
        })
    }

    fn delete_block_fenced(&self, id: BlockId, fence: Fence<'_>) -> Result<()> {
        let key = self.key(id);
        if let Some(direct) = &self.direct {
            let _permit = runtime()?.block_on(self.permit());
            return direct.delete(&self.name, &key, id, fence()?);
        }
        runtime()?.block_on(async {
            let _permit = self.permit().await;
            let deadline = fence()?;
            within(self.client.delete_object().bucket(&self.bucket).key(&key).customize(), deadline)
                .send()
                .await
                .map_err(|e| self.fold_by(&format!("DELETE {key}"), e, deadline))
                .map(drop)
        })
    }

    fn delete_blocks_fenced(&self, ids: &[BlockId], fence: Fence<'_>) -> Result<()> {
        runtime()?.block_on(async {
            for chunk in ids.chunks(MAX_DELETE_BATCH) {
                let objects = chunk
                    .iter()
                    .map(|&id| ObjectIdentifier::builder().key(self.key(id)).build())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| Error::backend(self, format!("DeleteObjects: {e}")))?;
                let delete = Delete::builder()
                    .set_objects(Some(objects))
                    .quiet(true)
                    .build()
                    .map_err(|e| Error::backend(self, format!("DeleteObjects: {e}")))?;
                let what = format!("DeleteObjects of {} blocks from {}", chunk.len(), self.key(chunk[0]));
                let deadline = fence()?;
                let request = self.client.delete_objects().bucket(&self.bucket).delete(delete).customize();
                let out = within(request, deadline).send().await.map_err(|e| self.fold_by(&what, e, deadline))?;
                if let Some(e) = out.errors().first() {
                    return Err(Error::backend(
                        self,
                        format!(
                            "{what}: {} failed: {} {}",
                            e.key().unwrap_or("?"),
                            e.code().unwrap_or("?"),
                            e.message().unwrap_or("")
                        ),
                    ));
                }
            }
            Ok(())
        })
    }

    fn list_blocks(&self) -> Result<Vec<BlockId>> {
        self.list_blocks_in(0..u64::MAX)
    }

    fn list_blocks_in(&self, range: std::ops::Range<u64>) -> Result<Vec<BlockId>> {
        let prefix = self.export.block_prefix();
        runtime()?.block_on(async {
            let mut request = self.client.list_objects_v2().bucket(&self.bucket).prefix(&prefix);
            if let Some(before) = range.start.checked_sub(1) {
                // Keys sort like their offsets (fixed-width hex), so the listing can start here.
                request = request.start_after(self.key(BlockId(before)));
            }
            let mut pages = request.into_paginator().send();
            let mut ids = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| fold(&self.name, &format!("LIST {prefix}"), e))?;
                for object in page.contents() {
                    let leaf = object.key().and_then(|k| k.strip_prefix(&prefix));
                    match leaf.and_then(|l| parse_block_leaf(l, self.block_size)) {
                        Some(id) if id.0 >= range.end => return Ok(ids),
                        Some(id) => ids.push(id),
                        None => log::debug!("{self}: ignoring stray object {:?}", object.key()),
                    }
                }
            }
            Ok(ids)
        })
    }

    fn flush(&self) -> Result<()> {
        // S3 acknowledges a PUT or DELETE only once it is durable: there is nothing to flush.
        Ok(())
    }

    /// The bucket's client's retries, all exports together: they share its connections.
    fn retries(&self) -> u64 {
        self.sdk_retries.load(Relaxed) + self.direct.as_ref().map_or(0, |d| d.retries())
    }
}

/// One block GET, owning what it needs so that it can run as a task of its own.
struct Get {
    client: Client,
    bucket: String,
    key: String,
    name: String,
    block: BlockId,
    len: usize,
}

impl Get {
    /// The block's bytes, or `None` if it is not stored.
    async fn run(self) -> Result<Option<BlockBuf>> {
        let key = &self.key;
        let object = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(fold(&self.name, &format!("GET {key}"), e)),
        };
        let expected = self.len;
        let corrupt = |size: String| Error::CorruptBlock {
            store: self.name.clone(),
            block: self.block.0,
            message: format!("object {key} is {size} bytes, expected {expected}"),
        };
        if let Some(len) = object.content_length().filter(|&len| len != expected as i64) {
            return Err(corrupt(len.to_string()));
        }
        // Chunk by chunk into one buffer: collecting the body first would cost a second
        // block-sized buffer and copy. Storage overwrites all of it, so a recycled one will do.
        let mut buf = BlockBuf::recycled(expected);
        let mut body = object.body;
        let mut filled = 0;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| Error::backend(&self.name, format!("GET {key}: reading the body: {e}")))?
        {
            let end = filled + chunk.len();
            let Some(dst) = buf.get_mut(filled..end) else { return Err(corrupt(format!("more than {filled}"))) };
            dst.copy_from_slice(&chunk);
            filled = end;
        }
        if filled != expected {
            return Err(corrupt(filled.to_string()));
        }
        Ok(Some(buf))
    }
}

/// Folds an SDK error into a crate error category, keeping the operation, key, status and code.
fn fold<E, R>(store: &str, what: &str, err: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug,
{
    let store = store.to_string();
    let code = err.code().unwrap_or_default().to_string();
    let detail = err.message().map(|m| format!(": {m}")).unwrap_or_default();
    match &err {
        SdkError::TimeoutError(_) => Error::Timeout { store, message: format!("{what}: no answer in time") },
        SdkError::DispatchFailure(d) => {
            let message = if d.is_timeout() {
                return Error::Timeout { store, message: format!("{what}: no answer in time") };
            } else {
                format!(
                    "{what}: cannot reach the endpoint: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&err)
                )
            };
            Error::Backend { store, message }
        }
        _ if code.is_empty() => Error::Backend {
            store,
            message: format!("{what}: {}", aws_smithy_types::error::display::DisplayErrorContext(&err)),
        },
        _ => classify(&store, what, &code, &detail),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io::{BufRead, BufReader, Write};

    use super::*;
    use crate::lease::{Lease, LeaseConfig};
    use crate::storage::direct::tests::{canned_server, Answer};
    use crate::storage::{FencedStorage, MemoryBackend, Secret};

    /// [`canned_server`] giving `answers` in turn, for a bucket with one request slot and a
    /// 5 s `s3-timeout`.
    fn canned(answers: Vec<Answer>) -> (S3Config, Arc<Mutex<Vec<String>>>) {
        let (config, seen) = canned_server(Arc::new(Mutex::new(VecDeque::from(answers))));
        (S3Config { concurrency: 1, timeout: Duration::from_secs(5), ..config }, seen)
    }

    const STORED: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    /// The store on `config`, through the direct path or through the SDK.
    fn stores(config: &S3Config) -> [(&'static str, S3Storage); 2] {
        let client = runtime().unwrap().block_on(client(config));
        assert!(client.is_direct());
        let export = ExportName::new("e").unwrap();
        let through_sdk = S3Client { direct: None, ..client.clone() };
        [
            ("direct", S3Storage::new(client, config, &export, 4)),
            ("sdk", S3Storage::new(through_sdk, config, &export, 4)),
        ]
    }

    fn sent(seen: &Mutex<Vec<String>>, key: &str) -> usize {
        seen.lock().unwrap().iter().filter(|r| r.contains(key)).count()
    }

    /// With `s3-concurrency=1`, a write the lease allowed waits for the only request slot behind
    /// a slow one; the lease is released (as when a successor takes over) meanwhile. The write
    /// must then fail, not land: the lease is asked again once the slot is free.
    #[test]
    fn a_write_queued_for_a_request_slot_past_the_lease_is_not_sent() {
        let slow = || Answer::Delay(STORED.into(), Duration::from_millis(1500));
        let (config, seen) = canned(vec![slow(), slow()]);
        for (path, storage) in stores(&config) {
            let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
            let lease_config =
                LeaseConfig { time: Duration::from_secs(60), takeover: false, request_timeout: config.timeout };
            let lease = Lease::new(backend, ExportName::new("e").unwrap(), lease_config);
            lease.hold().unwrap();
            let fenced = Arc::new(FencedStorage::new(Arc::new(storage), lease.clone()));
            let slow = std::thread::spawn({
                let fenced = fenced.clone();
                move || fenced.write_block(BlockId(0), b"slow")
            });
            std::thread::sleep(Duration::from_millis(300));
            let queued = std::thread::spawn({
                let fenced = fenced.clone();
                move || fenced.write_block(BlockId(1), b"late")
            });
            std::thread::sleep(Duration::from_millis(300));
            lease.release();
            let err = queued.join().unwrap().unwrap_err();
            assert!(matches!(err, Error::Lease { .. }), "{path}: {err}");
            slow.join().unwrap().unwrap();
            assert_eq!(sent(&seen, "/bucket/blocks/e/0000000000000004"), 0, "{path}: the late write landed");
            seen.lock().unwrap().clear();
        }
    }

    /// A process frozen between the lease's check and the send wakes past the write's deadline:
    /// the request fails as timed out and no byte of it reaches the server.
    #[test]
    fn a_request_past_its_deadline_is_not_sent() {
        let (config, seen) = canned(vec![Answer::Send(STORED.into()), Answer::Send(STORED.into())]);
        let passed = || Ok(Instant::now().checked_sub(Duration::from_millis(1)).unwrap());
        for (path, storage) in stores(&config) {
            for result in [
                storage.write_block_fenced(BlockId(1), b"late", &passed),
                storage.delete_block_fenced(BlockId(1), &passed),
                storage.delete_blocks_fenced(&[BlockId(1), BlockId(2)], &passed),
            ] {
                let err = result.unwrap_err();
                assert!(matches!(err, Error::Timeout { .. }), "{path}: {err}");
            }
            let requests = seen.lock().unwrap().clone();
            assert!(requests.is_empty(), "{path}: sent past its deadline: {requests:?}");
            // The same store sends what is still in time.
            storage.write_block_fenced(BlockId(1), b"soon", &|| Ok(Instant::now() + config.timeout)).unwrap();
            assert_eq!(sent(&seen, "/bucket/blocks/e/0000000000000004"), 1, "{path}");
            seen.lock().unwrap().clear();
        }
    }

    /// A write whose first attempt meets a slow 503 is not retried past its deadline.
    #[test]
    fn no_retry_is_sent_past_the_deadline() {
        let slow_down = || {
            let body = "<Error><Code>SlowDown</Code><Message>as canned</Message></Error>";
            let answer = format!("HTTP/1.1 503 Slow Down\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            Answer::Delay(answer.into(), Duration::from_millis(400))
        };
        let (config, seen) = canned(vec![slow_down(), slow_down()]);
        for (path, storage) in stores(&config) {
            let started = Instant::now();
            let deadline = started + Duration::from_millis(300);
            let err = storage.write_block_fenced(BlockId(1), b"late", &|| Ok(deadline)).unwrap_err();
            assert!(matches!(err, Error::Timeout { .. }), "{path}: {err}");
            assert!(started.elapsed() < Duration::from_secs(2), "{path}: took {:?}", started.elapsed());
            // Give a retry the time it would take to arrive.
            std::thread::sleep(Duration::from_millis(1200));
            let requests = seen.lock().unwrap().clone();
            assert_eq!(requests.len(), 1, "{path}: retried past its deadline: {requests:?}");
            seen.lock().unwrap().clear();
        }
    }

    /// The SDK's retries reach [`Storage::retries`]: a block GET answered 503 SlowDown once, then
    /// with the block, counts one.
    #[test]
    fn sdk_retries_are_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let slow_down = "<Error><Code>SlowDown</Code><Message>as canned</Message></Error>";
            let answers = [
                format!("HTTP/1.1 503 Slow Down\r\nContent-Length: {}\r\n\r\n{slow_down}", slow_down.len()),
                "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd".to_string(),
            ];
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            for answer in answers {
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                (&stream).write_all(answer.as_bytes()).unwrap();
            }
        });
        let config = S3Config {
            bucket: "bucket".into(),
            endpoint: Some(endpoint),
            path_style: Some(true),
            access_key: Some("AKID".into()),
            secret_key: Some(Secret("secret".into())),
            ..Default::default()
        };
        let client = runtime().unwrap().block_on(client(&config));
        let through_sdk = S3Client { direct: None, ..client };
        let storage = S3Storage::new(through_sdk, &config, &ExportName::new("e").unwrap(), 4);
        let mut buf = BlockBuf::zeroed(4);
        assert!(storage.read_block(BlockId(0), &mut buf).unwrap());
        assert_eq!(&buf[..], b"abcd");
        assert_eq!(storage.retries(), 1);
    }
}
