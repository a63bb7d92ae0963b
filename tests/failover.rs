//! Failover between hosts: two nbdkit processes with different host ids (`host-id=`) serve one
//! export on the S3 server of `common::s3()`. A writer frozen with SIGSTOP (a VM pause, a GC
//! pause, a partition) loses its lease to another host, and when it wakes none of its blocks may
//! land over its successor's; a refused writer says why and stops without claiming lost writes;
//! `nbds3ctl` shows who holds each export. A lease of 6 s and an `s3-timeout` of 2 s keep each
//! test well under a minute.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Nbdkit, S3Env, TEST_BUCKET};

const BLOCK: usize = 4096;
/// The `lease-time=` of a failover; `s3-timeout=2`, so a holder renews every 4/3 s and a frozen
/// one stops writing 4 s after its last renewal began.
const LEASE_TIME: u64 = 6;
/// The `lease-time=` of a test that must never see a lease expire, however loaded the machine.
const LONG_LEASE: u64 = 60;

fn params(env: &S3Env, export: &str, host: &str, lease_time: u64) -> Vec<String> {
    let mut p = env.params(TEST_BUCKET);
    p.extend([
        format!("access-key={}", env.access_key),
        format!("secret-key={}", env.secret_key),
        format!("export={export}"),
        "size=16M".into(),
        format!("lease-time={lease_time}"),
        "s3-timeout=2".into(),
        format!("host-id={host}"),
    ]);
    p
}

/// The data the tests write: `n` bytes, reproducible from `seed`, the same in Python.
const DATA: &str = "import random\ndef data(seed, n):\n    return random.Random(seed).randbytes(n)\n";

fn data(seed: u64, n: usize) -> Vec<u8> {
    let script = format!("{DATA}import sys\nsys.stdout.buffer.write(data({seed}, {n}))");
    let out = common::run_ok(Command::new("/usr/bin/python3").args(["-c", &script]));
    out.stdout
}

/// Connects to `nbdkit` and runs `script`, returning the output even when connecting fails.
fn try_nbdsh(nbdkit: &Nbdkit, script: &str) -> Output {
    common::run(Command::new("/usr/bin/python3").args(["-m", "nbd", "-u", &nbdkit.uri(), "-c", script]))
}

fn ctl(env: &S3Env, args: &[&str]) -> String {
    let mut p = env.params(TEST_BUCKET);
    p.extend([format!("access-key={}", env.access_key), format!("secret-key={}", env.secret_key)]);
    let out = common::run_ok(Command::new(env!("CARGO_BIN_EXE_nbds3ctl")).args(p).args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `lease:` line of `nbds3ctl info`.
fn lease_info(env: &S3Env, export: &str) -> String {
    let info = ctl(env, &["info", export]);
    info.lines().find_map(|l| l.strip_prefix("lease:")).map(|l| l.trim().to_string()).unwrap_or(info)
}

/// Every block object of `export` in the bucket: (block number, bytes).
fn stored_blocks(env: &S3Env, export: &str) -> Vec<(u64, Vec<u8>)> {
    let prefix = format!("blocks/{export}/");
    let keys = env.list(TEST_BUCKET, &prefix);
    env.with_client(async |client| {
        let mut blocks = Vec::new();
        for key in keys {
            let object = client.get_object().bucket(TEST_BUCKET).key(&key).send().await.expect("get block");
            let bytes = object.body.collect().await.expect("body").into_bytes().to_vec();
            let offset = u64::from_str_radix(key.strip_prefix(&prefix).expect("prefix"), 16).expect("hex offset");
            blocks.push((offset / BLOCK as u64, bytes));
        }
        blocks
    })
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: signalling a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill({pid}, {signal})");
}

/// Waits (at most `within`) until `nbdkit`'s log contains `text`.
fn wait_for_log(nbdkit: &Nbdkit, text: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !nbdkit.stderr().contains(text) {
        assert!(Instant::now() < deadline, "no {text:?} in the log within {within:?}:\n{}", nbdkit.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client that stays connected while its server is frozen: an nbdsh script that runs one step
/// per line it reads, and prints one line per step.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    /// `steps` are Python blocks; `h` is the connected handle, `data` as in [`DATA`].
    fn start(nbdkit: &Nbdkit, steps: &[&str]) -> Client {
        let mut script = format!("{DATA}import sys\n");
        for step in steps {
            script.push_str("sys.stdin.readline()\ntry:\n");
            for line in step.lines() {
                script.push_str(&format!("    {line}\n"));
            }
            script.push_str("    print('ok', flush=True)\n");
            script.push_str(
                "except nbd.Error as e:\n    print(errno.errorcode.get(e.errno, e.errno), e.string, flush=True)\n",
            );
        }
        let mut child = Command::new("/usr/bin/python3")
            .args(["-m", "nbd", "-u", &nbdkit.uri(), "-c", &format!("import errno\n{script}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nbdsh");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Client { child, stdin, stdout }
    }

    /// Runs the next step: "ok", or the errno name and message it failed with.
    fn step(&mut self) -> String {
        writeln!(self.stdin).and_then(|()| self.stdin.flush()).expect("to nbdsh");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("from nbdsh");
        assert!(!line.is_empty(), "nbdsh exited");
        line.trim().to_string()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Host A writes and flushes, writes more without flushing, and is frozen with SIGSTOP. Host B
/// starts, is refused until A's lease runs out, takes the export, writes and flushes. A wakes
/// (SIGCONT): its writes and FLUSH fail with EIO, it learns who took the export, and at shutdown
/// it reports the unflushed blocks it could not write. The bucket then holds exactly B's blocks
/// and what A flushed before it froze, read back through the bucket, through B and through a
/// fresh reader.
///
/// On a server that ignores conditional writes (Garage), the same holds for a writer frozen
/// outside a renewal, which is when this test freezes A: it stops writing by its own clock and
/// learns of its successor by reading the lease before it renews. What such a server cannot give
/// is said at the start of the run.
#[test]
fn a_frozen_writer_wakes_up_fenced() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let atomic = nbds3::storage::s3::probe_conditional_writes(&env.config(TEST_BUCKET)).expect("probe");
    if !atomic {
        eprintln!(
            "NOTE: {} ignores conditional writes: this run checks the fence a frozen writer's own clock gives \
             (frozen outside a renewal); two writers taking or renewing the lease at the same moment could both win there",
            env.endpoint
        );
    }
    let export = common::unique("failover");
    let a = Nbdkit::start(&params(&env, &export, "host-a", LEASE_TIME));
    // Blocks 0-7 flushed by A, 4-7 and 256-263 overwritten by B; A leaves 3, 512, 260 and 6
    // dirty, far apart so that they are not taken for a stream and written behind.
    let mut a_client = Client::start(
        &a,
        &[
            "h.pwrite(data(1, 8 * 4096), 0)\nh.flush()",
            "for i, block in enumerate([3, 512, 260, 6]):\n    h.pwrite(data(10 + i, 4096), block * 4096)",
            "h.pwrite(data(20, 4096), 768 * 4096)",
            "h.flush()",
            "h.pwrite(data(21, 4096), 6 * 4096)",
        ],
    );
    assert_eq!(a_client.step(), "ok", "A's first write and FLUSH");
    assert_eq!(a_client.step(), "ok", "A's unflushed writes");
    let held = lease_info(&env, &export);
    assert!(held.starts_with(&format!("pid {} on host-a until ", a.pid())), "{held}");

    // Freeze A just after it renewed its lease, so that the freeze does not fall between a
    // renewal's read and write (which would matter where If-Match is ignored).
    let lease_key = format!("leases/{export}");
    let before = env.get_text(TEST_BUCKET, &lease_key).expect("A's lease");
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.get_text(TEST_BUCKET, &lease_key).as_ref() == Some(&before) {
        assert!(Instant::now() < deadline, "A did not renew its lease within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(a.pid(), libc::SIGSTOP);
    let frozen = Instant::now();
    let a_expires: u64 = env
        .get_text(TEST_BUCKET, &lease_key)
        .expect("A's lease")
        .lines()
        .find_map(|l| l.strip_prefix("expires="))
        .and_then(|e| e.parse().ok())
        .expect("expires=");

    // B is refused while A's lease lasts, then takes it.
    let b = Nbdkit::start(&params(&env, &export, "host-b", LEASE_TIME));
    let deadline = Instant::now() + Duration::from_secs(3 * LEASE_TIME);
    while !try_nbdsh(&b, "print(1)").status.success() {
        assert!(Instant::now() < deadline, "B never got the export:\n{}", b.stderr());
        std::thread::sleep(Duration::from_millis(250));
    }
    let waited = frozen.elapsed();
    let taken_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(
        b.stderr().contains(&format!("is held by another writer, nbds3 pid {} on host-a", a.pid())),
        "{}",
        b.stderr()
    );
    assert!(b.stderr().contains(&format!("the lease of pid {} on host-a expired", a.pid())), "{}", b.stderr());
    assert!(taken_at > a_expires, "B took the export at {taken_at}, before A's lease expired at {a_expires}");
    b.nbdsh(&format!(
        "{DATA}h.pwrite(data(2, 4 * 4096), 4 * 4096)\nh.pwrite(data(3, 8 * 4096), 256 * 4096)\nh.flush()"
    ));
    let taken = lease_info(&env, &export);
    assert!(taken.starts_with(&format!("pid {} on host-b until ", b.pid())), "{taken}");

    // A wakes: every write and FLUSH fails with EIO, at once and after it has seen B's lease.
    signal(a.pid(), libc::SIGCONT);
    let woke = Instant::now();
    let failed = a_client.step();
    assert!(failed.starts_with("EIO "), "A's write after waking: {failed}");
    assert!(a_client.step().starts_with("EIO "), "A's FLUSH after waking");
    let seen = format!("taken over by nbds3 pid {} on host-b", b.pid());
    wait_for_log(&a, &seen, Duration::from_secs(10));
    assert!(a_client.step().starts_with("EIO "), "A's write once it knows");
    eprintln!(
        "A frozen {:.1} s; B refused, then took the export {:.1} s after A froze; A woke to EIO and learnt of B within {:.1} s",
        frozen.elapsed().as_secs_f64() - woke.elapsed().as_secs_f64(),
        waited.as_secs_f64(),
        woke.elapsed().as_secs_f64()
    );
    drop(a_client);

    // A stops: its 4 dirty blocks cannot be written, and it says so. Then none of them is in
    // the bucket, and nothing else of A's after its first FLUSH.
    signal(a.pid(), libc::SIGTERM);
    wait_for_log(&a, "writing back at shutdown failed", Duration::from_secs(10));
    assert!(a.stderr().contains("4 blocks of unflushed writes are lost"), "{}", a.stderr());
    a.stop();
    let expected: Vec<(u64, Vec<u8>)> = {
        let (a1, b1, b2) = (data(1, 8 * BLOCK), data(2, 4 * BLOCK), data(3, 8 * BLOCK));
        let block = |d: &[u8], i: usize| d[i * BLOCK..(i + 1) * BLOCK].to_vec();
        (0..4)
            .map(|i| (i as u64, block(&a1, i)))
            .chain((0..4).map(|i| (4 + i as u64, block(&b1, i))))
            .chain((0..8).map(|i| (256 + i as u64, block(&b2, i))))
            .collect()
    };
    let stored = stored_blocks(&env, &export);
    assert_eq!(
        stored.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        expected.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "the blocks in the bucket"
    );
    for ((n, got), (_, want)) in stored.iter().zip(&expected) {
        assert!(got == want, "block {n} in the bucket is not what A flushed or B wrote");
    }
    let region = 1024 * BLOCK;
    let mut image = vec![0u8; region];
    for (n, bytes) in &expected {
        image[*n as usize * BLOCK..][..BLOCK].copy_from_slice(bytes);
    }
    let check = format!("import hashlib\nprint(hashlib.sha256(h.pread({region}, 0)).hexdigest())");
    let want = sha256(&image);
    assert_eq!(b.nbdsh(&check).trim(), want, "the export read through B");
    b.stop();
    assert!(lease_info(&env, &export).starts_with("released by pid"), "B released the lease");
    let reader = Nbdkit::start_with(&["-r"], &params(&env, &export, "host-c", LEASE_TIME));
    assert_eq!(reader.nbdsh(&check).trim(), want, "the export read by a fresh reader");
}

fn sha256(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("image");
    std::fs::write(&path, bytes).expect("write image");
    let out = common::run_ok(Command::new("sha256sum").arg(&path));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// A second writer, on another host, is refused. nbdkit 1.32 answers a failed open with
/// NBD_REP_ERR_UNKNOWN and no message, whatever the errno, so clients can only say that there is
/// no such export; the reason, naming the holder's host and pid, is in the refused nbdkit's log.
/// Stopped, the refused nbdkit does not claim to have lost writes it never accepted. The holder
/// on this host, killed with -9, may be taken over at once only by a process with its host id.
#[test]
fn a_refused_writer_says_why_and_stops_quietly() {
    require!("nbdkit", "nbdinfo", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let export = common::unique("refused");
    let a = Nbdkit::start(&params(&env, &export, "host-a", LONG_LEASE));
    a.nbdsh("h.pwrite(b'a' * 4096, 0)\nh.flush()");

    // -v: the counters at shutdown are logged at info level, as nbdkit debug messages.
    let b = Nbdkit::start_with(&["-v"], &params(&env, &export, "host-b", LONG_LEASE));
    let nbdsh = try_nbdsh(&b, "print(1)");
    assert!(!nbdsh.status.success());
    let nbdsh = String::from_utf8_lossy(&nbdsh.stderr);
    assert!(nbdsh.contains("server has no export named ''"), "{nbdsh}");
    let nbdinfo = common::run(Command::new("nbdinfo").arg(b.uri()));
    assert!(!nbdinfo.status.success());
    let nbdinfo = String::from_utf8_lossy(&nbdinfo.stderr);
    assert!(nbdinfo.contains("server replied with error to opt_go request"), "{nbdinfo}");
    let refusal = format!("error: export {export}: is held by another writer, nbds3 pid {} on host-a, for", a.pid());
    assert!(b.stderr().contains(&refusal), "{}", b.stderr());
    eprintln!("what clients print:\n{}{}", nbdsh.trim_end(), nbdinfo);
    let listed = ctl(&env, &["list"]);
    let row = listed.lines().find(|l| l.starts_with(&format!("{export} "))).unwrap_or(&listed);
    assert!(row.contains(&format!("  pid {} on host-a until 20", a.pid())) && row.ends_with(" UTC"), "{listed}");

    // Stopped, B says what it served (its counters), and nothing about lost writes.
    signal(b.pid(), libc::SIGTERM);
    wait_for_log(&b, &format!("export {export}: dirty_bytes="), Duration::from_secs(10));
    let b_log = b.stderr();
    drop(b);
    for claim in ["unflushed writes are lost", "final flush failed", "writing back"] {
        assert!(!b_log.contains(claim), "{b_log}");
    }

    // A crashes. Host B may not take its lease before it expires, as A may still be running on
    // another machine; a new process of host A sees that A is gone, and takes it at once.
    a.crash();
    let b = Nbdkit::start(&params(&env, &export, "host-b", LONG_LEASE));
    assert!(!try_nbdsh(&b, "print(1)").status.success(), "host B took a crashed host A's live lease");
    let a2 = Nbdkit::start(&params(&env, &export, "host-a", LONG_LEASE));
    assert_eq!(a2.nbdsh("print(h.pread(4096, 0) == b'a' * 4096)").trim(), "True");
    assert!(a2.stderr().contains("no longer runs"), "{}", a2.stderr());
}

/// A writer's block writes queued behind slow requests for its only request slot
/// (`s3-concurrency=1`) while it loses its lease (its S3 path for the lease is cut, so it cannot
/// renew) and another writer takes the export over and writes the same blocks: the queued writes
/// must fail, not land over the successor's. The library's storage is driven directly, so that the
/// queue is exactly as long as the test makes it.
#[test]
fn writes_queued_for_a_request_slot_do_not_land_after_a_takeover() {
    use std::sync::Arc;

    use nbds3::lease::{Lease, LeaseConfig};
    use nbds3::storage::s3::{self, runtime, S3Objects, Transport};
    use nbds3::storage::{Backend, FencedStorage, PlainStorage};
    use nbds3::{BlockId, ExportName, Storage};

    let Some(env) = common::s3() else { return };
    let export = ExportName::new(&common::unique("queued")).unwrap();
    let lease_config =
        LeaseConfig { time: Duration::from_secs(LEASE_TIME), takeover: false, request_timeout: Duration::from_secs(2) };
    let opened = |lease_endpoint: String, blocks_endpoint: String| {
        let lease_backend: Arc<dyn Backend> = Arc::new(
            s3::backend(&nbds3::storage::S3Config { endpoint: Some(lease_endpoint), ..env.config(TEST_BUCKET) })
                .expect("backend"),
        );
        let config = nbds3::storage::S3Config {
            endpoint: Some(blocks_endpoint),
            concurrency: 1,
            timeout: lease_config.request_timeout,
            ..env.config(TEST_BUCKET)
        };
        let transport = runtime().unwrap().block_on(Transport::new(&config));
        let s3 = PlainStorage::new(Arc::new(S3Objects::new(transport, &config)), &export, BLOCK);
        let lease = Lease::new(lease_backend, export.clone(), lease_config);
        (Arc::new(FencedStorage::new(Arc::new(s3), lease.clone())), lease)
    };
    let (lease_path, blocks_path) =
        (common::proxy::Proxy::start(&env.endpoint), common::proxy::Proxy::start(&env.endpoint));
    let (a, a_lease) = opened(lease_path.endpoint(), blocks_path.endpoint());
    a_lease.hold().expect("A's lease");

    // Each of A's PUTs now holds the slot ~1.5 s: 8 of them queue for ~12 s, and A's lease, which
    // it can no longer renew, runs out (for B) 6 s after its last renewal.
    blocks_path.slow(Duration::from_millis(500));
    lease_path.cut();
    let cut = Instant::now();
    let writers: Vec<_> = (0..8)
        .map(|n| {
            let a = a.clone();
            std::thread::spawn(move || a.write_block(BlockId(n), &[0xaa; BLOCK]))
        })
        .collect();
    let (b, b_lease) = opened(env.endpoint.clone(), env.endpoint.clone());
    while let Err(e) = b_lease.hold() {
        assert!(cut.elapsed() < Duration::from_secs(4 * LEASE_TIME), "B never took the export: {e}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let taken = cut.elapsed();
    for n in 0..8 {
        b.write_block(BlockId(n), &[0xbb; BLOCK]).expect("B's write");
    }
    let outcomes: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let refused = outcomes.iter().filter(|o| o.is_err()).count();
    eprintln!(
        "B took the export {:.1} s after A lost its lease path; {refused} of A's 8 queued writes were refused, \
         the rest were sent while A held it",
        taken.as_secs_f64()
    );
    // What a later A write could still land comes after its deadline; give it that long.
    std::thread::sleep(Duration::from_secs(3));
    let stored = stored_blocks(&env, export.as_str());
    assert_eq!(stored.iter().map(|(n, _)| *n).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
    for (n, bytes) in &stored {
        assert!(bytes.iter().all(|&b| b == 0xbb), "block {n} holds A's write, which landed over B's");
    }
    assert!(refused > 0, "none of A's writes was queued past its lease: {outcomes:?}");
    b_lease.release();
}
