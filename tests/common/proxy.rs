//! A TCP proxy in front of the S3 server that a test can cut or slow down, to play an outage
//! or a slow network without touching the shared server.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
                pipe(&s, &client, &server);
                pipe(&s, &server, &client);
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
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.state.stop.store(true, SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn pipe(state: &Arc<State>, from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { return };
    let state = state.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let delay = state.delay_ms.load(SeqCst);
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            if state.down.load(SeqCst) || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
