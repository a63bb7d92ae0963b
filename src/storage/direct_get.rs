//! `DirectGet`: block GETs over plain HTTP/1.1 on the caller's thread, straight into the block.
//!
//! Why: with the S3 server on the same machine (MinIO or Garage on loopback, the usual way to run
//! nbds3 outside AWS), a cold sequential read is CPU-bound, and every CPU-second the client
//! spends is one the server does not get. Per 1 MiB GET, aws-sdk-s3 cost this process 2.1-2.8x
//! the CPU of a bare client (`cargo bench --bench s3_get`): the body arrives in many chunks
//! through hyper and tokio, and the nbdkit thread hands every request to the runtime and waits.
//! Here the nbdkit thread itself signs the request (SigV4), writes it on a kept-alive connection,
//! and reads the body straight into the block, checking the object's CRC32 as the SDK does.
//!
//! It covers only what a block read needs: `http://` endpoints (TLS stays with the SDK),
//! credentials that do not expire, and bodies framed by `Content-Length`. Every other request,
//! and block GETs that do not fit, go through the SDK. Retries follow the SDK's standard policy:
//! 5xx, throttling and dropped connections are retried with jittered exponential backoff, at
//! most 5 attempts, all within `s3-timeout`.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::config::{Credentials, ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;

use super::s3::{classify, S3Config};
use super::BlockId;
use crate::{lock, Error, Result};

/// The SDK's standard retry policy: attempts per request, and the cap on one backoff.
const MAX_ATTEMPTS: u32 = 5;
const MAX_BACKOFF: Duration = Duration::from_secs(20);

/// Bounds on one attempt's connect and on the wait for each read, as the SDK's client has them.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most response head, or error body, read; a server that sends more is not S3.
const MAX_HEAD: u64 = 64 * 1024;

/// Kept-alive connections kept idle; more than the callers ever use at once (nbdkit's threads
/// plus the read-ahead workers).
const MAX_IDLE: usize = 64;

/// SHA-256 of the empty body, which SigV4 signs for a GET.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Block GETs from one bucket over plain HTTP/1.1, with a pool of kept-alive connections.
pub struct DirectGet {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header, also signed.
    host: String,
    /// What goes before a key in the request path: `/bucket/` (path-style) or `/`.
    prefix: String,
    region: String,
    identity: Identity,
    timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

impl fmt::Debug for DirectGet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectGet").field("host", &self.host).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// What one attempt came to.
enum Outcome {
    /// The block's bytes are in the buffer.
    Found,
    /// There is no such object.
    Missing,
    /// A failure worth another attempt (5xx, throttling, a dropped connection); the error if no
    /// attempt is left. `stale` when a kept-alive connection turned out closed before it
    /// answered: retried at once on a new connection, without counting as an attempt.
    Retry { error: Error, stale: bool },
}

/// A kept-alive connection; responses are read through the buffer, requests written to the
/// stream beneath it.
struct Connection(BufReader<TcpStream>);

impl DirectGet {
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
        let credentials = match tokio::time::timeout(CONNECT_TIMEOUT, credentials.provide_credentials()).await {
            Ok(Ok(c)) => c,
            failed => {
                let why = failed
                    .map_or_else(|_| "timed out".to_string(), |r| r.err().map(|e| e.to_string()).unwrap_or_default());
                log::debug!("{}: block GETs go through the SDK: no credentials yet ({why})", config.describe());
                return None;
            }
        };
        Self::with_credentials(config, authority, credentials)
    }

    fn with_credentials(config: &S3Config, authority: &str, credentials: Credentials) -> Option<Self> {
        if credentials.expiry().is_some() {
            log::debug!("{}: block GETs go through the SDK, which renews expiring credentials", config.describe());
            return None;
        }
        let (host, prefix) = if config.path_style.unwrap_or(false) {
            (authority.to_string(), format!("/{}/", config.bucket))
        } else {
            (format!("{}.{authority}", config.bucket), "/".to_string())
        };
        let has_port = host.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok());
        let addr = if has_port { host.clone() } else { format!("{host}:80") };
        log::debug!("{}: block GETs go straight to {addr} over HTTP/1.1", config.describe());
        Some(DirectGet {
            addr,
            host,
            prefix,
            region: config.region.clone(),
            identity: credentials.into(),
            timeout: config.timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Reads the object at `key` (block `block` of `store`) into `buf`, which it must fill
    /// exactly; returns whether the object exists (`false`: `buf` is untouched).
    ///
    /// # Errors
    /// As the SDK path: [`Error::CorruptBlock`] for an object of the wrong size or checksum,
    /// [`Error::Timeout`] past `s3-timeout`, and the server's refusals by category.
    pub fn get(&self, store: &str, key: &str, block: BlockId, buf: &mut [u8]) -> Result<bool> {
        let request = Request { store, key, block, operation: invocation_id() };
        let deadline = Instant::now() + self.timeout;
        let mut attempt = 1;
        loop {
            let error = match self.attempt(&request, deadline, buf) {
                Ok(Outcome::Found) => return Ok(true),
                Ok(Outcome::Missing) => return Ok(false),
                Ok(Outcome::Retry { stale: true, .. }) => continue,
                Ok(Outcome::Retry { error, stale: false }) => error,
                Err(e) => return Err(e),
            };
            // Full jitter, as the SDK: a random wait up to 1 s, 2 s, 4 s ... capped.
            let backoff = MAX_BACKOFF.min(Duration::from_secs(1 << (attempt - 1).min(5))).mul_f64(random_fraction());
            if attempt >= MAX_ATTEMPTS || Instant::now() + backoff >= deadline {
                return Err(error);
            }
            log::debug!("{error}; retrying in {backoff:?}");
            std::thread::sleep(backoff);
            attempt += 1;
        }
    }

    /// One try, on a kept-alive connection if there is one.
    fn attempt(&self, request: &Request<'_>, deadline: Instant, buf: &mut [u8]) -> Result<Outcome> {
        let idle = lock(&self.idle).pop();
        let reused = idle.is_some();
        let mut connection = match idle {
            Some(c) => c,
            None => match self.connect(request, deadline) {
                Ok(c) => c,
                Err(error) => return Ok(Outcome::Retry { error, stale: false }),
            },
        };
        let wait = ATTEMPT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        let timed = connection.0.get_ref().set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        let written = timed.and_then(|()| self.send(request, &mut connection));
        let head = written.and_then(|()| Head::read(&mut connection));
        let head = match head {
            Ok(head) => head,
            Err(e) => {
                // A kept-alive connection the server closed meanwhile fails before any answer.
                let stale = reused && !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
                return Ok(Outcome::Retry { error: request.io_error(&e), stale });
            }
        };
        // Whether the whole answer was read, so the connection can serve the next request.
        let (outcome, read_whole) = match head.status {
            200 => {
                let outcome = self.read_body(request, &head, deadline, &mut connection, buf);
                let found = matches!(outcome, Ok(Outcome::Found));
                (outcome, found)
            }
            status => match head.length.filter(|&n| n <= MAX_HEAD).map(|n| read_text(&mut connection, n)) {
                Some(Ok(body)) => {
                    let (code, message) = (xml_field(&body, "Code"), xml_field(&body, "Message"));
                    let outcome = if status == 404 && code == "NoSuchKey" {
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
        if read_whole && !head.close {
            let mut idle = lock(&self.idle);
            if idle.len() < MAX_IDLE {
                idle.push(connection);
            }
        }
        outcome
    }

    /// The body of a 200 into `buf`, and its checksum checked.
    fn read_body(
        &self,
        request: &Request<'_>,
        head: &Head,
        deadline: Instant,
        c: &mut Connection,
        buf: &mut [u8],
    ) -> Result<Outcome> {
        let expected = buf.len();
        match head.length {
            Some(n) if n == expected as u64 => {}
            Some(n) => return Err(request.corrupt(format!("object {} is {n} bytes, expected {expected}", request.key))),
            None => {
                return Err(Error::backend(
                    request.store,
                    format!("GET {}: the answer has no Content-Length, which S3 always sends", request.key),
                ))
            }
        }
        quick_ack(c);
        if let Err(e) = read_exact_by(c, buf, deadline) {
            return Ok(Outcome::Retry { error: request.io_error(&e), stale: false });
        }
        if let Some(sent) = &head.crc32 {
            let got = base64_u32(crc32fast::hash(buf));
            if *sent != got {
                return Err(request.corrupt(format!(
                    "object {} does not match its checksum (CRC32 {got}, the server says {sent})",
                    request.key
                )));
            }
        }
        Ok(Outcome::Found)
    }

    fn connect(&self, request: &Request<'_>, deadline: Instant) -> Result<Connection> {
        let unreachable = |e: &dyn fmt::Display| {
            Error::backend(request.store, format!("GET {}: cannot reach the endpoint {}: {e}", request.key, self.addr))
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name resolves to no address");
        for addr in self.addr.to_socket_addrs().map_err(|e| unreachable(&e))? {
            let wait = CONNECT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            match TcpStream::connect_timeout(&addr, wait.max(Duration::from_millis(1))) {
                Ok(stream) => {
                    // One write per request, at once.
                    stream.set_nodelay(true).map_err(|e| unreachable(&e))?;
                    stream.set_write_timeout(Some(ATTEMPT_TIMEOUT)).map_err(|e| unreachable(&e))?;
                    return Ok(Connection(BufReader::with_capacity(16 * 1024, stream)));
                }
                Err(e) => last = e,
            }
        }
        Err(unreachable(&last))
    }

    /// Writes the signed request.
    fn send(&self, request: &Request<'_>, c: &mut Connection) -> io::Result<()> {
        let path = format!("{}{}", self.prefix, request.key);
        let url = format!("http://{}{path}", self.host);
        let headers = [("host", self.host.as_str()), ("x-amz-checksum-mode", "ENABLED")];
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
            SignableRequest::new("GET", &url, headers.into_iter(), SignableBody::Precomputed(EMPTY_SHA256.into()))
                .map_err(|e| invalid(&e))?;
        let (signature, _) = sign(signable, &params).map_err(|e| invalid(&e))?.into_parts();
        let mut head = format!("GET {path} HTTP/1.1\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        // As the SDK does, so that server logs (and the tests' proxy) can tie retries together.
        head.push_str(&format!("amz-sdk-invocation-id: {}\r\n", request.operation));
        for (name, value) in signature.headers() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        c.0.get_mut().write_all(head.as_bytes())?;
        quick_ack(c);
        Ok(())
    }
}

/// One block GET, for messages and retries.
struct Request<'a> {
    store: &'a str,
    key: &'a str,
    block: BlockId,
    /// The same for every attempt.
    operation: String,
}

impl Request<'_> {
    fn io_error(&self, e: &io::Error) -> Error {
        let store = self.store.to_string();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                Error::Timeout { store, message: format!("GET {}: no answer in time", self.key) }
            }
            _ => Error::Backend { store, message: format!("GET {}: the connection failed: {e}", self.key) },
        }
    }

    fn corrupt(&self, message: String) -> Error {
        Error::CorruptBlock { store: self.store.to_string(), block: self.block.0, message }
    }

    /// An error answer: another attempt for 5xx and throttling (as the SDK), else the error.
    fn refused(&self, status: u16, code: &str, message: &str) -> Result<Outcome> {
        let what = format!("GET {}", self.key);
        let detail = if message.is_empty() { String::new() } else { format!(": {message}") };
        let code = if code.is_empty() { format!("HTTP {status}") } else { code.to_string() };
        let error = classify(self.store, &what, &code, &detail);
        let transient = matches!(status, 429 | 500 | 502 | 503 | 504)
            || matches!(code.as_str(), "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout");
        if transient {
            Ok(Outcome::Retry { error, stale: false })
        } else {
            Err(error)
        }
    }
}

/// What a response head says that matters here.
struct Head {
    status: u16,
    length: Option<u64>,
    /// The object's CRC32 (base64), when the server has one for the whole object.
    crc32: Option<String>,
    /// The server closes the connection after this response.
    close: bool,
}

impl Head {
    fn read(c: &mut Connection) -> io::Result<Head> {
        let mut limited = (&mut c.0).take(MAX_HEAD);
        let mut line = Vec::new();
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        limited.read_until(b'\n', &mut line)?;
        if line.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
        let status_line = String::from_utf8_lossy(&line);
        let status = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("not an HTTP/1.x answer: {:?}", status_line.trim_end())))?;
        let mut head = Head { status, length: None, crc32: None, close: status_line.starts_with("HTTP/1.0") };
        let (mut composite, mut framed_otherwise) = (false, false);
        loop {
            line.clear();
            limited.read_until(b'\n', &mut line)?;
            if line.is_empty() {
                return Err(bad("the answer's head is cut short or too long"));
            }
            let text = String::from_utf8_lossy(&line);
            let Some((name, value)) = text.split_once(':') else {
                if text.trim().is_empty() {
                    break;
                }
                return Err(bad(&format!("malformed header line {:?}", text.trim_end())));
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => head.length = Some(value.parse().map_err(|_| bad("malformed Content-Length"))?),
                "transfer-encoding" => framed_otherwise = true,
                "connection" => head.close |= value.eq_ignore_ascii_case("close"),
                "x-amz-checksum-crc32" => head.crc32 = Some(value.to_string()),
                // A multipart object's checksum is of its parts' checksums, not of the bytes.
                "x-amz-checksum-type" => composite = value.eq_ignore_ascii_case("COMPOSITE"),
                _ => {}
            }
        }
        if framed_otherwise {
            // A body not framed by its length is not read here, nor the connection reused.
            (head.length, head.close) = (None, true);
        }
        if composite || head.crc32.as_deref().is_some_and(|c| c.contains('-')) {
            head.crc32 = None;
        }
        Ok(head)
    }
}

/// Fills `buf` from the connection, giving up at `deadline`: a server that trickles the body
/// still cannot hold a request past `s3-timeout`.
fn read_exact_by(c: &mut Connection, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if left < ATTEMPT_TIMEOUT {
            c.0.get_ref().set_read_timeout(Some(left))?;
        }
        match c.0.read(rest) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a body of `n` bytes as text.
fn read_text(c: &mut Connection, n: u64) -> io::Result<String> {
    let mut body = Vec::new();
    (&mut c.0).take(n).read_to_end(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The text of the first `<name>` element of an S3 error body, or "".
fn xml_field<'a>(body: &'a str, name: &str) -> &'a str {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    body.split_once(open.as_str()).and_then(|(_, rest)| rest.split_once(close.as_str())).map_or("", |(v, _)| v)
}

/// Asks the kernel to acknowledge what arrives at once. Servers that leave Nagle's algorithm on
/// (Garage) hold back a response's last small segment until the one before it is acknowledged,
/// which a delayed ACK puts off by up to 40 ms; the flag does not stick, so it is set before
/// each read.
fn quick_ack(c: &Connection) {
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

/// A random number in `0..1`, from the standard library's per-process random keys.
fn random_fraction() -> f64 {
    (RandomState::new().build_hasher().finish() >> 11) as f64 / (1u64 << 53) as f64
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
mod tests {
    use super::*;

    #[test]
    fn crc32_in_s3_form() {
        // The CRC32 check value of "123456789" is 0xcbf43926.
        assert_eq!(base64_u32(0), "AAAAAA==");
        assert_eq!(base64_u32(0xffff_ffff), "/////w==");
        assert_eq!(base64_u32(crc32fast::hash(b"123456789")), "y/Q5Jg==");
    }

    /// What the canned server does with the next request.
    enum Answer {
        /// Writes these bytes, then waits for the next request on the same connection.
        Send(String),
        /// Writes these bytes and closes the connection.
        SendAndClose(String),
        /// Holds the connection without answering.
        Silent,
    }

    fn ok(body: &[u8], crc32: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nx-amz-checksum-crc32: {crc32}\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(body)
        )
    }

    fn error(status: &str, code: &str) -> String {
        let body = format!("<Error><Code>{code}</Code><Message>as canned</Message></Error>");
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    }

    /// A server on loopback giving `answers` in turn, for the protocol's corners a real S3
    /// server does not show on demand; returns a `DirectGet` to it and the request heads seen.
    fn canned(answers: Vec<Answer>, timeout: Duration) -> (DirectGet, std::sync::Arc<Mutex<Vec<String>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let answers = std::sync::Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
        let requests = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (answers, requests) = (answers.clone(), requests.clone());
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
                        requests.lock().unwrap().push(head);
                        match answers.lock().unwrap().pop_front() {
                            Some(Answer::Send(bytes)) => stream.write_all(bytes.as_bytes()).unwrap(),
                            Some(Answer::SendAndClose(bytes)) => return stream.write_all(bytes.as_bytes()).unwrap(),
                            Some(Answer::Silent) => std::thread::sleep(Duration::from_secs(30)),
                            None => return,
                        }
                    }
                });
            }
        });
        let config = S3Config {
            bucket: "bucket".into(),
            endpoint: Some(format!("http://{authority}")),
            path_style: Some(true),
            timeout,
            ..Default::default()
        };
        let credentials = Credentials::new("AKID", "secret", None, None, "test");
        (DirectGet::with_credentials(&config, &authority, credentials).unwrap(), seen)
    }

    fn get(direct: &DirectGet, buf: &mut [u8]) -> Result<bool> {
        direct.get("store", "blocks/e/0000000000000000", BlockId(0), buf)
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
        assert!(get(&direct, &mut buf).unwrap());
        assert_eq!(&buf, body);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
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
        assert!(get(&direct, &mut buf).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        for _ in 0..5 {
            assert!(get(&direct, &mut buf).unwrap());
            assert_eq!(&buf, body);
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "backoff for stale connections: {:?}",
            started.elapsed()
        );
        assert_eq!(seen.lock().unwrap().len(), 6, "one request per GET reached the server");
    }

    #[test]
    fn missing_objects_and_refusals() {
        let (direct, _) = canned(vec![Answer::Send(error("404 Not Found", "NoSuchKey"))], Duration::from_secs(5));
        let mut buf = [7; 4];
        assert!(!get(&direct, &mut buf).unwrap());
        assert_eq!(buf, [7; 4], "untouched");
        let (direct, _) = canned(vec![Answer::Send(error("404 Not Found", "NoSuchBucket"))], Duration::from_secs(5));
        assert!(matches!(get(&direct, &mut buf), Err(Error::NotFound { .. })));
        let (direct, _) =
            canned(vec![Answer::Send(error("403 Forbidden", "SignatureDoesNotMatch"))], Duration::from_secs(5));
        assert!(matches!(get(&direct, &mut buf), Err(Error::Unauthenticated { .. })));
    }

    #[test]
    fn wrong_bytes_are_corrupt_blocks() {
        let mut buf = [0; 4];
        let (direct, _) = canned(vec![Answer::Send(ok(b"abcd", "AAAAAA=="))], Duration::from_secs(5));
        let err = get(&direct, &mut buf).unwrap_err();
        assert!(matches!(err, Error::CorruptBlock { .. }) && err.to_string().contains("checksum"), "{err}");
        let (direct, _) =
            canned(vec![Answer::Send(ok(b"abcde", &base64_u32(crc32fast::hash(b"abcde"))))], Duration::from_secs(5));
        let err = get(&direct, &mut buf).unwrap_err();
        assert!(err.to_string().contains("is 5 bytes, expected 4"), "{err}");
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n".to_string();
        let (direct, _) = canned(vec![Answer::Send(chunked)], Duration::from_secs(5));
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
    fn error_fields() {
        let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>";
        assert_eq!((xml_field(body, "Code"), xml_field(body, "Message")), ("NoSuchKey", "gone"));
        assert_eq!(xml_field("<html>", "Code"), "");
    }
}
