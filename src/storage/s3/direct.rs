//! `DirectClient`: the direct transport: whole-object GETs, PUTs and DELETEs over plain HTTP/1.1
//! on the caller's thread, straight between the block and the socket.
//!
//! Kept over hyper, which spent 1.20x this client's CPU per 4K GET, 1.35x per 4K PUT and 1.44-1.47x
//! at 1M (docs/PERFORMANCE.md, "Transport: hand-written HTTP/1.1 vs hyper").
//!
//! Why: with the S3 server on the same machine (MinIO or Garage on loopback, the usual way to run
//! nbds3 outside AWS), cold sequential reads and bulk writes are CPU-bound, and every CPU-second
//! the client spends is one the server does not get. Per 1 MiB GET, aws-sdk-s3 cost this process
//! 2.1-2.8x the CPU of a bare client (`cargo bench --bench s3_requests`): the body arrives in many
//! chunks through hyper and tokio, and the nbdkit thread hands every request to the runtime and
//! waits. A PUT through the SDK also copies the block into a body the SDK owns, and frames it in
//! aws-chunked encoding to send its checksum after it. Here the calling thread itself signs the
//! request (SigV4), writes it on a kept-alive connection, and reads the body straight into the
//! block or writes it straight from the block, with the object's CRC32 checked on the way in and
//! sent (for the server to check) on the way out, as the SDK does.
//!
//! It covers only what block I/O needs: `http://` endpoints (TLS stays with the SDK), credentials
//! that do not expire, unconditional requests for one whole object, and bodies framed by
//! `Content-Length`. Every other request (ranged reads, listings, batch deletes, conditional
//! writes, records, leases), and all requests when these do not hold, go through the SDK (see
//! [`Transport`](super::transport::Transport)). Retries follow the one [`RetryPolicy`]: 5xx,
//! throttling and dropped connections are retried with jittered exponential backoff, all within
//! `s3-timeout`.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::config::{Credentials, ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;

use http::{printable, read_text, xml_field, Head, MAX_HEAD};

use super::errors::{classify, transient, DEADLINES};
use super::retry::RetryPolicy;
use super::S3Config;
use crate::storage::objects::ReadInto;
use crate::{lock, Error, Result};

/// Kept-alive connections kept idle; more than the callers ever use at once (nbdkit's threads
/// plus the read-ahead and write-back workers).
const MAX_IDLE: usize = 64;

/// SHA-256 of the empty body, which SigV4 signs for a GET or DELETE.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

mod http;

/// Block requests to one bucket over plain HTTP/1.1, with a pool of kept-alive connections.
pub struct DirectClient {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header, also signed.
    host: String,
    /// What goes before a key in the request path: `/bucket/` (path-style) or `/`.
    prefix: String,
    region: String,
    identity: Identity,
    timeout: Duration,
    idle: Mutex<Vec<Socket>>,
    /// Attempts, backoff and the bounds on connects and waits.
    policy: RetryPolicy,
    /// Attempts after a request's first (not counting a stale kept-alive connection replaced).
    retries: AtomicU64,
}

impl fmt::Debug for DirectClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectClient").field("host", &self.host).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// What one request does with the object.
enum Body<'b> {
    /// GET: the object's bytes, which must fill this exactly.
    Into(&'b mut [u8]),
    /// PUT these bytes, with their CRC32 in S3's form.
    From(&'b [u8], String),
    /// DELETE.
    None,
}

impl Body<'_> {
    fn method(&self) -> &'static str {
        match self {
            Body::Into(_) => "GET",
            Body::From(..) => "PUT",
            Body::None => "DELETE",
        }
    }
}

/// What one attempt came to.
enum Outcome {
    /// Done: the object's bytes are in the buffer, or stored (with this ETag), or deleted.
    Done(Option<String>),
    /// There is no such object (GET).
    Missing,
    /// The object is this many bytes long, not the buffer's length (GET).
    WrongSize(u64),
    /// A failure worth another attempt (5xx, throttling, a dropped connection); the error if no
    /// attempt is left. `stale` when a kept-alive connection turned out closed before it
    /// answered: retried at once on a new connection, without counting as an attempt.
    Retry { error: Error, stale: bool },
}

/// A kept-alive TCP socket to the endpoint; responses are read through the buffer, requests
/// written to the stream beneath it. Reads give up at the current request's deadline (see
/// [`Socket::arm`]).
struct Socket(BufReader<TcpStream>, Instant);

impl DirectClient {
    /// The direct path for `config`'s bucket with the SDK's `credentials`, or `None` when it does
    /// not apply (an `https://` or AWS endpoint, credentials that expire or cannot be had).
    pub async fn new(config: &S3Config, credentials: &SharedCredentialsProvider) -> Option<Self> {
        let authority = config.endpoint.as_deref()?.strip_prefix("http://")?;
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        // Keys need no escaping (export names are [A-Za-z0-9._-]); nor must the bucket's name.
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) || !config.bucket.chars().all(plain) {
            return None;
        }
        let wait = RetryPolicy::REQUESTS.connect_timeout;
        let credentials = match tokio::time::timeout(wait, credentials.provide_credentials()).await {
            Ok(Ok(c)) => c,
            failed => {
                let why = failed
                    .map_or_else(|_| "timed out".to_string(), |r| r.err().map(|e| e.to_string()).unwrap_or_default());
                log::debug!("{}: block requests go through the SDK: no credentials yet ({why})", config.describe());
                return None;
            }
        };
        Self::with_credentials(config, authority, credentials)
    }

    fn with_credentials(config: &S3Config, authority: &str, credentials: Credentials) -> Option<Self> {
        if credentials.expiry().is_some() {
            log::debug!("{}: block requests go through the SDK, which renews expiring credentials", config.describe());
            return None;
        }
        let (host, prefix) = if config.path_style.unwrap_or(false) {
            (authority.to_string(), format!("/{}/", config.bucket))
        } else {
            (format!("{}.{authority}", config.bucket), "/".to_string())
        };
        let has_port = host.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok());
        let addr = if has_port { host.clone() } else { format!("{host}:80") };
        log::debug!("{}: block requests go straight to {addr} over HTTP/1.1", config.describe());
        Some(DirectClient {
            addr,
            host,
            prefix,
            region: config.region.clone(),
            identity: credentials.into(),
            timeout: config.timeout,
            idle: Mutex::new(Vec::new()),
            policy: RetryPolicy::REQUESTS,
            retries: AtomicU64::new(0),
        })
    }

    /// Reads the object at `key` (of `store`, for messages) into `buf`, which it must fill
    /// exactly (`buf` is untouched when it is missing).
    ///
    /// # Errors
    /// As the SDK path: [`Error::CorruptBlock`] for bytes that do not match their checksum,
    /// [`Error::Timeout`] past `s3-timeout`, and the server's refusals by category.
    pub fn get(&self, store: &str, key: &str, buf: &mut [u8]) -> Result<ReadInto> {
        self.run(store, key, &mut Body::Into(buf), Instant::now() + self.timeout).map(|(found, _)| found)
    }

    /// Stores `data` as the object at `key`, with its CRC32 for the server to check, returning
    /// its ETag (or "" from a server that sends none); no byte of
    /// it is sent after `deadline` (see [`FencedStorage`](crate::storage::FencedStorage)).
    ///
    /// # Errors
    /// As [`get`](Self::get), but for the checks on what comes back; [`Error::Timeout`] too for
    /// a request its deadline stopped before it was sent.
    pub fn put(&self, store: &str, key: &str, data: &[u8], deadline: Instant) -> Result<String> {
        let crc32 = base64_u32(crc32fast::hash(data));
        self.run(store, key, &mut Body::From(data, crc32), deadline).map(|(_, etag)| etag)
    }

    /// Deletes the object at `key`, as [`put`](Self::put) by `deadline`; deleting an object that
    /// does not exist succeeds, as in S3.
    ///
    /// # Errors
    /// As [`put`](Self::put).
    pub fn delete(&self, store: &str, key: &str, deadline: Instant) -> Result<()> {
        self.run(store, key, &mut Body::None, deadline).map(drop)
    }

    /// Requests sent again after a transient failure, since this client was made.
    pub fn retries(&self) -> u64 {
        self.retries.load(Relaxed)
    }

    /// The request's attempts, none begun after `deadline` (nor any byte sent after it: see
    /// [`write_both`]); what it found, and the object's ETag where the answer gave one.
    fn run(&self, store: &str, key: &str, body: &mut Body<'_>, deadline: Instant) -> Result<(ReadInto, String)> {
        let request = &Request::new(body.method(), store, key);
        let mut attempt = 1;
        loop {
            if Instant::now() >= deadline {
                return Err(request.too_late());
            }
            let error = match self.attempt(request, deadline, body) {
                Ok(Outcome::Done(etag)) => return Ok((ReadInto::Filled, etag.unwrap_or_default())),
                Ok(Outcome::Missing) => return Ok((ReadInto::Missing, String::new())),
                Ok(Outcome::WrongSize(n)) => return Ok((ReadInto::WrongSize(n), String::new())),
                Ok(Outcome::Retry { stale: true, .. }) => continue,
                Ok(Outcome::Retry { error, stale: false }) => error,
                Err(e) => return Err(e),
            };
            let Some(backoff) = self.policy.backoff(attempt).filter(|b| Instant::now() + *b < deadline) else {
                return Err(error);
            };
            log::debug!("{error}; retrying in {backoff:?}");
            self.retries.fetch_add(1, Relaxed);
            std::thread::sleep(backoff);
            attempt += 1;
        }
    }

    /// One try, on a kept-alive connection if there is one.
    fn attempt(&self, request: &Request<'_>, deadline: Instant, body: &mut Body<'_>) -> Result<Outcome> {
        let idle = lock(&self.idle).pop();
        let reused = idle.is_some();
        let mut connection = match idle {
            Some(c) => c,
            None => match self.connect(request, deadline) {
                Ok(c) => c,
                Err(error) => return Ok(Outcome::Retry { error, stale: false }),
            },
        };
        connection.1 = deadline;
        let wait = self
            .policy
            .attempt_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        let stream = connection.0.get_ref();
        let timed = stream.set_read_timeout(Some(wait)).and_then(|()| stream.set_write_timeout(Some(wait)));
        let written = timed.and_then(|()| self.send(request, body, deadline, &mut connection));
        // A server may refuse a PUT before it has read the body, and close: its answer says why.
        // (One that stopped reading without closing has nothing to say in time.)
        let timed_out = |e: &io::Error| matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
        let head = match written {
            Err(e) if matches!(body, Body::From(..)) && !timed_out(&e) => Head::read(&mut connection).map_err(|_| e),
            written => written.and_then(|()| Head::read(&mut connection)),
        };
        let head = match head {
            Ok(head) => head,
            Err(e) => {
                // A kept-alive connection the server closed meanwhile fails before any answer.
                let stale = reused && !timed_out(&e);
                return Ok(Outcome::Retry { error: request.io_error(&e), stale });
            }
        };
        // Whether the whole answer was read, so the connection can serve the next request.
        let (outcome, read_whole) = match (head.status, body) {
            (200, Body::Into(buf)) => {
                let outcome = self.read_body(request, &head, &mut connection, buf);
                let found = matches!(outcome, Ok(Outcome::Done(_)));
                (outcome, found)
            }
            (200 | 204, body) if !matches!(body, Body::Into(_)) => {
                let drained = head.length.filter(|&n| n <= MAX_HEAD).map(|n| read_text(&mut connection, n));
                (Ok(Outcome::Done(head.etag.clone())), matches!(drained, Some(Ok(_))))
            }
            (status, body) => match head.length.filter(|&n| n <= MAX_HEAD).map(|n| read_text(&mut connection, n)) {
                Some(Ok(text)) => {
                    let (code, message) = (xml_field(&text, "Code"), xml_field(&text, "Message"));
                    let outcome = if status == 404 && code == "NoSuchKey" && matches!(body, Body::Into(_)) {
                        Ok(Outcome::Missing)
                    } else {
                        request.refused(status, code, message)
                    };
                    (outcome, true)
                }
                // The status alone decides.
                _ => (request.refused(status, "", ""), false),
            },
        };
        // Bytes past the answer are no answer to the next request: the connection is not reused.
        if read_whole && !head.close && connection.0.buffer().is_empty() {
            let mut idle = lock(&self.idle);
            if idle.len() < MAX_IDLE {
                idle.push(connection);
            }
        }
        outcome
    }

    /// The body of a 200 into `buf`, and its checksum checked.
    fn read_body(&self, request: &Request<'_>, head: &Head, c: &mut Socket, buf: &mut [u8]) -> Result<Outcome> {
        let expected = buf.len();
        match head.length {
            Some(n) if n == expected as u64 => {}
            Some(n) => return Ok(Outcome::WrongSize(n)),
            None => {
                return Err(Error::backend(
                    request.store,
                    format!("GET {}: the answer has no Content-Length, which S3 always sends", request.key),
                ))
            }
        }
        quick_ack(c);
        // Checksummed piece by piece as the socket hands the body over, while each piece is
        // still in the CPU's cache: a pass over the whole block afterwards would fetch it from
        // memory again.
        let mut crc = head.crc32.as_ref().map(|_| crc32fast::Hasher::new());
        let mut filled = 0;
        while filled < expected {
            match c.read(&mut buf[filled..]) {
                Ok(0) => {
                    let e =
                        io::Error::new(io::ErrorKind::UnexpectedEof, format!("the body ended after {filled} bytes"));
                    return Ok(Outcome::Retry { error: request.io_error(&e), stale: false });
                }
                Ok(n) => {
                    if let Some(crc) = &mut crc {
                        crc.update(&buf[filled..filled + n]);
                    }
                    filled += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Ok(Outcome::Retry { error: request.io_error(&e), stale: false }),
            }
        }
        if let (Some(sent), Some(crc)) = (&head.crc32, crc) {
            let got = base64_u32(crc.finalize());
            if *sent != got {
                return Err(
                    request.corrupt(format!("it does not match its checksum (CRC32 {got}, the server says {sent})"))
                );
            }
        }
        Ok(Outcome::Done(head.etag.clone()))
    }

    fn connect(&self, request: &Request<'_>, deadline: Instant) -> Result<Socket> {
        let unreachable = |e: &dyn fmt::Display| {
            let what = format!("{} {}", request.method, request.key);
            Error::backend(request.store, format!("{what}: cannot reach the endpoint {}: {e}", self.addr))
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name resolves to no address");
        for addr in self.addr.to_socket_addrs().map_err(|e| unreachable(&e))? {
            let wait = self.policy.connect_timeout.min(deadline.saturating_duration_since(Instant::now()));
            match TcpStream::connect_timeout(&addr, wait.max(Duration::from_millis(1))) {
                Ok(stream) => {
                    // Each request goes out at once, and a PUT's body right behind its head.
                    stream.set_nodelay(true).map_err(|e| unreachable(&e))?;
                    return Ok(Socket(BufReader::with_capacity(16 * 1024, stream), deadline));
                }
                Err(e) => last = e,
            }
        }
        Err(unreachable(&last))
    }

    /// Writes the signed request, and a PUT's body.
    fn send(&self, request: &Request<'_>, body: &Body<'_>, deadline: Instant, c: &mut Socket) -> io::Result<()> {
        let method = request.method;
        let path = format!("{}{}", self.prefix, request.key);
        let url = format!("http://{}{path}", self.host);
        let length;
        let (headers, payload) = match body {
            Body::Into(_) => (vec![("host", self.host.as_str()), ("x-amz-checksum-mode", "ENABLED")], EMPTY_SHA256),
            Body::From(data, crc32) => {
                length = data.len().to_string();
                let headers =
                    vec![("host", self.host.as_str()), ("content-length", &length), ("x-amz-checksum-crc32", crc32)];
                // The CRC32 guards the bytes; a SHA-256 of them would cost more CPU than the rest
                // of the PUT.
                (headers, "UNSIGNED-PAYLOAD")
            }
            Body::None => (vec![("host", self.host.as_str())], EMPTY_SHA256),
        };
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let invalid = |e: &dyn fmt::Display| io::Error::new(io::ErrorKind::InvalidInput, format!("signing: {e}"));
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| invalid(&e))?
            .into();
        let signable =
            SignableRequest::new(method, &url, headers.iter().copied(), SignableBody::Precomputed(payload.into()))
                .map_err(|e| invalid(&e))?;
        let (signature, _) = sign(signable, &params).map_err(|e| invalid(&e))?.into_parts();
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        // As the SDK does, so that server logs (and the tests' proxy) can tie retries together.
        head.push_str(&format!("amz-sdk-invocation-id: {}\r\n", request.operation));
        for (name, value) in signature.headers() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let data = match body {
            Body::From(data, _) => data,
            _ => &[][..],
        };
        write_both(c.0.get_mut(), head.as_bytes(), data, deadline)?;
        quick_ack(c);
        Ok(())
    }
}

/// One object request, for messages and retries.
struct Request<'a> {
    method: &'static str,
    store: &'a str,
    key: &'a str,
    /// The same for every attempt.
    operation: String,
}

impl<'a> Request<'a> {
    fn new(method: &'static str, store: &'a str, key: &'a str) -> Self {
        Request { method, store, key, operation: invocation_id() }
    }

    fn io_error(&self, e: &io::Error) -> Error {
        let store = self.store.to_string();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                Error::Timeout { store, message: format!("{} {}: no answer in time", self.method, self.key) }
            }
            _ => Error::backend_caused(
                store,
                format!("{} {}: the connection failed: {e}", self.method, self.key),
                io::Error::new(e.kind(), e.to_string()),
            ),
        }
    }

    /// The deadline passed before this attempt could begin.
    fn too_late(&self) -> Error {
        let message =
            format!("{} {}: not sent, its deadline passed before it could start ({DEADLINES})", self.method, self.key);
        Error::Timeout { store: self.store.to_string(), message }
    }

    fn corrupt(&self, message: String) -> Error {
        Error::CorruptBlock { store: self.store.to_string(), key: self.key.to_string(), message }
    }

    /// An error answer: another attempt for 5xx and throttling (as the SDK), else the error.
    fn refused(&self, status: u16, code: &str, message: &str) -> Result<Outcome> {
        let what = format!("{} {}", self.method, self.key);
        let detail = if message.is_empty() { String::new() } else { format!(": {}", printable(message)) };
        let code = if code.is_empty() { format!("HTTP {status}") } else { printable(code) };
        let error = classify(self.store, &what, &code, &detail);
        if transient(status, &code) {
            Ok(Outcome::Retry { error, stale: false })
        } else {
            Err(error)
        }
    }
}

impl Socket {
    /// Before a read that will wait for the network, shortens the socket's timeout to what is
    /// left before the deadline: a server that trickles its answer a byte at a time (each in less
    /// than the socket's timeout) still cannot hold a request past `s3-timeout`.
    fn arm(&self) -> io::Result<()> {
        if self.0.buffer().is_empty() {
            if let Some(left) = shortened_timeout(self.1)? {
                self.0.get_ref().set_read_timeout(Some(left))?;
            }
        }
        Ok(())
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.0.read(buf)
    }
}

impl BufRead for Socket {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.arm()?;
        self.0.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.0.consume(n);
    }
}

/// The socket timeout the next read or write needs so as not to outlast `deadline`, when that is
/// shorter than an attempt's own; `TimedOut` once the deadline has passed.
fn shortened_timeout(deadline: Instant) -> io::Result<Option<Duration>> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok((left < RetryPolicy::REQUESTS.attempt_timeout).then_some(left))
}

/// Writes `head` and then `body` with as few system calls as the socket takes (a small PUT goes
/// out in one segment), giving up at `deadline`: a server that takes the body in trickles still
/// cannot hold a request past `s3-timeout`.
fn write_both(stream: &mut TcpStream, head: &[u8], body: &[u8], deadline: Instant) -> io::Result<()> {
    let mut parts = [IoSlice::new(head), IoSlice::new(body)];
    let mut parts = &mut parts[..];
    while !parts.is_empty() {
        if let Some(left) = shortened_timeout(deadline)? {
            stream.set_write_timeout(Some(left))?;
        }
        match stream.write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Asks the kernel to acknowledge what arrives at once. Servers that leave Nagle's algorithm on
/// (Garage) hold back a response's last small segment until the one before it is acknowledged,
/// which a delayed ACK puts off by up to 40 ms; the flag does not stick, so it is set before
/// each read.
fn quick_ack(c: &Socket) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option of the right size; failure only costs latency.
    unsafe {
        libc::setsockopt(
            c.0.get_ref().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A CRC32 as S3 writes it: the four big-endian bytes in base64.
fn base64_u32(crc: u32) -> String {
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

/// A fresh UUID-shaped identifier for one operation.
fn invocation_id() -> String {
    let (a, b) = (RandomState::new().build_hasher().finish(), RandomState::new().build_hasher().finish());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use super::*;

    mod fuzz;

    #[test]
    fn crc32_in_s3_form() {
        // The CRC32 check value of "123456789" is 0xcbf43926.
        assert_eq!(base64_u32(0), "AAAAAA==");
        assert_eq!(base64_u32(0xffff_ffff), "/////w==");
        assert_eq!(base64_u32(crc32fast::hash(b"123456789")), "y/Q5Jg==");
    }

    /// What the canned server does with the next request.
    pub(in crate::storage) enum Answer {
        /// Writes these bytes, then waits for the next request on the same connection.
        Send(Vec<u8>),
        /// Writes these bytes and closes the connection.
        SendAndClose(Vec<u8>),
        /// Holds the connection without answering.
        Silent,
        /// Writes these bytes and closes the connection without reading the request's body.
        RefuseUnread(Vec<u8>),
        /// Holds the connection without reading the request's body.
        Stall,
        /// Writes these bytes one at a time, each after this pause, then waits for the next
        /// request.
        Drip(Vec<u8>, Duration),
        /// Writes these bytes after this pause, then waits for the next request.
        Delay(Vec<u8>, Duration),
    }

    fn ok(body: &[u8], crc32: &str) -> Vec<u8> {
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nx-amz-checksum-crc32: {crc32}\r\n\r\n", body.len());
        [head.as_bytes(), body].concat()
    }

    fn error(status: &str, code: &str) -> Vec<u8> {
        let body = format!("<Error><Code>{code}</Code><Message>as canned</Message></Error>");
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
    }

    /// A server on loopback giving `answers` in turn, for the protocol's corners a real S3
    /// server does not show on demand; returns a `DirectClient` to it and the requests seen (head
    /// and body).
    fn canned(answers: Vec<Answer>, timeout: Duration) -> (DirectClient, Arc<Mutex<Vec<String>>>) {
        canned_queue(Arc::new(Mutex::new(answers.into())), timeout)
    }

    /// [`canned`] with a queue of answers the caller can refill, to serve many cases.
    fn canned_queue(
        answers: Arc<Mutex<VecDeque<Answer>>>,
        timeout: Duration,
    ) -> (DirectClient, Arc<Mutex<Vec<String>>>) {
        let (config, seen) = canned_server(answers);
        let config = S3Config { timeout, ..config };
        let authority = config.endpoint.as_deref().unwrap().strip_prefix("http://").unwrap().to_string();
        let credentials = Credentials::new("AKID", "secret", None, None, "test");
        (DirectClient::with_credentials(&config, &authority, credentials).unwrap(), seen)
    }

    /// The server behind [`canned_queue`], and the config of a bucket on it.
    pub(in crate::storage) fn canned_server(
        answers: Arc<Mutex<VecDeque<Answer>>>,
    ) -> (S3Config, Arc<Mutex<Vec<String>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let requests = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (answers, requests) = (answers.clone(), requests.clone());
                // A write fails when the client has given up, which ends the connection's thread.
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut stream = stream;
                    loop {
                        let mut head = String::new();
                        while !head.ends_with("\r\n\r\n") {
                            if reader.read_line(&mut head).unwrap_or(0) == 0 {
                                return;
                            }
                        }
                        let answer = answers.lock().unwrap().pop_front();
                        match answer {
                            Some(Answer::RefuseUnread(bytes)) => {
                                requests.lock().unwrap().push(head);
                                return drop(stream.write_all(&bytes));
                            }
                            Some(Answer::Stall) => return std::thread::sleep(Duration::from_secs(30)),
                            _ => {}
                        }
                        let length = head
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string))
                            .map_or(0, |n| n.parse().unwrap());
                        let mut body = vec![0; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        requests.lock().unwrap().push(head + &String::from_utf8_lossy(&body));
                        let sent = match answer {
                            Some(Answer::Send(bytes)) => stream.write_all(&bytes),
                            Some(Answer::SendAndClose(bytes)) => return drop(stream.write_all(&bytes)),
                            Some(Answer::Drip(bytes, every)) => bytes.iter().try_for_each(|b| {
                                std::thread::sleep(every);
                                stream.write_all(&[*b])
                            }),
                            Some(Answer::Delay(bytes, pause)) => {
                                std::thread::sleep(pause);
                                stream.write_all(&bytes)
                            }
                            Some(Answer::Silent) => return std::thread::sleep(Duration::from_secs(30)),
                            Some(Answer::RefuseUnread(_) | Answer::Stall) | None => return,
                        };
                        if sent.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let config = S3Config {
            bucket: "bucket".into(),
            endpoint: Some(format!("http://{authority}")),
            path_style: Some(true),
            access_key: Some("AKID".into()),
            secret_key: Some(crate::storage::Secret("secret".into())),
            ..Default::default()
        };
        (config, seen)
    }

    fn in_20_s() -> Instant {
        Instant::now() + Duration::from_secs(20)
    }

    fn get(direct: &DirectClient, buf: &mut [u8]) -> Result<ReadInto> {
        direct.get("store", "blocks/e/0000000000000000", buf)
    }

    #[test]
    fn throttling_is_retried_as_one_operation() {
        let body = b"0123456789";
        let crc = base64_u32(crc32fast::hash(body));
        let answers = vec![
            Answer::SendAndClose(error("503 Slow Down", "SlowDown")),
            Answer::Send(error("500 Internal Server Error", "InternalError")),
            Answer::Send(ok(body, &crc)),
        ];
        let (direct, seen) = canned(answers, Duration::from_secs(20));
        let mut buf = [0; 10];
        assert_eq!(get(&direct, &mut buf).unwrap(), ReadInto::Filled);
        assert_eq!(&buf, body);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(direct.retries(), 2, "the 503 and the 500 were counted as retries");
        let id = |h: &String| h.lines().find(|l| l.starts_with("amz-sdk-invocation-id")).map(str::to_string);
        assert!(id(&seen[0]).is_some() && seen.iter().all(|h| id(h) == id(&seen[0])), "{seen:#?}");
        assert!(seen[0].starts_with("GET /bucket/blocks/e/0000000000000000 HTTP/1.1\r\n"), "{seen:#?}");
        assert!(seen[0].contains("authorization: AWS4-HMAC-SHA256 Credential=AKID/"), "{seen:#?}");
    }

    #[test]
    fn a_kept_alive_connection_the_server_closed_is_replaced() {
        let body = b"abc";
        let crc = base64_u32(crc32fast::hash(body));
        // Every answer keeps the connection (no "Connection: close"), then the server drops it:
        // each GET after the first meets a stale connection. Were that a counted attempt, its
        // backoff (random, up to 1 s) would make five of them take 0.5 s but once in 4000 runs.
        let answers = (0..6).map(|_| Answer::SendAndClose(ok(body, &crc))).collect();
        let (direct, seen) = canned(answers, Duration::from_secs(20));
        let mut buf = [0; 3];
        assert_eq!(get(&direct, &mut buf).unwrap(), ReadInto::Filled);
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        for _ in 0..5 {
            assert_eq!(get(&direct, &mut buf).unwrap(), ReadInto::Filled);
            assert_eq!(&buf, body);
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "backoff for stale connections: {:?}",
            started.elapsed()
        );
        assert_eq!(seen.lock().unwrap().len(), 6, "one request per GET reached the server");
        assert_eq!(direct.retries(), 0, "a stale connection replaced is no retry");
    }

    #[test]
    fn missing_objects_and_refusals() {
        let (direct, _) = canned(vec![Answer::Send(error("404 Not Found", "NoSuchKey"))], Duration::from_secs(5));
        let mut buf = [7; 4];
        assert_eq!(get(&direct, &mut buf).unwrap(), ReadInto::Missing);
        assert_eq!(buf, [7; 4], "untouched");
        let (direct, _) = canned(vec![Answer::Send(error("404 Not Found", "NoSuchBucket"))], Duration::from_secs(5));
        assert!(matches!(get(&direct, &mut buf), Err(Error::NotFound { .. })));
        let (direct, _) =
            canned(vec![Answer::Send(error("403 Forbidden", "SignatureDoesNotMatch"))], Duration::from_secs(5));
        assert!(matches!(get(&direct, &mut buf), Err(Error::Unauthenticated { .. })));
    }

    #[test]
    fn wrong_bytes_are_corrupt_and_wrong_lengths_are_told() {
        let mut buf = [0; 4];
        let (direct, _) = canned(vec![Answer::Send(ok(b"abcd", "AAAAAA=="))], Duration::from_secs(5));
        let err = get(&direct, &mut buf).unwrap_err();
        assert!(matches!(err, Error::CorruptBlock { .. }) && err.to_string().contains("checksum"), "{err}");
        let (direct, _) =
            canned(vec![Answer::Send(ok(b"abcde", &base64_u32(crc32fast::hash(b"abcde"))))], Duration::from_secs(5));
        assert_eq!(get(&direct, &mut buf).unwrap(), ReadInto::WrongSize(5));
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n".to_string();
        let (direct, _) = canned(vec![Answer::Send(chunked.into())], Duration::from_secs(5));
        let err = get(&direct, &mut buf).unwrap_err();
        assert!(err.to_string().contains("no Content-Length"), "{err}");
    }

    #[test]
    fn a_server_that_does_not_answer_times_out_within_the_bound() {
        let (direct, _) = canned(vec![Answer::Silent, Answer::Silent], Duration::from_secs(2));
        let started = Instant::now();
        let err = get(&direct, &mut [0; 4]).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    }

    #[test]
    fn puts_send_the_block_and_its_checksum() {
        let stored = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_string();
        let answers = vec![Answer::Send(error("503 Slow Down", "SlowDown")), Answer::Send(stored.into())];
        let (direct, seen) = canned(answers, Duration::from_secs(20));
        direct.put("store", "blocks/e/0000000000001000", b"12345", in_20_s()).unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "the 503 was retried: {seen:#?}");
        let put = &seen[1];
        assert!(put.starts_with("PUT /bucket/blocks/e/0000000000001000 HTTP/1.1\r\n"), "{put}");
        assert!(put.contains("content-length: 5\r\n"), "{put}");
        let crc = base64_u32(crc32fast::hash(b"12345"));
        assert!(put.contains(&format!("x-amz-checksum-crc32: {crc}\r\n")), "{put}");
        assert!(put.contains("x-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"), "{put}");
        assert!(put.contains("SignedHeaders=content-length;host;x-amz-checksum-crc32;"), "{put}");
        assert!(put.ends_with("\r\n\r\n12345"), "the body follows the head: {put}");
    }

    #[test]
    fn a_put_refused_before_its_body_was_read_says_why() {
        // 4 MiB: more than the socket buffers take, so the write fails when the server closes.
        let big = vec![1; 4 << 20];
        let answers = vec![Answer::RefuseUnread(error("403 Forbidden", "SignatureDoesNotMatch"))];
        let (direct, _) = canned(answers, Duration::from_secs(5));
        let err = direct.put("store", "blocks/e/0000000000000000", &big, in_20_s()).unwrap_err();
        assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
        assert!(err.to_string().contains("PUT blocks/e/0000000000000000"), "{err}");
    }

    #[test]
    fn a_server_that_stops_reading_a_put_times_out_within_the_bound() {
        // 64 MiB: far more than the socket buffers hold.
        let big = vec![1; 64 << 20];
        let (direct, _) = canned(vec![Answer::Stall, Answer::Stall], Duration::from_secs(2));
        let started = Instant::now();
        let err = direct.put("store", "blocks/e/0000000000000000", &big, started + direct.timeout).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    }

    #[test]
    fn deletes() {
        let deleted = "HTTP/1.1 204 No Content\r\n\r\n".to_string();
        let (direct, seen) = canned(vec![Answer::Send(deleted.into())], Duration::from_secs(5));
        direct.delete("store", "blocks/e/0000000000000000", in_20_s()).unwrap();
        assert!(seen.lock().unwrap()[0].starts_with("DELETE /bucket/blocks/e/0000000000000000 HTTP/1.1\r\n"));
        let (direct, _) = canned(vec![Answer::Send(error("403 Forbidden", "AccessDenied"))], Duration::from_secs(5));
        let err = direct.delete("store", "blocks/e/0000000000000000", in_20_s()).unwrap_err();
        assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    }

    #[test]
    fn error_fields() {
        let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>";
        assert_eq!((xml_field(body, "Code"), xml_field(body, "Message")), ("NoSuchKey", "gone"));
        assert_eq!(xml_field("<html>", "Code"), "");
    }
}
