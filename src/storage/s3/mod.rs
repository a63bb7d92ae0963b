//! The S3 backend: a bucket as an [`ObjectStore`] ([`S3Objects`]), on which the generic
//! [`ObjectBackend`] keeps records, leases and the blocks of each export.
//!
//! One module per concern: [`transport`] is the one seam between the SDK ([`sdk`]) and the
//! hand-written HTTP/1.1 client ([`direct`]) that takes block GETs, PUTs and DELETEs on `http://`
//! endpoints at half the CPU; [`retry`] is the one retry policy both follow; [`errors`] the one
//! fold of S3's failures into the crate's categories; [`config`] how to reach the bucket.
//!
//! The SDK's requests block on one process-wide tokio runtime ([`runtime`]), created on first
//! use, which is after nbdkit forks (threads do not survive a fork); the start-up checks
//! ([`check_bucket`], [`probe_conditional_writes`]) run on throw-away runtimes that are gone
//! before the fork.

use std::sync::{Arc, Mutex, OnceLock};

use aws_sdk_s3::error::ProvideErrorMetadata;

use super::{ObjectBackend, ObjectStore};
use crate::{Error, Result};

pub mod config;
pub mod direct;
mod errors;
pub mod objects;
mod retry;
mod sdk;
pub mod transport;

pub use config::{S3Config, Secret};
pub use objects::S3Objects;
pub use transport::Transport;

use errors::fold;
use retry::RetryPolicy;

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
        .map_err(|e| Error::backend("S3", format!("cannot start the tokio runtime: {e}")))
}

/// The exports of `config.bucket`: records at `exports/{export}`, leases at `leases/{export}`,
/// blocks under `blocks/{export}/`, each export's blocks with `s3-concurrency` request slots of
/// their own. Builds the transport on the process-wide runtime, so call it after nbdkit forks.
///
/// # Errors
/// [`Error::Backend`] if the runtime cannot start.
pub fn backend(config: &S3Config) -> Result<ObjectBackend> {
    let transport = runtime()?.block_on(Transport::new(config));
    let objects = Arc::new(S3Objects::new(transport, config));
    let per_export = Arc::clone(&objects);
    Ok(ObjectBackend::new(objects)
        .with_stores_per_export(move || Arc::new(per_export.with_own_request_slots()) as Arc<dyn ObjectStore>))
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
        let client = Transport::sdk_only(config, RetryPolicy::PROBES).await.sdk;
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
        .map_err(|e| Error::backend_caused(config.describe(), format!("cannot start a runtime: {e}"), e))?;
    rt.block_on(work)
}

/// What [`probe_conditional_writes`] found, by store, for the stores opened after the fork.
static CONDITIONAL_WRITES: Mutex<Vec<(String, bool)>> = Mutex::new(Vec::new());

/// What [`probe_conditional_writes`] found for `config`'s bucket, if it ran.
fn probed_conditional_writes(config: &S3Config) -> Option<bool> {
    crate::lock(&CONDITIONAL_WRITES).iter().find(|(s, _)| *s == config.describe()).map(|&(_, known)| known)
}

/// Finds out, at start-up, whether the server honours conditional writes (which the export
/// lease relies on), by creating a probe object twice; the stores opened later reuse the answer.
/// Runs on its own short-lived runtime, so it can be called before nbdkit forks.
///
/// # Errors
/// As [`check_bucket`].
pub fn probe_conditional_writes(config: &S3Config) -> Result<bool> {
    let honoured = before_fork(config, async {
        let transport = Transport::sdk_only(config, RetryPolicy::PROBES).await;
        let store = config.describe();
        objects::probe(transport.sdk(&config.bucket, &store), config.timeout).await
    })?;
    crate::lock(&CONDITIONAL_WRITES).push((config.describe(), honoured));
    Ok(honoured)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io::{BufRead, BufReader, Write};
    use std::time::{Duration, Instant};

    use super::direct::tests::{canned_server, Answer};
    use super::*;
    use crate::lease::{Lease, LeaseConfig};
    use crate::storage::{Backend, BlockBuf, BlockId, FencedStorage, MemoryBackend, PlainStorage, Storage};
    use crate::ExportName;

    /// [`canned_server`] giving `answers` in turn, for a bucket with one request slot and a
    /// 5 s `s3-timeout`.
    fn canned(answers: Vec<Answer>) -> (S3Config, Arc<Mutex<Vec<String>>>) {
        let (config, seen) = canned_server(Arc::new(Mutex::new(VecDeque::from(answers))));
        (S3Config { concurrency: 1, timeout: Duration::from_secs(5), ..config }, seen)
    }

    const STORED: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    /// The store on `config`, through the direct path or through the SDK.
    fn stores(config: &S3Config) -> [(&'static str, PlainStorage); 2] {
        let transport = runtime().unwrap().block_on(Transport::new(config));
        assert!(transport.is_direct());
        let export = ExportName::new("e").unwrap();
        let through_sdk = transport.without_direct();
        let store = |t| PlainStorage::new(Arc::new(S3Objects::new(t, config)), &export, 4);
        [("direct", store(transport)), ("sdk", store(through_sdk))]
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
        let transport = runtime().unwrap().block_on(Transport::new(&config)).without_direct();
        let storage =
            PlainStorage::new(Arc::new(S3Objects::new(transport, &config)), &ExportName::new("e").unwrap(), 4);
        let mut buf = BlockBuf::zeroed(4);
        assert!(storage.read_block(BlockId(0), &mut buf).unwrap());
        assert_eq!(&buf[..], b"abcd");
        assert_eq!(storage.retries(), 1);
    }
}
