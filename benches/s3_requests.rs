//! What one block GET and one block PUT cost in CPU: nbds3's S3 path against aws-sdk-s3,
//! hyper and a bare HTTP/1.1 client.
//!
//! On a machine where the S3 server shares the cores (SeaweedFS or Garage on loopback, 2 cores
//! here), a cold sequential read is CPU-bound, so every CPU-second our client spends per GiB is
//! one the server does not get. `scripts/bench` measures the whole path through nbdkit; this
//! isolates the S3 client. It stores `S3_BENCH_OBJECTS` blocks of `S3_BENCH_SIZE` bytes through
//! `PlainStorage`, then reads `S3_BENCH_COUNT` of them back, `S3_BENCH_CONCURRENCY` at a time, these
//! ways:
//!
//! - `plain`, `PlainStorage::read_block`: what the plugin does (on an http:// endpoint, its own
//!   [`DirectClient`] path, with the CRC32 check);
//! - `sdk`, the same through aws-sdk-s3, the path https:// endpoints take;
//! - `sdk-unchecked`, that without the SDK's response checksum validation, to show what the
//!   CRC32 costs there;
//! - and, on http:// endpoints only, the transports on their own: `direct`,
//!   [`DirectClient::get`] (the hand-written HTTP/1.1 parser); `hyper-thread` and
//!   `hyper-pooled`, the same request through hyper in two ways (see [`hyper_clients`]); and
//!   `bare`, a bare client: one keep-alive TCP connection per thread, a SigV4-signed GET written
//!   by hand, the body read straight into the block, nothing checked. It is the floor any HTTP
//!   client has to pay: the kernel's copy and the signature.
//!
//! then writes `S3_BENCH_COUNT` blocks back: `plain`, `PlainStorage::write_block` (nbds3's own
//! PUT path on an http:// endpoint: the block from the caller's buffer, its CRC32 in a header);
//! `sdk`, the same through aws-sdk-s3 (a copy of the block as the SDK's body, the CRC32 in an
//! aws-chunked trailer); and on http:// endpoints `direct`, [`DirectClient::put`], and hyper's
//! two ways, `hyper-thread` and `hyper-pooled`.
//!
//! Every way runs `S3_BENCH_ROUNDS` times, the ways taking turns, so that a slow spell of the
//! shared machine falls on all of them. Each run prints MiB/s, CPU microseconds per request and
//! CPU-seconds per GiB of this process (user and system, all threads), the median and 99th
//! percentile latency of one request, and the S3 server's CPU-seconds per GiB if
//! `S3_BENCH_SERVER_PID` names its process (`$(cat /tmp/nbds3-seaweedfs/weed.pid)`, or
//! `/tmp/nbds3-garage/garage.pid`); the PUTs rewrite blocks with the bytes they hold, so the
//! server's figure for them is not what new data would cost it. A summary then gives each way's
//! median CPU per request and latency over the rounds, as ratios to `DirectClient`'s in the same
//! round, with the lowest and highest ratio.
//!
//! ```text
//! eval "$(scripts/seaweedfs start)"     # or scripts/garage start
//! cargo bench --bench s3_requests
//! ```
//!
//! Environment: what `scripts/seaweedfs env` (or `scripts/garage env`) prints
//! (`NBDS3_S3_ENDPOINT`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), and
//! optionally `S3_BENCH_BUCKET` (nbds3-bench-get), `S3_BENCH_SIZE` (1048576), `S3_BENCH_OBJECTS`
//! (64), `S3_BENCH_COUNT` (1024), `S3_BENCH_CONCURRENCY` (8), `S3_BENCH_ROUNDS` (3), and:
//!
//! - `S3_BENCH_GETS`, `S3_BENCH_PUTS`: the names of the ways to run, separated by spaces or
//!   commas (all of them when unset; `none` for none): `scripts/bench` runs `S3_BENCH_GETS="plain
//!   bare" S3_BENCH_PUTS=none`, the floor of the cold read and nbds3's own GET beside it, in a
//!   fraction of the time. A name that is not among the ways is an error, not a way quietly left
//!   out.
//! - `S3_BENCH_TSV`: a file to append each way's summary to, one tab-separated line per way:
//!   `get` or `put`, its name, its median CPU-seconds per GiB over the rounds and its median
//!   latency in microseconds (the medians of the rounds' medians), for `scripts/bench` to read.

use std::env::var;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::config::{Credentials, ResponseChecksumValidation, SharedCredentialsProvider};
use aws_sigv4::http_request::{sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use nbds3::block_buf::BlockBuf;
use nbds3::storage::objects::ReadInto;
use nbds3::storage::s3::direct::DirectClient;
use nbds3::storage::s3::{self, runtime, S3Objects};
use nbds3::storage::PlainStorage;
use nbds3::storage::{S3Config, Secret};
use nbds3::{BlockId, ExportName, Storage};

use hyper_clients::{PerThread, Pooled, Target};

#[path = "s3_requests/hyper_clients.rs"]
mod hyper_clients;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// SHA-256 of the empty body, which SigV4 signs for a GET.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The way the others are compared with.
const DIRECT: &str = "DirectClient (hand-written HTTP/1.1)";
const PER_THREAD: &str = "hyper conn::http1, a runtime per thread";
const POOLED: &str = "hyper-util Client, pooled, nbds3's runtime";

/// A way of making requests, and how each thread gets its [`RequestFn`].
struct Contender<'a> {
    /// What `S3_BENCH_GETS`, `S3_BENCH_PUTS` and `S3_BENCH_TSV` call it.
    name: &'static str,
    /// What the tables call it.
    label: &'static str,
    make: Box<dyn Fn() -> Result<RequestFn> + 'a>,
}

/// Makes the `n`th request: reads its object into a buffer of its own, or writes it.
type RequestFn = Box<dyn FnMut(usize) -> Result<()> + Send>;

fn main() -> Result<()> {
    let setting = |name: &str, default: usize| -> Result<usize> {
        var(name).map_or(Ok(default), |v| v.parse().map_err(|e| format!("{name}={v}: {e}").into()))
    };
    let size = setting("S3_BENCH_SIZE", 1 << 20)?;
    let objects = setting("S3_BENCH_OBJECTS", 64)?.max(1);
    let count = setting("S3_BENCH_COUNT", 1024)?.max(1);
    let concurrency = setting("S3_BENCH_CONCURRENCY", 8)?.max(1);
    let rounds = setting("S3_BENCH_ROUNDS", 3)?.max(1);
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
    let sdk = runtime()?.block_on(s3::Transport::new(&config));
    let store = Arc::new(PlainStorage::new(Arc::new(S3Objects::new(sdk.clone(), &config)), &export, size));
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
    let blocks = Arc::new(blocks);
    let through_sdk =
        Arc::new(PlainStorage::new(Arc::new(S3Objects::new(sdk.without_direct(), &config)), &export, size));
    let unchecked = aws_sdk_s3::Client::from_conf(
        sdk.sdk.config().to_builder().response_checksum_validation(ResponseChecksumValidation::WhenRequired).build(),
    );
    let unchecked = Arc::new(PlainStorage::new(Arc::new(S3Objects::new(unchecked.into(), &config)), &export, size));
    let keys: Arc<[String]> = ids.iter().map(|&id| export.block_key(id, size)).collect();
    let paths: Vec<String> = keys.iter().map(|key| format!("/{}/{key}", config.bucket)).collect();
    let credentials = Credentials::new(var("AWS_ACCESS_KEY_ID")?, var("AWS_SECRET_ACCESS_KEY")?, None, None, "env");
    let direct = runtime()?.block_on(DirectClient::new(&config, &SharedCredentialsProvider::new(credentials.clone())));
    // DirectClient, hyper and the bare client speak http:// only.
    let http = match (direct, endpoint.strip_prefix("http://")) {
        (Some(direct), Some(host)) => {
            let signer = Signer {
                host: host.trim_end_matches('/').into(),
                region: config.region.clone(),
                identity: credentials.into(),
            };
            let target = Arc::new(Target { signer, prefix: format!("/{}/", config.bucket) });
            Some((Arc::new(direct), Pooled::new(runtime()?, Arc::clone(&target)), target))
        }
        _ => None,
    };

    let mut gets = vec![
        contender("plain", "PlainStorage::read_block (nbds3)", || block_reader(Arc::clone(&store), &ids)),
        contender("sdk", "  through aws-sdk-s3 (https endpoints)", || block_reader(Arc::clone(&through_sdk), &ids)),
        contender("sdk-unchecked", "  the same without the SDK's CRC32 check", || {
            block_reader(Arc::clone(&unchecked), &ids)
        }),
    ];
    let mut puts = vec![
        contender("plain", "PlainStorage::write_block (nbds3)", || block_writer(Arc::clone(&store), &ids, &blocks)),
        contender("sdk", "  through aws-sdk-s3 (https endpoints)", || {
            block_writer(Arc::clone(&through_sdk), &ids, &blocks)
        }),
    ];
    match &http {
        Some((direct, pooled, target)) => {
            gets.extend([
                contender("direct", DIRECT, || Ok(reader(Direct(Arc::clone(direct)), &keys, size))),
                contender("hyper-thread", PER_THREAD, || {
                    Ok(reader(PerThread::connect(Arc::clone(target))?, &keys, size))
                }),
                contender("hyper-pooled", POOLED, || Ok(reader(pooled.clone(), &keys, size))),
                contender("bare", "bare HTTP/1.1 client (the floor)", || bare_reader(&target.signer, &paths, size)),
            ]);
            puts.extend([
                contender("direct", DIRECT, || Ok(writer(Direct(Arc::clone(direct)), &keys, &blocks))),
                contender("hyper-thread", PER_THREAD, || {
                    Ok(writer(PerThread::connect(Arc::clone(target))?, &keys, &blocks))
                }),
                contender("hyper-pooled", POOLED, || Ok(writer(pooled.clone(), &keys, &blocks))),
            ]);
        }
        None => println!("DirectClient, hyper and the bare client: skipped, they speak http:// only"),
    }
    let gets = chosen("S3_BENCH_GETS", gets)?;
    let puts = chosen("S3_BENCH_PUTS", puts)?;
    for (&id, block) in ids.iter().zip(blocks.iter()) {
        store.write_block(id, block)?;
    }
    if !gets.is_empty() {
        println!("{count} GETs of {size}-byte objects, {concurrency} at a time, from {endpoint}");
        let medians = compare(&gets, rounds, size, count, concurrency)?;
        record("get", &gets, &medians, size)?;
    }
    if !puts.is_empty() {
        println!("{count} PUTs of {size}-byte objects, {concurrency} at a time");
        let medians = compare(&puts, rounds, size, count, concurrency)?;
        record("put", &puts, &medians, size)?;
    }
    store.delete_blocks(&ids)?;
    Ok(())
}

fn contender<'a>(name: &'static str, label: &'static str, make: impl Fn() -> Result<RequestFn> + 'a) -> Contender<'a> {
    Contender { name, label, make: Box::new(make) }
}

/// The ways that the environment variable `setting` names, in their own order; all of them if
/// it is unset.
fn chosen<'a>(setting: &str, ways: Vec<Contender<'a>>) -> Result<Vec<Contender<'a>>> {
    let Ok(list) = var(setting) else { return Ok(ways) };
    let names: Vec<&str> = list.split([' ', ',']).filter(|name| !name.is_empty()).collect();
    if let Some(unknown) = names.iter().find(|&&name| name != "none" && !ways.iter().any(|way| way.name == name)) {
        let known: Vec<&str> = ways.iter().map(|way| way.name).collect();
        return Err(format!("{setting}={list}: no way named {unknown} here (these are: {})", known.join(" ")).into());
    }
    Ok(ways.into_iter().filter(|way| names.contains(&way.name)).collect())
}

/// Appends each way's medians over the rounds to the file `S3_BENCH_TSV` names, if it is set.
fn record(operation: &str, contenders: &[Contender<'_>], medians: &[Figures], size: usize) -> Result<()> {
    let Ok(path) = var("S3_BENCH_TSV") else { return Ok(()) };
    let mut file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| format!("{path}: {e}"))?;
    let gib = size as f64 / f64::from(1 << 30);
    for (way, figures) in contenders.iter().zip(medians) {
        let cpu_per_gib = figures.cpu_per_request_us / 1e6 / gib;
        writeln!(file, "{operation}\t{}\t{cpu_per_gib:.2}\t{:.0}", way.name, figures.median_latency_us)?;
    }
    Ok(())
}

fn block_reader(store: Arc<PlainStorage>, ids: &[BlockId]) -> Result<RequestFn> {
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

fn block_writer(store: Arc<PlainStorage>, ids: &[BlockId], blocks: &Arc<Vec<Vec<u8>>>) -> Result<RequestFn> {
    let (ids, blocks) = (ids.to_vec(), Arc::clone(blocks));
    Ok(Box::new(move |n| Ok(store.write_block(ids[n % ids.len()], &blocks[n % blocks.len()])?)))
}

/// A block transport on its own: a GET into the caller's buffer, a PUT from it.
trait Transport: Send + 'static {
    fn get(&mut self, key: &str, buf: &mut [u8]) -> Result<()>;
    fn put(&mut self, key: &str, data: &[u8]) -> Result<()>;
}

/// Reads the `n`th key into a buffer of this thread's own.
fn reader(mut transport: impl Transport, keys: &Arc<[String]>, size: usize) -> RequestFn {
    let (keys, mut buf) = (Arc::clone(keys), BlockBuf::recycled(size));
    Box::new(move |n| transport.get(&keys[n % keys.len()], &mut buf))
}

/// Writes the `n`th key with the bytes it holds.
fn writer(mut transport: impl Transport, keys: &Arc<[String]>, blocks: &Arc<Vec<Vec<u8>>>) -> RequestFn {
    let (keys, blocks) = (Arc::clone(keys), Arc::clone(blocks));
    Box::new(move |n| transport.put(&keys[n % keys.len()], &blocks[n % blocks.len()]))
}

/// The shared [`DirectClient`], as the plugin's threads share it.
struct Direct(Arc<DirectClient>);

impl Transport for Direct {
    fn get(&mut self, key: &str, buf: &mut [u8]) -> Result<()> {
        match self.0.get("bench", key, buf)? {
            ReadInto::Filled => Ok(()),
            _ => Err(format!("{key} is missing or of another size").into()),
        }
    }

    fn put(&mut self, key: &str, data: &[u8]) -> Result<()> {
        self.0.put("bench", key, data, Instant::now() + Duration::from_secs(30))?;
        Ok(())
    }
}

/// Signs requests to one endpoint with SigV4, as `DirectClient` does.
#[derive(Clone)]
struct Signer {
    /// `host:port`, to connect to and in the `Host` header.
    host: String,
    region: String,
    identity: Identity,
}

impl Signer {
    /// The headers that sign `method path` with these `headers` and this payload hash.
    fn sign(&self, method: &str, path: &str, headers: &[(&str, &str)], payload: &str) -> Result<Vec<(String, String)>> {
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()?
            .into();
        let url = format!("http://{}{path}", self.host);
        let request =
            SignableRequest::new(method, &url, headers.iter().copied(), SignableBody::Precomputed(payload.into()))?;
        let (signature, _) = sign(request, &params)?.into_parts();
        Ok(signature.headers().map(|(name, value)| (name.to_string(), value.to_string())).collect())
    }
}

/// A CRC32 as S3 writes it: the four big-endian bytes in base64.
fn crc32_in_s3_form(data: &[u8]) -> String {
    aws_smithy_types::base64::encode(crc32fast::hash(data).to_be_bytes())
}

fn bare_reader(signer: &Signer, paths: &[String], size: usize) -> Result<RequestFn> {
    let stream = TcpStream::connect(&signer.host)?;
    stream.set_nodelay(true)?;
    let mut response = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    let (signer, paths) = (signer.clone(), paths.to_vec());
    let mut buf = vec![0; size];
    Ok(Box::new(move |n| {
        let path = &paths[n % paths.len()];
        let host = signer.host.as_str();
        let signature = signer.sign("GET", path, &[("host", host)], "UNSIGNED-PAYLOAD")?;
        let mut head = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n");
        for (name, value) in signature {
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

/// What one run of `count` requests came to.
struct Figures {
    cpu_per_request_us: f64,
    median_latency_us: f64,
}

/// Measures each contender `rounds` times, taking turns (each round begins with the next one),
/// then prints each one's median CPU per request and median latency over the rounds as ratios
/// to [`DIRECT`]'s in the same round (to the first contender's where that is not measured), and
/// returns those medians.
fn compare(
    contenders: &[Contender<'_>],
    rounds: usize,
    size: usize,
    count: usize,
    concurrency: usize,
) -> Result<Vec<Figures>> {
    println!(
        "{:<44} {:>8} {:>12} {:>10} {:>9} {:>9} {:>17}",
        "client", "MiB/s", "CPU us/req", "CPU s/GiB", "p50 us", "p99 us", "server CPU s/GiB"
    );
    let mut runs: Vec<Vec<Figures>> = contenders.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for i in (0..contenders.len()).map(|i| (i + round) % contenders.len()) {
            let way = &contenders[i];
            runs[i].push(measure(way.label, size, count, concurrency, &*way.make)?);
        }
    }
    let reference = contenders.iter().position(|way| way.label == DIRECT).unwrap_or(0);
    println!(
        "medians of {rounds} rounds; ratios to {} in the same round, [lowest, highest]",
        contenders[reference].label
    );
    println!("{:<44} {:>12} {:>20} {:>9} {:>20}", "client", "CPU us/req", "CPU ratio", "p50 us", "p50 ratio");
    let mut medians = Vec::with_capacity(contenders.len());
    for (way, figures) in contenders.iter().zip(&runs) {
        let spread = |figure: fn(&Figures) -> f64| {
            let ratios: Vec<f64> = figures.iter().zip(&runs[reference]).map(|(f, r)| figure(f) / figure(r)).collect();
            let (lowest, highest) = ratios.iter().fold((f64::MAX, 0f64), |(l, h), &r| (l.min(r), h.max(r)));
            format!("{:.2} [{lowest:.2}, {highest:.2}]", median(ratios.clone()))
        };
        let middle = Figures {
            cpu_per_request_us: median(figures.iter().map(|f| f.cpu_per_request_us).collect()),
            median_latency_us: median(figures.iter().map(|f| f.median_latency_us).collect()),
        };
        println!(
            "{:<44} {:>12.0} {:>20} {:>9.0} {:>20}",
            way.label,
            middle.cpu_per_request_us,
            spread(|f| f.cpu_per_request_us),
            middle.median_latency_us,
            spread(|f| f.median_latency_us),
        );
        medians.push(middle);
    }
    Ok(medians)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Runs `count` requests on `concurrency` threads, each with a `RequestFn` from `make`; prints
/// and returns what they cost.
fn measure(
    label: &str,
    size: usize,
    count: usize,
    concurrency: usize,
    make: &dyn Fn() -> Result<RequestFn>,
) -> Result<Figures> {
    let requesters = (0..concurrency).map(|_| make()).collect::<Result<Vec<_>>>()?;
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(count));
    let cpu = process_cpu_seconds();
    let server = server_cpu_seconds();
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = requesters
            .into_iter()
            .map(|mut request| {
                let (next, latencies) = (&next, &latencies);
                scope.spawn(move || -> Result<()> {
                    let mut took = Vec::with_capacity(count / concurrency + 1);
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= count {
                            latencies.lock().map_err(|_| "a requester panicked")?.extend(took);
                            return Ok(());
                        }
                        let begun = Instant::now();
                        request(n)?;
                        took.push(begun.elapsed().as_secs_f64() * 1e6);
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().map_err(|_| "a requester panicked")?)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu;
    let gib = (count * size) as f64 / f64::from(1 << 30);
    let server = match (server, server_cpu_seconds()) {
        (Some(before), Some(after)) => format!("{:.2}", (after - before) / gib),
        _ => "-".into(),
    };
    let mut latencies = latencies.into_inner().map_err(|_| "a requester panicked")?;
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    let figures = Figures { cpu_per_request_us: cpu / count as f64 * 1e6, median_latency_us: median(latencies) };
    println!(
        "{label:<44} {:>8.0} {:>12.0} {:>10.2} {:>9.0} {p99:>9.0} {server:>17}",
        gib * 1024.0 / seconds,
        figures.cpu_per_request_us,
        cpu / gib,
        figures.median_latency_us,
    );
    Ok(figures)
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
