//! Block GETs and PUTs through hyper, for `s3_requests` to weigh against the hand-written
//! HTTP/1.1 of `DirectClient` (issue 15: keep the hand-written parser only if it wins clearly).
//!
//! Each does what `DirectClient` does for a block, and no more: the request signed by
//! `aws-sigv4` as `DirectClient` signs it, on a kept-alive connection, the GET's body checked
//! against its `Content-Length` and the object's CRC32, the PUT's CRC32 sent for the server to
//! check, and the whole exchange bounded by a deadline. Two ways to run hyper:
//!
//! - [`PerThread`]: `hyper::client::conn::http1`, one connection and one current-thread runtime
//!   per calling thread, so that no other thread touches a request: the cheapest way hyper can
//!   serve a caller that blocks.
//! - [`Pooled`]: hyper-util's pooled `Client` on the process's multi-thread runtime, the caller
//!   blocking on it as nbds3's SDK path does: the connections run on the runtime's workers.
//!
//! hyper wants a PUT's body owned (`'static`), so both copy the caller's block into a recycled
//! [`BlockBuf`], as the SDK path does; a GET's body arrives in hyper's buffers and is copied into
//! the caller's block.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nbds3::block_buf::BlockBuf;
use tokio::runtime::Runtime;

use super::{crc32_in_s3_form, Result, Signer, Transport};

/// The bound on one request, as `DirectClient`'s `s3-timeout` default.
const DEADLINE: Duration = Duration::from_secs(30);

/// Where the blocks are, and how requests to them are signed.
pub struct Target {
    pub signer: Signer,
    /// What goes before a key in the request path: `/bucket/`.
    pub prefix: String,
}

/// What one request does with the block.
enum Op<'b> {
    /// GET the object's bytes, which must fill this exactly.
    Get(&'b mut [u8]),
    /// PUT these bytes.
    Put(&'b [u8]),
}

impl Target {
    /// The signed request for `key`, its URI `origin` followed by the path (`""` for the
    /// origin-form a single connection takes, `http://host` for the pooled client).
    fn request(&self, op: &Op<'_>, key: &str, origin: &str) -> Result<Request<Full<Bytes>>> {
        let path = format!("{}{key}", self.prefix);
        let id = format!("{:032x}", rand::random::<u128>());
        let (method, headers, payload, body) = match op {
            Op::Get(_) => (
                Method::GET,
                vec![("host", self.signer.host.clone()), ("x-amz-checksum-mode", "ENABLED".into())],
                super::EMPTY_SHA256,
                Bytes::new(),
            ),
            Op::Put(data) => (
                Method::PUT,
                vec![
                    ("host", self.signer.host.clone()),
                    ("content-length", data.len().to_string()),
                    ("x-amz-checksum-crc32", crc32_in_s3_form(data)),
                ],
                "UNSIGNED-PAYLOAD",
                Bytes::from_owner(BlockBuf::copy_of(data)),
            ),
        };
        let signed: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let signature = self.signer.sign(method.as_str(), &path, &signed, payload)?;
        let mut request = Request::builder().method(method).uri(format!("{origin}{path}"));
        for (name, value) in &headers {
            request = request.header(*name, value);
        }
        request = request.header("amz-sdk-invocation-id", id);
        for (name, value) in signature {
            request = request.header(name, value);
        }
        Ok(request.body(Full::new(body))?)
    }
}

/// The answer to `op`: a GET's body read into its block and checked; a PUT's answer drained.
async fn receive(response: Response<Incoming>, op: Op<'_>, key: &str) -> Result<()> {
    let status = response.status();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (length, crc32) = (header("content-length"), header("x-amz-checksum-crc32"));
    let mut body = response.into_body();
    let Op::Get(buf) = op else {
        while let Some(frame) = body.frame().await {
            frame?;
        }
        return match status {
            StatusCode::OK => Ok(()),
            status => Err(format!("PUT {key}: {status}").into()),
        };
    };
    if status != StatusCode::OK {
        return Err(format!("GET {key}: {status}").into());
    }
    if length.and_then(|n| n.parse().ok()) != Some(buf.len()) {
        return Err(format!("GET {key}: not {} bytes", buf.len()).into());
    }
    let (mut filled, expected) = (0, buf.len());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let end = filled + data.len();
            let part = buf.get_mut(filled..end).ok_or_else(|| format!("GET {key}: more than {expected} bytes"))?;
            part.copy_from_slice(&data);
            filled = end;
        }
    }
    if filled != buf.len() {
        return Err(format!("GET {key}: cut short at {filled} bytes").into());
    }
    match crc32 {
        Some(sent) if sent != crc32_in_s3_form(buf) => Err(format!("GET {key}: CRC32 mismatch").into()),
        _ => Ok(()),
    }
}

/// hyper's single-connection client on a runtime of the calling thread's own.
pub struct PerThread {
    runtime: Runtime,
    sender: SendRequest<Full<Bytes>>,
    target: Arc<Target>,
}

impl PerThread {
    /// A connection to `target`'s endpoint, for one thread.
    pub fn connect(target: Arc<Target>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let sender = runtime.block_on(async {
            let stream = tokio::net::TcpStream::connect(&target.signer.host).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            // Polled whenever this thread blocks on the runtime, that is, during each request.
            tokio::spawn(connection);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(sender)
        })?;
        Ok(PerThread { runtime, sender, target })
    }

    fn exchange(&mut self, key: &str, op: Op<'_>) -> Result<()> {
        let request = self.target.request(&op, key, "")?;
        let sender = &mut self.sender;
        self.runtime.block_on(within_deadline(async {
            sender.ready().await?;
            receive(sender.send_request(request).await?, op, key).await
        }))
    }
}

impl Transport for PerThread {
    fn get(&mut self, key: &str, buf: &mut [u8]) -> Result<()> {
        self.exchange(key, Op::Get(buf))
    }

    fn put(&mut self, key: &str, data: &[u8]) -> Result<()> {
        self.exchange(key, Op::Put(data))
    }
}

/// hyper-util's pooled client, shared by all calling threads, on a multi-thread runtime.
#[derive(Clone)]
pub struct Pooled {
    runtime: &'static Runtime,
    client: Client<HttpConnector, Full<Bytes>>,
    target: Arc<Target>,
}

impl Pooled {
    pub fn new(runtime: &'static Runtime, target: Arc<Target>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build(connector);
        Pooled { runtime, client, target }
    }

    fn exchange(&self, key: &str, op: Op<'_>) -> Result<()> {
        let request = self.target.request(&op, key, &format!("http://{}", self.target.signer.host))?;
        self.runtime.block_on(within_deadline(async { receive(self.client.request(request).await?, op, key).await }))
    }
}

impl Transport for Pooled {
    fn get(&mut self, key: &str, buf: &mut [u8]) -> Result<()> {
        self.exchange(key, Op::Get(buf))
    }

    fn put(&mut self, key: &str, data: &[u8]) -> Result<()> {
        self.exchange(key, Op::Put(data))
    }
}

/// `exchange`, given up at the deadline as `DirectClient` gives up at `s3-timeout`.
async fn within_deadline(exchange: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let deadline = tokio::time::Instant::from_std(Instant::now() + DEADLINE);
    tokio::time::timeout_at(deadline, exchange).await.map_err(|_| "no answer in time")?
}
