//! A TCP proxy in front of the S3 server that a test can cut, slow down or make answer
//! `503 SlowDown`, to play an outage, a slow network or throttling without touching the shared
//! server.
//!
//! Requests from the client are read one by one (HTTP/1.1 request head, then a body of
//! `Content-Length` bytes), so the proxy can answer a request itself even on a kept-alive
//! connection; responses from the server are passed through untouched. A request with a
//! `Transfer-Encoding` body cannot be framed that way: the rest of its connection is passed
//! through as it is.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The most 503s one operation (one `amz-sdk-invocation-id`, which the SDK keeps across its
/// retries) is given: fewer than the SDK's 5 attempts, so every throttled operation succeeds.
pub const MAX_THROTTLES_PER_OPERATION: u32 = 3;

/// The body of a throttling answer, as S3 words it.
const SLOW_DOWN: &str = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

/// A proxy on 127.0.0.1 forwarding to `upstream`; it stops when dropped.
pub struct Proxy {
    /// The proxy's address: use `http://{addr}` as the S3 endpoint.
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    upstream: SocketAddr,
    /// While set, new connections are closed at once and existing ones are cut.
    down: AtomicBool,
    /// Delay before forwarding each chunk, in milliseconds.
    delay_ms: AtomicU64,
    stop: AtomicBool,
    /// Open connections (both halves), so `cut` can close them.
    open: Mutex<Vec<TcpStream>>,
    /// Requests still to be answered with `503 SlowDown`, and who got them.
    throttle: Mutex<Throttle>,
    /// Requests forwarded whose response has not started yet, and the most there were at once.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
}

/// One connection's request in flight: set when a request is forwarded, cleared by the first
/// bytes of its response, keeping `State::in_flight` in step.
#[derive(Clone, Default)]
struct Awaiting(Arc<AtomicBool>);

impl Awaiting {
    fn start(&self, state: &State) {
        if !self.0.swap(true, SeqCst) {
            let now = state.in_flight.fetch_add(1, SeqCst) + 1;
            state.peak_in_flight.fetch_max(now, SeqCst);
        }
    }

    fn end(&self, state: &State) {
        if self.0.swap(false, SeqCst) {
            state.in_flight.fetch_sub(1, SeqCst);
        }
    }
}

/// What `Proxy::throttle` armed, and what was served.
#[derive(Default)]
struct Throttle {
    /// 503s still to serve.
    remaining: u32,
    /// The request lines (`PUT /bucket/key HTTP/1.1`) answered with a 503 so far.
    served: Vec<String>,
    /// 503s served per operation (`amz-sdk-invocation-id`; "" for requests without one).
    per_operation: HashMap<String, u32>,
}

impl Throttle {
    /// Whether `request` (its request line) of `operation` gets a 503, recording it if so.
    fn take(&mut self, request: &str, operation: &str) -> bool {
        if self.remaining == 0 {
            return false;
        }
        let given = self.per_operation.entry(operation.to_string()).or_default();
        if *given >= MAX_THROTTLES_PER_OPERATION {
            return false;
        }
        *given += 1;
        self.remaining -= 1;
        self.served.push(request.to_string());
        true
    }
}

impl Proxy {
    /// Starts a proxy to `upstream` (an `http://host:port` URL or `host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr =
            upstream.trim_start_matches("http://").trim_end_matches('/').parse().expect("upstream host:port");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            upstream,
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
            throttle: Mutex::new(Throttle::default()),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if s.down.load(SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(s.upstream) else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let (Ok(c), Ok(sv)) = (client.try_clone(), server.try_clone()) {
                    s.open.lock().unwrap().extend([c, sv]);
                }
                let awaiting = Awaiting::default();
                forward_requests(&s, &client, &server, awaiting.clone());
                pipe(&s, &server, &client, awaiting);
            }
        });
        Proxy { addr, state }
    }

    /// The endpoint URL of the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Takes the S3 server away: open connections are cut, new ones refused.
    pub fn cut(&self) {
        self.state.down.store(true, SeqCst);
        for s in self.state.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Brings the S3 server back.
    pub fn restore(&self) {
        self.state.down.store(false, SeqCst);
    }

    /// Delays every chunk forwarded in either direction by `delay`.
    pub fn slow(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, SeqCst);
    }

    /// Answers the next `requests` requests with `503 Slow Down` and S3's `SlowDown` error, then
    /// closes their connections; at most [`MAX_THROTTLES_PER_OPERATION`] of them go to one
    /// operation, whose further attempts are forwarded.
    pub fn throttle(&self, requests: u32) {
        self.state.throttle.lock().unwrap().remaining += requests;
    }

    /// The most requests that were forwarded to the server and waiting for its response at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.state.peak_in_flight.load(SeqCst)
    }

    /// The requests (request lines, e.g. `PUT /bucket/key?x-id=PutObject HTTP/1.1`) answered
    /// with `503 Slow Down` so far.
    pub fn throttled(&self) -> Vec<String> {
        self.state.throttle.lock().unwrap().served.clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.state.stop.store(true, SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Sleeps for the configured delay, then writes `data` unless the proxy is down.
fn forward(state: &State, to: &mut TcpStream, data: &[u8]) -> bool {
    let delay = state.delay_ms.load(SeqCst);
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    !state.down.load(SeqCst) && to.write_all(data).is_ok()
}

/// Forwards the client's requests to the server one at a time, answering those the throttle
/// takes with a 503 itself, on a thread of its own.
fn forward_requests(state: &Arc<State>, client: &TcpStream, server: &TcpStream, awaiting: Awaiting) {
    let (Ok(from), Ok(mut to), Ok(mut reply)) = (client.try_clone(), server.try_clone(), client.try_clone()) else {
        return;
    };
    let state = state.clone();
    std::thread::spawn(move || {
        let mut from = BufReader::with_capacity(64 * 1024, from);
        let mut buf = vec![0u8; 64 * 1024];
        // One request per turn; hyper sends the next one only after reading the previous response.
        while let Some(raw) = read_head(&mut from) {
            let head = String::from_utf8_lossy(&raw);
            let header = |name: &str| {
                head.lines().skip(1).find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
            };
            let length: u64 = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let operation = header("amz-sdk-invocation-id").unwrap_or_default();
            let request = head.lines().next().unwrap_or_default();
            if state.throttle.lock().unwrap().take(request, &operation) {
                // Read the body first (unless the client waits for a 100 Continue), so closing
                // the connection does not reset it before the client reads the answer.
                if header("expect").is_none() {
                    let _ = std::io::copy(&mut (&mut from).take(length), &mut std::io::sink());
                }
                let answer = format!(
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{SLOW_DOWN}",
                    SLOW_DOWN.len()
                );
                let _ = reply.write_all(answer.as_bytes());
                let _ = reply.shutdown(Shutdown::Write);
                // Wait (briefly) for the client to close its side after reading the answer.
                let _ = from.get_ref().set_read_timeout(Some(Duration::from_secs(5)));
                let _ = std::io::copy(&mut from, &mut std::io::sink());
                break;
            }
            awaiting.start(&state);
            if !forward(&state, &mut to, &raw) {
                awaiting.end(&state);
                break;
            }
            // A body without a length runs, as far as the proxy can tell, to the end of the
            // connection: pass it all through.
            let unframed = header("transfer-encoding").is_some();
            let mut body: Box<dyn Read> =
                if unframed { Box::new(&mut from) } else { Box::new((&mut from).take(length)) };
            loop {
                match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) if forward(&state, &mut to, &buf[..n]) => {}
                    _ => return shut(&to),
                }
            }
            if unframed {
                break;
            }
        }
        shut(&to);
    });
}

/// Reads one HTTP request head, up to and including its empty line; `None` at the end of the
/// connection or when the head is absurdly long.
fn read_head(from: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        match from.read_until(b'\n', &mut head) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let line = &head[start..];
        if line == b"\r\n" || line == b"\n" {
            if start > 0 {
                return Some(head);
            }
            head.clear(); // an empty line before a request is allowed, and ignored
        }
        if head.len() > 64 * 1024 {
            return None;
        }
    }
}

fn shut(to: &TcpStream) {
    let _ = to.shutdown(Shutdown::Write);
}

/// Passes the server's responses from `from` to `to`, on a thread of its own.
fn pipe(state: &Arc<State>, from: &TcpStream, to: &TcpStream, awaiting: Awaiting) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { return };
    let state = state.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            awaiting.end(&state);
            if !forward(&state, &mut to, &buf[..n]) {
                break;
            }
        }
        awaiting.end(&state);
        let _ = to.shutdown(Shutdown::Write);
    });
}
