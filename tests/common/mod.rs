//! Shared harness of the process tests: a real `nbdkit` with the built plugin, real clients, a
//! real S3 server, and per-test sockets, directories and export names so tests run in parallel.
#![allow(dead_code)]

pub mod block_device;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The plugin under test: `target/{profile}/libnbds3.so`, beside the test binary's `deps/`.
pub fn plugin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/{profile}");
    let so = profile_dir.join("libnbds3.so");
    assert!(so.exists(), "{} is missing: run `cargo build` before `cargo test`", so.display());
    so
}

/// Whether a missing tool or server must fail the test (CI) rather than skip it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// Returns false (after saying why) when `tool` is not installed; panics in CI.
pub fn have(tool: &str) -> bool {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(!in_ci(), "{tool} is not installed, and CI must run every test");
        note(&format!("SKIPPED: {tool} is not installed"));
    }
    found
}

/// Prints `message` in the test run's output even when the test passes (cargo test shows what a
/// passing test prints with `eprintln!` only under `--nocapture`, and writes straight to stderr
/// are not captured): which server a test ran on, or why it did not run.
pub fn note(message: &str) {
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let _ = writeln!(std::io::stderr(), "{test}: {message}");
}

/// Skips the test (returns early) when a tool is missing outside CI.
#[macro_export]
macro_rules! require {
    ($($tool:expr),+) => {
        $(if !common::have($tool) { return; })+
    };
}

/// A unique name for this test run: process id plus a counter plus `what`.
pub fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("t{}-{}-{what}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// The S3 server the tests run on, from the environment that `scripts/seaweedfs start` (the
/// primary server), `scripts/garage start` or `scripts/minio up` prints.
#[derive(Clone, Debug)]
pub struct S3Env {
    /// `NBDS3_S3_ENDPOINT`.
    pub endpoint: String,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_key: String,
    /// `NBDS3_S3_SERVER`: which server this is (`seaweedfs`, `garage`), for the tests whose
    /// expectations differ by server; empty for any other.
    pub server: String,
}

/// The S3 server to test against, or `None` (after saying why) outside CI.
pub fn s3() -> Option<S3Env> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("NBDS3_S3_ENDPOINT"), var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(endpoint), Some(access_key), Some(secret_key)) => {
            let server = var("NBDS3_S3_SERVER").unwrap_or_default();
            let env = S3Env { endpoint, access_key, secret_key, server };
            static BUCKET: std::sync::Once = std::sync::Once::new();
            BUCKET.call_once(|| nbds3::storage::s3::check_bucket(&env.config(TEST_BUCKET)).expect("test bucket"));
            Some(env)
        }
        _ => {
            assert!(!in_ci(), "NBDS3_S3_ENDPOINT is not set: run `eval \"$(scripts/seaweedfs start)\"` first");
            note("SKIPPED: no S3 server (eval \"$(scripts/seaweedfs start)\" first)");
            None
        }
    }
}

/// The bucket the tests share; each test uses its own export names in it.
pub const TEST_BUCKET: &str = "nbds3-test";

impl S3Env {
    /// The server's name for messages: `NBDS3_S3_SERVER`, or its endpoint.
    pub fn name(&self) -> &str {
        if self.server.is_empty() {
            &self.endpoint
        } else {
            &self.server
        }
    }

    /// Whether the server honours conditional writes (`If-None-Match: *`, `If-Match`), found by
    /// nbds3's own start-up probe, once per endpoint and test binary. The lease tests that need
    /// atomic compare-and-swap run where this holds, the best-effort ones where it does not; so
    /// that a wrong probe cannot quietly move tests from one group to the other, the servers CI
    /// runs must answer as measured: SeaweedFS honours them, Garage 2.5 ignores them.
    pub fn conditional_writes(&self) -> bool {
        static PROBED: std::sync::Mutex<Vec<(String, bool)>> = std::sync::Mutex::new(Vec::new());
        let mut probed = PROBED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&(_, honoured)) = probed.iter().find(|(endpoint, _)| *endpoint == self.endpoint) {
            return honoured;
        }
        let honoured = nbds3::storage::s3::probe_conditional_writes(&self.config(TEST_BUCKET)).expect("probe");
        match self.server.as_str() {
            "seaweedfs" => assert!(honoured, "SeaweedFS at {} ignores conditional writes", self.endpoint),
            "garage" => assert!(
                !honoured,
                "Garage at {} honours conditional writes, which 2.5 ignored: update the tests' expectations",
                self.endpoint
            ),
            _ => {}
        }
        probed.push((self.endpoint.clone(), honoured));
        honoured
    }

    /// The plugin parameters that reach this server.
    pub fn params(&self, bucket: &str) -> Vec<String> {
        vec![format!("bucket={bucket}"), format!("endpoint={}", self.endpoint)]
    }

    /// The backend settings that reach `bucket` on this server.
    pub fn config(&self, bucket: &str) -> nbds3::storage::S3Config {
        nbds3::storage::S3Config {
            bucket: bucket.into(),
            endpoint: Some(self.endpoint.clone()),
            path_style: Some(true),
            access_key: Some(self.access_key.clone()),
            secret_key: Some(nbds3::storage::Secret(self.secret_key.clone())),
            ..Default::default()
        }
    }

    /// Runs `f` with an SDK client of this server, on a runtime of its own.
    pub fn with_client<T>(&self, f: impl AsyncFnOnce(aws_sdk_s3::Client) -> T) -> T {
        let config = self.config("");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { f(nbds3::storage::s3::Transport::new(&config).await.sdk).await })
    }

    /// The keys stored under `prefix` in `bucket`, listed with the SDK directly.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.with_client(async |client| {
            let mut keys = Vec::new();
            let mut pages = client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
            while let Some(page) = pages.next().await {
                keys.extend(page.expect("list").contents().iter().filter_map(|o| o.key().map(String::from)));
            }
            keys
        })
    }

    /// The object at `key` in `bucket` as text, or `None` if there is none.
    pub fn get_text(&self, bucket: &str, key: &str) -> Option<String> {
        self.with_client(async |client| {
            let object = client.get_object().bucket(bucket).key(key).send().await.ok()?;
            let body = object.body.collect().await.expect("body").into_bytes();
            Some(String::from_utf8_lossy(&body).into_owned())
        })
    }

    /// Stores `data` at `key` in `bucket`, as another program might.
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        self.with_client(async |client| {
            client.put_object().bucket(bucket).key(key).body(data.to_vec().into()).send().await.expect("put");
        })
    }

    /// Deletes every object of `bucket` and the bucket itself: a bucket costs a server like
    /// SeaweedFS volumes of its own, so a test that makes one must not leave it behind.
    pub fn remove_bucket(&self, bucket: &str) {
        use nbds3::storage::objects::ObjectStore;
        // Batched (1000 keys a request): a crash or GC test leaves thousands of objects. One such
        // DeleteObjects took over the default 30 s on a SeaweedFS busy with benchmarks.
        let config = nbds3::storage::S3Config { timeout: Duration::from_secs(180), ..self.config(bucket) };
        self.objects_of(&config).delete(&self.list(bucket, ""), None).expect("delete objects");
        self.with_client(async |client| {
            client.delete_bucket().bucket(bucket).send().await.expect("delete bucket");
        })
    }

    /// A new client of `bucket` (connections of its own, as another host would have), as the
    /// object layer every stored format is written through.
    pub fn objects(&self, bucket: &str) -> Arc<nbds3::storage::s3::S3Objects> {
        self.objects_of(&self.config(bucket))
    }

    fn objects_of(&self, config: &nbds3::storage::S3Config) -> Arc<nbds3::storage::s3::S3Objects> {
        let transport =
            nbds3::storage::s3::runtime().expect("runtime").block_on(nbds3::storage::s3::Transport::new(config));
        Arc::new(nbds3::storage::s3::S3Objects::new(transport, config))
    }

    /// A bucket of the calling test's own, created now and removed with everything in it when
    /// dropped: for a test whose GC would free other tests' uncommitted uploads in a shared
    /// bucket, or whose crashes leave objects that no one else should find.
    pub fn own_bucket(&self, what: &str) -> OwnBucket {
        let name = unique(what).to_lowercase();
        nbds3::storage::s3::check_bucket(&self.config(&name)).expect("create the test's own bucket");
        OwnBucket { env: self.clone(), name }
    }
}

/// A bucket made by [`S3Env::own_bucket`], removed with its objects on drop.
#[derive(Debug)]
pub struct OwnBucket {
    /// The server it is on.
    pub env: S3Env,
    /// Its name.
    pub name: String,
}

impl Drop for OwnBucket {
    fn drop(&mut self) {
        // A failed test's bucket is left for a look at what it holds.
        if std::thread::panicking() {
            note(&format!("left bucket {} on {} as the test failed", self.name, self.env.name()));
        } else {
            self.env.remove_bucket(&self.name);
        }
    }
}

/// The S3 server to test against if it honours conditional writes; otherwise `None`, after
/// saying why (outside CI, also when there is no server). For the `cas` invariants, which only
/// such a server can keep (a server without them is refused in `cas_e2e`).
pub fn s3_with_conditional_writes() -> Option<S3Env> {
    let env = s3()?;
    if env.conditional_writes() {
        note(&format!("ran on {}, which honours conditional writes", env.name()));
        Some(env)
    } else {
        note(&format!("not run on {}, which ignores conditional writes", env.name()));
        None
    }
}

/// A private SeaweedFS (`weed server`: master, volume server, filer and S3 gateway in one
/// process) on free ports, with its data in a temp dir, for a test that needs a server of its
/// own: one it may stop, kill or fill without disturbing the tests sharing `s3()`. It has the
/// test bucket, and honours conditional writes. Killed by PID, and its directory removed, on
/// drop.
#[derive(Debug)]
pub struct SeaweedFs {
    child: Child,
    /// The master's, volume server's, filer's and S3 gateway's gRPC ports.
    grpc_ports: [u16; 4],
    /// Holds the data, the identities file and the server's log.
    dir: tempfile::TempDir,
    /// How to reach it (`server` is `seaweedfs`).
    pub env: S3Env,
}

/// Starts a private SeaweedFS, or returns `None` (after saying why) outside CI when the binary
/// is missing. The binary is `NBDS3_WEED`, or the one `scripts/seaweedfs bin` installs
/// (`~/.cache/nbds3/seaweedfs/bin/weed`). It is ready, bucket and all, in about 4 s.
pub fn seaweedfs() -> Option<SeaweedFs> {
    let home = std::env::var("HOME").unwrap_or_default();
    let weed = std::env::var("NBDS3_WEED").unwrap_or_else(|_| format!("{home}/.cache/nbds3/seaweedfs/bin/weed"));
    if !Path::new(&weed).exists() {
        assert!(!in_ci(), "{weed} is missing: run scripts/install-deps");
        note(&format!("SKIPPED: {weed} is missing (scripts/install-deps installs it)"));
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (access_key, secret_key) = ("NBDS3PRIVATEKEY0123456", "private0123456789abcdef0123456789abcdef01234567");
    let identities = format!(
        r#"{{"identities": [{{"name": "nbds3-test", "credentials": [{{"accessKey": "{access_key}", "secretKey": "{secret_key}"}}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}}]}}"#
    );
    std::fs::write(dir.path().join("s3.json"), identities).expect("identities file");
    std::fs::create_dir(dir.path().join("data")).expect("data dir");
    // Every port the server opens, its gRPC ports included (by default each HTTP port + 10000,
    // which may be taken); held together while chosen, so they differ from each other.
    let listeners: Vec<_> = (0..8).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port")).collect();
    let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().expect("port").port()).collect();
    drop(listeners);
    let log = std::fs::File::create(dir.path().join("weed.log")).expect("log file");
    let child = Command::new(&weed)
        .current_dir(dir.path())
        .arg("server")
        .arg(format!("-dir={}", dir.path().join("data").display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-master.volumeSizeLimitMB=64"])
        .arg(format!("-master.port={}", ports[0]))
        .arg(format!("-master.port.grpc={}", ports[1]))
        .arg(format!("-volume.port={}", ports[2]))
        .arg(format!("-volume.port.grpc={}", ports[3]))
        // A fixed cap on volumes, as in scripts/seaweedfs (whose comment says why), and no 10 s
        // pause before it stops.
        .args(["-volume.max=100", "-volume.preStopSeconds=0", "-filer"])
        .arg(format!("-filer.port={}", ports[4]))
        .arg(format!("-filer.port.grpc={}", ports[5]))
        .arg(format!("-filer.localSocket={}", dir.path().join("filer.sock").display()))
        .arg("-s3")
        .arg(format!("-s3.port={}", ports[6]))
        .arg(format!("-s3.port.grpc={}", ports[7]))
        .arg(format!("-s3.localSocket={}", dir.path().join("s3.sock").display()))
        // No Iceberg or Lance catalogue: their fixed default ports would collide between servers.
        .args(["-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.config=s3.json"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn weed");
    let mut server = SeaweedFs {
        child,
        grpc_ports: [ports[1], ports[3], ports[5], ports[7]],
        dir,
        env: S3Env {
            endpoint: format!("http://127.0.0.1:{}", ports[6]),
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            server: "seaweedfs".into(),
        },
    };
    // The S3 port opens before the filer behind it is ready: wait until the bucket is made.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match nbds3::storage::s3::check_bucket(&server.env.config(TEST_BUCKET)) {
            Ok(()) => return Some(server),
            Err(e) => {
                let exited = server.child.try_wait().ok().flatten();
                if exited.is_some() || Instant::now() > deadline {
                    let log = std::fs::read_to_string(server.dir.path().join("weed.log")).unwrap_or_default();
                    let tail: Vec<_> = log.lines().rev().take(20).collect();
                    panic!("private SeaweedFS not ready ({exited:?}): {e}\n{}", tail.join("\n"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl SeaweedFs {
    /// The server's process id, for tests that stop or kill it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        // SIGKILL: with SIGTERM, weed takes more than 5 s to stop, and leaves its sockets anyway.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Each gRPC server also listens on a Unix socket in /tmp, named by role and port.
        for (role, port) in ["master", "volume", "filer", "s3"].iter().zip(&self.grpc_ports) {
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{role}-grpc-{port}.sock"));
        }
    }
}

/// A running `nbdkit` serving the plugin on a private Unix socket; killed and reaped on drop.
pub struct Nbdkit {
    child: Option<Child>,
    pid: u32,
    /// The socket clients connect to.
    pub socket: PathBuf,
    /// Holds the socket and nbdkit's stderr.
    dir: tempfile::TempDir,
}

impl Nbdkit {
    /// Starts `nbdkit -f` with `params`, waiting until it accepts connections.
    pub fn start(params: &[String]) -> Nbdkit {
        Self::try_start(params, &[]).unwrap_or_else(|e| panic!("nbdkit did not start: {e}"))
    }

    /// Starts nbdkit with extra nbdkit `options` (e.g. `-r`, `--filter=...`) before the plugin.
    pub fn start_with(options: &[&str], params: &[String]) -> Nbdkit {
        Self::try_start(params, options).unwrap_or_else(|e| panic!("nbdkit did not start: {e}"))
    }

    /// Starts nbdkit, returning its stderr if it exits instead of serving.
    pub fn try_start(params: &[String], options: &[&str]) -> Result<Nbdkit, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let stderr_path = dir.path().join("stderr");
        // nbdkit writes its pidfile once it listens; its socket exists a moment earlier (bound,
        // not yet listening), when a client is refused.
        let pidfile = dir.path().join("nbdkit.pid");
        let mut child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .arg("-P")
            .arg(&pidfile)
            .args(options)
            .arg(plugin())
            .args(params)
            .env("NBDS3_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("spawn nbdkit");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pidfile.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(format!("nbdkit exited with {status}:\n{stderr}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("nbdkit did not listen on its socket within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = child.id();
        Ok(Nbdkit { child: Some(child), pid, socket, dir })
    }

    /// Starts nbdkit the way users do, without `-f`: it forks into the background, and is found
    /// and stopped by the PID in its pidfile.
    pub fn start_daemon(params: &[String]) -> Nbdkit {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let pidfile = dir.path().join("nbdkit.pid");
        let out = Command::new("nbdkit")
            .args(["-U"])
            .arg(&socket)
            .arg("-P")
            .arg(&pidfile)
            .arg(plugin())
            .args(params)
            .output()
            .expect("run nbdkit");
        assert!(out.status.success(), "nbdkit failed: {}", String::from_utf8_lossy(&out.stderr));
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid: u32 = loop {
            let pid = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse().ok());
            match pid {
                Some(pid) if socket.exists() => break pid,
                _ => assert!(Instant::now() < deadline, "nbdkit did not create its socket and pidfile"),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Nbdkit { child: None, pid, socket, dir }
    }

    /// nbdkit's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What nbdkit wrote to stderr so far (empty for a daemon, which logs to syslog).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// The NBD URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Runs a Python snippet in `nbdsh` connected to the default export (`h` is the handle).
    pub fn nbdsh(&self, script: &str) -> String {
        nbdsh(&self.uri(), script)
    }

    /// Stops nbdkit (SIGTERM, so it writes back and unloads cleanly) and waits for it.
    pub fn stop(mut self) {
        self.terminate(libc::SIGTERM);
    }

    /// Kills nbdkit with SIGKILL: no write-back, no unload, like a crash.
    pub fn crash(mut self) {
        self.terminate(libc::SIGKILL);
    }

    /// Sends `signal` and waits (at most 30 s) for nbdkit to exit, then makes sure it is gone.
    fn terminate(&mut self, signal: i32) {
        // SAFETY: signalling and probing a process id we started.
        unsafe { libc::kill(self.pid as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let gone = match self.child.as_mut() {
                Some(child) => child.try_wait().map(|s| s.is_some()).unwrap_or(true),
                None => (unsafe { libc::kill(self.pid as i32, 0) }) != 0,
            };
            if gone {
                break;
            }
            if Instant::now() > deadline {
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
                if let Some(child) = self.child.as_mut() {
                    let _ = child.wait();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = None;
        self.pid = 0;
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nbdkit unloads the plugin cleanly (and a coverage build writes
        // its profile); crash tests call `crash()` themselves.
        if self.pid != 0 {
            self.terminate(libc::SIGTERM);
        }
    }
}

/// Runs a Python snippet in `nbdsh` (Debian's python, whatever python3 is first on PATH).
pub fn nbdsh(uri: &str, script: &str) -> String {
    let out = run(Command::new("/usr/bin/python3").args(["-m", "nbd", "-u", uri, "-c", script]));
    assert!(out.status.success(), "nbdsh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command with a bounded lifetime (5 minutes), returning its output.
pub fn run(cmd: &mut Command) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        // SAFETY: probing and killing a process id we started.
        while Instant::now() < deadline {
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().expect("wait");
    drop(watchdog);
    out
}

/// Runs a command and asserts it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `n` bytes of reproducible pseudo-random data.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}
