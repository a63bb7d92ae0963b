//! The SDK transport: the aws-sdk-s3 client, configured from the one [`RetryPolicy`], and the
//! requests it sends. It takes every request the [direct](super::direct) transport does not
//! (TLS, ranged reads, conditional writes, listings, batch deletes), and all of them where that
//! does not apply. Its operations are async and take what they need, so that they run on the
//! process-wide runtime or, before nbdkit forks, on a short-lived one (see
//! [`check_bucket`](super::check_bucket)).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::retry::{RetryPartition, TokenBucket};
use aws_sdk_s3::config::{ConfigBag, Credentials, Intercept, Region, RuntimeComponents, SharedCredentialsProvider};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::retries::RequestAttempts;

use super::errors::{fold, fold_by, status_is, DEADLINES};
use super::retry::RetryPolicy;
use super::S3Config;
use crate::storage::objects::{Listed, Object, Put};
use crate::storage::BlockBuf;
use crate::{Error, Result};

/// Builds the SDK's client for `config` under `policy`, counting its retries in `retries`;
/// returns it with the credentials it signs with. Must run inside a tokio runtime.
pub(super) async fn sdk_client(
    config: &S3Config,
    policy: RetryPolicy,
    retries: &Arc<AtomicU64>,
) -> (Client, Option<SharedCredentialsProvider>) {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        .retry_config(policy.sdk_retries())
        .timeout_config(policy.sdk_timeouts(config.timeout));
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

/// Keeps the SDK from sending any attempt of a request after its deadline (see
/// [`FencedStorage`](crate::storage::FencedStorage)): `read_before_transmit` is the SDK's last
/// hook before the request's bytes go to the connection.
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
            return Err(format!("not sent: its deadline passed before it could go out ({DEADLINES})").into());
        }
        Ok(())
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
        .config_override(aws_sdk_s3::config::Builder::new().timeout_config(RetryPolicy::REQUESTS.sdk_timeouts(left)))
}

/// One bucket through the SDK, with the store's name for messages.
#[derive(Clone, Debug)]
pub(super) struct Sdk<'a> {
    pub(super) client: &'a Client,
    pub(super) bucket: &'a str,
    pub(super) store: &'a str,
}

/// What a GET into a buffer found.
pub(super) enum Fetched {
    Missing,
    Filled(BlockBuf),
    WrongSize(u64),
}

impl Sdk<'_> {
    /// The whole object at `key`, refusing one longer than `max_len` before reading more.
    pub(super) async fn get(&self, key: &str, max_len: usize) -> Result<Option<Object>> {
        let mut o = match self.client.get_object().bucket(self.bucket).key(key).send().await {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(fold(self.store, &format!("GET {key}"), e)),
        };
        let version = o.e_tag().unwrap_or_default().to_string();
        let mut bytes = Vec::new();
        while let Some(chunk) = o.body.try_next().await.map_err(|e| self.body_failed(key, e))? {
            if bytes.len() + chunk.len() > max_len {
                let message = format!("GET {key}: more than {max_len} bytes");
                return Err(Error::CorruptRecord { store: self.store.to_string(), key: key.to_string(), message });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(Object { bytes, version }))
    }

    fn body_failed(&self, key: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::backend_caused(self.store, format!("GET {key}: reading the body: {e}"), e)
    }

    /// `len` bytes of the object at `key` from `offset` (the whole object, which must be that
    /// long, when `None`), gathered chunk by chunk into one buffer: collecting the body first
    /// would cost a second buffer and copy.
    pub(super) async fn read(&self, key: &str, offset: Option<u64>, len: usize) -> Result<Fetched> {
        let mut get = self.client.get_object().bucket(self.bucket).key(key);
        if let Some(start) = offset {
            let Some(end) = start.checked_add(len as u64).filter(|_| len > 0) else {
                return Ok(Fetched::WrongSize(0));
            };
            get = get.range(format!("bytes={start}-{}", end - 1));
        }
        let object = match get.send().await {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(Fetched::Missing),
            // A range that starts past the end.
            Err(e) if offset.is_some() && status_is(&e, &[416]) => {
                let total = e.raw_response().and_then(|r| r.headers().get("content-range")).and_then(total_length);
                return Ok(Fetched::WrongSize(total.unwrap_or(0)));
            }
            Err(e) => return Err(fold(self.store, &format!("GET {key}"), e)),
        };
        let size = match offset {
            None => object.content_length().and_then(|n| u64::try_from(n).ok()),
            Some(_) => object.content_range().and_then(total_length),
        };
        if object.content_length().is_some_and(|n| n != len as i64) {
            return Ok(Fetched::WrongSize(size.unwrap_or(0)));
        }
        // The caller overwrites all of it, so a recycled buffer will do.
        let mut buf = BlockBuf::recycled(len);
        let mut body = object.body;
        let mut filled = 0;
        while let Some(chunk) = body.try_next().await.map_err(|e| self.body_failed(key, e))? {
            let end = filled + chunk.len();
            let Some(dst) = buf.get_mut(filled..end) else { return Ok(Fetched::WrongSize(size.unwrap_or(end as u64))) };
            dst.copy_from_slice(&chunk);
            filled = end;
        }
        if filled != len {
            return Ok(Fetched::WrongSize(size.unwrap_or(filled as u64)));
        }
        Ok(Fetched::Filled(buf))
    }

    /// PUTs `body` at `key` if `condition` holds, no attempt after `deadline`; `None` when it
    /// does not (HTTP 412, or 409 for a concurrent conditional write, or 404 for `If-Match` on a
    /// deleted object).
    pub(super) async fn put(
        &self,
        key: &str,
        body: ByteStream,
        condition: Put<'_>,
        deadline: Instant,
    ) -> Result<Option<String>> {
        let put = self.client.put_object().bucket(self.bucket).key(key).body(body);
        let put = match condition {
            Put::Always => put,
            Put::IfAbsent => put.if_none_match("*"),
            Put::IfVersion(etag) => put.if_match(etag),
        };
        // SigV4's payload hash is SHA-256 in software on most CPUs: 70 % of our CPU on 1M PUTs.
        // The SDK's CRC32 checksum (hardware) still guards the bytes.
        match within(put.customize(), deadline).disable_payload_signing().send().await {
            Ok(o) => Ok(Some(o.e_tag().unwrap_or_default().to_string())),
            Err(e) if condition != Put::Always && status_is(&e, &[404, 409, 412]) => Ok(None),
            Err(e) => Err(fold_by(self.store, &format!("PUT {key}"), e, deadline)),
        }
    }

    /// DELETEs one object, no attempt after `deadline`.
    pub(super) async fn delete(&self, key: &str, deadline: Instant) -> Result<()> {
        within(self.client.delete_object().bucket(self.bucket).key(key).customize(), deadline)
            .send()
            .await
            .map_err(|e| fold_by(self.store, &format!("DELETE {key}"), e, deadline))
            .map(drop)
    }

    /// Deletes up to 1000 objects in one DeleteObjects request, no attempt after `deadline`.
    pub(super) async fn delete_batch(&self, keys: &[String], deadline: Instant) -> Result<()> {
        let what = format!("DeleteObjects of {} objects from {}", keys.len(), keys.first().map_or("", |k| k));
        let invalid = |e: aws_sdk_s3::error::BuildError| Error::backend_caused(self.store, format!("{what}: {e}"), e);
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let delete = Delete::builder().set_objects(Some(objects)).quiet(true).build().map_err(invalid)?;
        let request = self.client.delete_objects().bucket(self.bucket).delete(delete).customize();
        let out = within(request, deadline).send().await.map_err(|e| fold_by(self.store, &what, e, deadline))?;
        match out.errors().first() {
            Some(e) => Err(Error::backend(
                self.store,
                format!(
                    "{what}: {} failed: {} {}",
                    e.key().unwrap_or("?"),
                    e.code().unwrap_or("?"),
                    e.message().unwrap_or("")
                ),
            )),
            None => Ok(()),
        }
    }

    /// Visits the objects under `prefix` after `start_after`, in key order, until `visit` says
    /// stop.
    pub(super) async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        visit: &mut dyn FnMut(Listed) -> bool,
    ) -> Result<()> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(self.bucket)
            .prefix(prefix)
            .set_start_after(start_after.map(str::to_string))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| fold(self.store, &format!("LIST {prefix}"), e))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                let size = object.size().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
                let modified = object
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                if !visit(Listed { key: key.to_string(), size, modified }) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The object's whole length from a `Content-Range` (`bytes 0-9/1234` or `bytes */1234`).
fn total_length(range: &str) -> Option<u64> {
    range.rsplit_once('/').and_then(|(_, total)| total.trim().parse().ok())
}
