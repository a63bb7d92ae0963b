//! What one block GET and one block PUT cost in CPU: nbds3's S3 path against aws-sdk-s3 and a
//! bare HTTP/1.1 client.
//!
//! On a machine where the S3 server shares the cores (SeaweedFS or Garage on loopback, 2 cores
//! here), a cold sequential read is CPU-bound, so every CPU-second our client spends per GiB is
//! one the server does not get. `scripts/bench` measures the whole path through nbdkit; this
//! isolates the S3 client. It stores `S3_BENCH_OBJECTS` blocks of `S3_BENCH_SIZE` bytes through
//! `S3Storage`, then reads `S3_BENCH_COUNT` of them back, `S3_BENCH_CONCURRENCY` at a time, four
//! ways:
//!
//! - `S3Storage::read_block`: what the plugin does (on an http:// endpoint, its own
//!   [`DirectClient`](nbds3::storage::direct::DirectClient) path, with the CRC32 check);
//! - the same through aws-sdk-s3, the path https:// endpoints take;
//! - that without the SDK's response checksum validation, to show what the CRC32 costs there;
//! - a bare client: one keep-alive TCP connection per thread, a SigV4-signed GET written by
//!   hand, the body read straight into the block, nothing checked (http:// endpoints only). It
//!   is the floor any HTTP client has to pay: the kernel's copy and the signature.
//!
//! then writes `S3_BENCH_COUNT` blocks back, two ways: `S3Storage::write_block` (nbds3's own PUT
//! path on an http:// endpoint: the block from the caller's buffer, its CRC32 in a header) and
//! the same through aws-sdk-s3 (a copy of the block as the SDK's body, the CRC32 in an
//! aws-chunked trailer). It prints MiB/s, CPU microseconds per request and CPU-seconds per GiB of
//! this process, and of the S3 server if `S3_BENCH_SERVER_PID` names its process
//! (`$(cat /tmp/nbds3-seaweedfs/weed.pid)`, or `/tmp/nbds3-garage/garage.pid`); the PUTs
//! rewrite blocks with the bytes they hold, so the server's figure for them is not what new data
//! would cost it.
//!
//! ```text
//! eval "$(scripts/seaweedfs start)"     # or scripts/garage start
//! cargo bench --bench s3_requests
//! ```
//!
//! Environment: what `scripts/seaweedfs env` (or `scripts/garage env`) prints
//! (`NBDS3_S3_ENDPOINT`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), and
//! optionally `S3_BENCH_BUCKET` (nbds3-bench-get), `S3_BENCH_SIZE` (1048576), `S3_BENCH_OBJECTS`
//! (64), `S3_BENCH_COUNT` (1024), `S3_BENCH_CONCURRENCY` (8).

use std::env::var;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use aws_sdk_s3::config::{Credentials, ResponseChecksumValidation};
use aws_sigv4::http_request::{sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use nbds3::block_buf::BlockBuf;
use nbds3::storage::s3::{client, runtime, S3Storage};
use nbds3::storage::{S3Config, Secret};
use nbds3::{BlockId, ExportName, Storage};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Result<()> {
    let setting = |name: &str, default: usize| -> Result<usize> {
        var(name).map_or(Ok(default), |v| v.parse().map_err(|e| format!("{name}={v}: {e}").into()))
    };
    let size = setting("S3_BENCH_SIZE", 1 << 20)?;
    let objects = setting("S3_BENCH_OBJECTS", 64)?.max(1);
    let count = setting("S3_BENCH_COUNT", 1024)?.max(1);
    let concurrency = setting("S3_BENCH_CONCURRENCY", 8)?.max(1);
    let endpoint =
        var("NBDS3_S3_ENDPOINT").map_err(|_| "NBDS3_S3_ENDPOINT is not set: eval \"$(scripts/seaweedfs start)\"")?;
    let config = S3Config {
        bucket: var("S3_BENCH_BUCKET").unwrap_or_else(|_| "nbds3-bench-get".into()),
        endpoint: Some(endpoint.clone()),
        region: var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        access_key: Some(var("AWS_ACCESS_KEY_ID")?),
        secret_key: Some(Secret(var("AWS_SECRET_ACCESS_KEY")?)),
        path_style: Some(true),
        ..Default::default()
    };
    nbds3::storage::s3::check_bucket(&config)?;
    let export = ExportName::new(&format!("s3-get-bench-{}", std::process::id()))?;
    let sdk = runtime()?.block_on(client(&config));
    let store = Arc::new(S3Storage::new(sdk.clone(), &config, &export, size));
    let ids: Vec<BlockId> = (0..objects as u64).map(BlockId).collect();
    // Distinct, incompressible-looking bytes in every block (Garage compresses with zstd).
    let blocks: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            let mut state = id.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..size)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        })
        .collect();
    for (&id, block) in ids.iter().zip(&blocks) {
        store.write_block(id, block)?;
    }
    println!("{count} GETs of {size}-byte objects, {concurrency} at a time, from {endpoint}");
    println!("{:<40} {:>8} {:>12} {:>10} {:>17}", "client", "MiB/s", "CPU us/req", "CPU s/GiB", "server CPU s/GiB");
    let plugin =
        measure("S3Storage::read_block (nbds3)", size, count, concurrency, || block_reader(Arc::clone(&store), &ids))?;
    let through_sdk = Arc::new(S3Storage::new(sdk.sdk.clone().into(), &config, &export, size));
    let sdk_path = measure("  through aws-sdk-s3 (https endpoints)", size, count, concurrency, || {
        block_reader(Arc::clone(&through_sdk), &ids)
    })?;
    let unchecked = aws_sdk_s3::Client::from_conf(
        sdk.sdk.config().to_builder().response_checksum_validation(ResponseChecksumValidation::WhenRequired).build(),
    );
    let unchecked = Arc::new(S3Storage::new(unchecked.into(), &config, &export, size));
    measure("  the same without the SDK's CRC32 check", size, count, concurrency, || {
        block_reader(Arc::clone(&unchecked), &ids)
    })?;
    let bare = match endpoint.strip_prefix("http://") {
        Some(host) => {
            let host = host.trim_end_matches('/').to_string();
            let keys: Vec<String> =
                ids.iter().map(|&id| format!("/{}/{}", config.bucket, export.block_key(id, size))).collect();
            let identity: Identity =
                Credentials::new(var("AWS_ACCESS_KEY_ID")?, var("AWS_SECRET_ACCESS_KEY")?, None, None, "env").into();
            let region = config.region.clone();
            Some(measure("bare HTTP/1.1 client (the floor)", size, count, concurrency, || {
                bare_reader(&host, &region, &identity, &keys, size)
            })?)
        }
        None => {
            println!("bare HTTP/1.1 client: skipped, it speaks http:// only");
            None
        }
    };
    if let Some(bare) = bare {
        println!(
            "per GET, nbds3 spends {:.2}x the CPU of the bare client; through aws-sdk-s3 it would spend {:.2}x",
            plugin / bare,
            sdk_path / bare
        );
    }
    println!("{count} PUTs of {size}-byte objects, {concurrency} at a time");
    let blocks = Arc::new(blocks);
    let direct_put = measure("S3Storage::write_block (nbds3)", size, count, concurrency, || {
        block_writer(Arc::clone(&store), &ids, &blocks)
    })?;
    let sdk_put = measure("  through aws-sdk-s3 (https endpoints)", size, count, concurrency, || {
        block_writer(Arc::clone(&through_sdk), &ids, &blocks)
    })?;
    println!("per PUT, nbds3 spends {:.2}x the CPU it would spend through aws-sdk-s3", direct_put / sdk_put);
    store.delete_blocks(&ids)?;
    Ok(())
}

/// Makes the `n`th request: reads its object into a buffer of its own, or writes it.
type RequestFn = Box<dyn FnMut(usize) -> Result<()> + Send>;

fn block_reader(store: Arc<S3Storage>, ids: &[BlockId]) -> Result<RequestFn> {
    let ids = ids.to_vec();
    let mut block = BlockBuf::recycled(store.block_size());
    Ok(Box::new(move |n| {
        let id = ids[n % ids.len()];
        if !store.read_block(id, &mut block)? {
            return Err(format!("block {id} is missing").into());
        }
        Ok(())
    }))
}

fn block_writer(store: Arc<S3Storage>, ids: &[BlockId], blocks: &Arc<Vec<Vec<u8>>>) -> Result<RequestFn> {
    let (ids, blocks) = (ids.to_vec(), Arc::clone(blocks));
    Ok(Box::new(move |n| Ok(store.write_block(ids[n % ids.len()], &blocks[n % blocks.len()])?)))
}

fn bare_reader(host: &str, region: &str, identity: &Identity, keys: &[String], size: usize) -> Result<RequestFn> {
    let stream = TcpStream::connect(host)?;
    stream.set_nodelay(true)?;
    let mut response = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    let (host, region, identity, keys) = (host.to_string(), region.to_string(), identity.clone(), keys.to_vec());
    let mut buf = vec![0; size];
    Ok(Box::new(move |n| {
        let path = &keys[n % keys.len()];
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()?
            .into();
        let url = format!("http://{host}{path}");
        let request =
            SignableRequest::new("GET", &url, [("host", host.as_str())].into_iter(), SignableBody::UnsignedPayload)?;
        let (signed, _) = sign(request, &params)?.into_parts();
        let mut head = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n");
        for (name, value) in signed.headers() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        let mut line = String::new();
        response.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            return Err(format!("GET {path}: {}", line.trim_end()).into());
        }
        let mut length = None;
        loop {
            line.clear();
            response.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        if length != Some(size) {
            return Err(format!("GET {path}: content-length {length:?}, expected {size}").into());
        }
        response.read_exact(&mut buf)?;
        Ok(())
    }))
}

/// Runs `count` requests on `concurrency` threads, each with a `RequestFn` from `make`;
/// prints and returns the CPU microseconds per request.
fn measure(
    label: &str,
    size: usize,
    count: usize,
    concurrency: usize,
    make: impl Fn() -> Result<RequestFn>,
) -> Result<f64> {
    let readers = (0..concurrency).map(|_| make()).collect::<Result<Vec<_>>>()?;
    let next = AtomicUsize::new(0);
    let cpu = process_cpu_seconds();
    let server = server_cpu_seconds();
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = readers
            .into_iter()
            .map(|mut read| {
                let next = &next;
                scope.spawn(move || -> Result<()> {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= count {
                            return Ok(());
                        }
                        read(n)?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().map_err(|_| "a reader panicked")?)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu;
    let gib = (count * size) as f64 / f64::from(1 << 30);
    let server = match (server, server_cpu_seconds()) {
        (Some(before), Some(after)) => format!("{:.2}", (after - before) / gib),
        _ => "-".into(),
    };
    let per_request = cpu / count as f64 * 1e6;
    println!("{label:<40} {:>8.0} {per_request:>12.0} {:>10.2} {server:>17}", gib * 1024.0 / seconds, cpu / gib);
    Ok(per_request)
}

/// User and system CPU time so far of the process `S3_BENCH_SERVER_PID`, if set and readable.
fn server_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", var("S3_BENCH_SERVER_PID").ok()?)).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    Some(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// User and system CPU time of this process so far.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
