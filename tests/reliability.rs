//! Outages, slow S3, and crashes: each proves that nothing acknowledged by a FLUSH is lost and
//! that nbdkit neither crashes nor hangs.

mod common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{Nbdkit, TEST_BUCKET};

fn params(endpoint: &str, export: &str, extra: &[&str]) -> Vec<String> {
    let mut p = vec![
        format!("bucket={TEST_BUCKET}"),
        format!("endpoint={endpoint}"),
        format!("export={export}"),
        "size=256M".into(),
    ];
    p.extend(extra.iter().map(|s| s.to_string()));
    p
}

/// The python snippet that defines `data(seed, n)`: reproducible bytes.
const DATA: &str = "import random\ndef data(seed, n):\n    return random.Random(seed).randbytes(n)\n";

/// S3 goes away in the middle of a workload: writes still land in memory, FLUSH and reads that
/// need S3 fail with EIO within the bounded s3-timeout (no hang, no crash), dirty data is kept;
/// when S3 returns, the next FLUSH stores everything and every byte verifies, also after restart.
#[test]
fn an_s3_outage_fails_requests_in_bounded_time_and_loses_nothing() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let proxy = Proxy::start(&env.endpoint);
    let export = common::unique("outage");
    let nbdkit =
        Nbdkit::start(&params(&proxy.endpoint(), &export, &["s3-timeout=3", "cache-size=1M", "block-size=64K"]));
    nbdkit.nbdsh(&format!("{DATA}h.pwrite(data(1, 4 << 20), 0)\nh.flush()"));

    proxy.cut();
    let started = Instant::now();
    let out = nbdkit.nbdsh(&format!(
        "{DATA}h.pwrite(data(2, 2 << 20), 8 << 20)\n\
         try:\n    h.flush()\n    print('flushed?!')\nexcept nbd.Error as e:\n    print('flush failed', 'EIO' in str(e))\n\
         try:\n    h.pread(4096, 0)\n    print('read?!')\nexcept nbd.Error as e:\n    print('read failed', 'EIO' in str(e))\n\
         print(h.pread(4096, 8 << 20) == data(2, 2 << 20)[:4096])"
    ));
    let elapsed = started.elapsed();
    assert_eq!(out.trim(), "flush failed True\nread failed True\nTrue", "during the outage");
    assert!(elapsed < Duration::from_secs(30), "requests hung for {elapsed:?} with s3-timeout=3");
    assert!(nbdkit.stderr().contains("GET blocks/"), "the log names the key: {}", nbdkit.stderr());

    proxy.restore();
    let out = nbdkit.nbdsh(&format!(
        "{DATA}h.flush()\nprint(h.pread(4 << 20, 0) == data(1, 4 << 20), h.pread(2 << 20, 8 << 20) == data(2, 2 << 20))"
    ));
    assert_eq!(out.trim(), "True True", "after the outage");
    nbdkit.crash();

    let nbdkit = Nbdkit::start(&params(&env.endpoint, &export, &[]));
    let out = nbdkit.nbdsh(&format!(
        "{DATA}print(h.pread(4 << 20, 0) == data(1, 4 << 20), h.pread(2 << 20, 8 << 20) == data(2, 2 << 20))"
    ));
    assert_eq!(out.trim(), "True True", "after a restart");
}

/// A slow network (every chunk delayed 20 ms each way) makes S3 slow, not wrong.
#[test]
fn slow_s3_is_slow_but_loses_nothing() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let proxy = Proxy::start(&env.endpoint);
    proxy.slow(Duration::from_millis(20));
    let export = common::unique("slow");
    let nbdkit = Nbdkit::start(&params(&proxy.endpoint(), &export, &["block-size=64K"]));
    nbdkit.nbdsh(&format!("{DATA}h.pwrite(data(3, 3 << 20), 12345)\nh.flush()"));
    nbdkit.stop();
    let nbdkit = Nbdkit::start(&params(&proxy.endpoint(), &export, &[]));
    assert_eq!(nbdkit.nbdsh(&format!("{DATA}print(h.pread(3 << 20, 12345) == data(3, 3 << 20))")).trim(), "True");
}

/// S3 throttles (`503 SlowDown`) while a FLUSH writes back: the SDK retries each throttled PUT
/// with backoff, the FLUSH succeeds in bounded time, and every byte is in S3 (a crash right after
/// the FLUSH loses nothing); reads on a cold cache are throttled too and come back right.
#[test]
fn s3_throttling_is_retried_with_backoff() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let proxy = Proxy::start(&env.endpoint);
    let export = common::unique("throttle");
    // 4 MiB in 64 KiB blocks: 64 PUTs at FLUSH, well below max-dirty so none goes out earlier.
    let extra = ["s3-timeout=20", "block-size=64K"];
    let nbdkit = Nbdkit::start(&params(&proxy.endpoint(), &export, &extra));
    nbdkit.nbdsh(&format!("{DATA}h.pwrite(data(5, 4 << 20), 0)"));

    // Each throttled operation gets at most 3 of the 8 503s, and the SDK makes 5 attempts; its
    // throttling backoff is at most 1 + 2 + 4 s, so 20 s of s3-timeout is never reached. 8 is
    // also far from what exhausted the SDK's default retry quota (see the burst test below).
    proxy.throttle(8);
    let started = Instant::now();
    nbdkit.nbdsh("h.flush()");
    let elapsed = started.elapsed();
    let throttled = proxy.throttled();
    assert_eq!(throttled.len(), 8, "503s served during the FLUSH: {throttled:#?}");
    // Block PUTs, a lease renewal that happened to fall into the FLUSH, or the export record
    // that every new connection reads again (to see whether the export was resized).
    let put = |r: &String| {
        r.starts_with("PUT ") && (r.contains("/blocks/") || r.contains("/leases/"))
            || r.starts_with("GET ") && r.contains("/exports/")
    };
    assert!(throttled.iter().all(put), "throttled: {throttled:#?}");
    assert!(elapsed < Duration::from_secs(20), "FLUSH took {elapsed:?} with at most 7 s of backoff per request");
    nbdkit.crash();

    let nbdkit = Nbdkit::start(&params(&env.endpoint, &export, &[]));
    assert_eq!(nbdkit.nbdsh(&format!("{DATA}print(h.pread(4 << 20, 0) == data(5, 4 << 20))")).trim(), "True");
    nbdkit.stop();

    // Opening the export (LIST, the export record) and cold reads (GETs), throttled.
    let nbdkit = Nbdkit::start(&params(&proxy.endpoint(), &export, &extra));
    proxy.throttle(8);
    let out = nbdkit.nbdsh(&format!("{DATA}print(h.pread(4 << 20, 0) == data(5, 4 << 20))"));
    assert_eq!(out.trim(), "True", "read back through the throttling proxy");
    let throttled = proxy.throttled();
    assert_eq!(throttled.len(), 16, "503s served in all: {throttled:#?}");
    assert!(throttled[8..].iter().all(|r| r.starts_with("GET ")), "throttled: {throttled:#?}");
}

/// A burst of throttling spread over the requests of one FLUSH (200 `503 SlowDown` over 256
/// PUTs, at most 3 per request, so each succeeds on its 4th of 5 attempts, well within
/// s3-timeout) does not fail the FLUSH. With the SDK's default process-wide retry quota (500
/// tokens, 5 per throttled retry) it did: once the quota was empty the SDK stopped retrying
/// altogether; nbds3's client has no such quota.
#[test]
fn a_burst_of_throttling_does_not_fail_a_flush() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let proxy = Proxy::start(&env.endpoint);
    let export = common::unique("burst");
    let nbdkit = Nbdkit::start(&params(&proxy.endpoint(), &export, &["s3-timeout=30", "block-size=64K"]));
    nbdkit.nbdsh(&format!("{DATA}h.pwrite(data(6, 16 << 20), 0)"));
    proxy.throttle(200);
    nbdkit.nbdsh("h.flush()");
    assert_eq!(proxy.throttled().len(), 200, "503s served during the FLUSH");
    nbdkit.crash();
    let nbdkit = Nbdkit::start(&params(&env.endpoint, &export, &[]));
    assert_eq!(nbdkit.nbdsh(&format!("{DATA}print(h.pread(16 << 20, 0) == data(6, 16 << 20))")).trim(), "True");
}

/// `kill -9` right after FLUSH returned: every flushed byte is there after a restart.
#[test]
fn flushed_data_survives_kill_9() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let export = common::unique("kill9");
    let nbdkit = Nbdkit::start(&params(&env.endpoint, &export, &[]));
    nbdkit.nbdsh(&format!("{DATA}h.pwrite(data(4, 5 << 20), 777)\nh.flush()\nh.pwrite(b'unflushed' * 100, 100 << 20)"));
    nbdkit.crash();
    let nbdkit = Nbdkit::start(&params(&env.endpoint, &export, &[]));
    assert_eq!(nbdkit.nbdsh(&format!("{DATA}print(h.pread(5 << 20, 777) == data(4, 5 << 20))")).trim(), "True");
}

/// `kill -9` in the middle of a stream of writes and write-backs on the server `params` start:
/// every block reads back as one whole generation of its content, never a mix, because one block
/// is one atomic PUT (or one atomic rename, for the file backend).
fn kill_9_during_writes_never_tears_a_block(params: Vec<String>) {
    let mut writing = params.clone();
    writing.extend(["max-dirty=256K".to_string(), "block-size=64K".to_string()]);
    let nbdkit = Nbdkit::start(&writing);
    let uri = nbdkit.uri();
    // Generation g of block b is 64 KiB of the byte (b * 7 + g) % 251 + 1; the writer rewrites
    // 64 blocks over and over, one whole block per request (a block assembled from several
    // requests may legitimately hold a mix of them), while max-dirty forces write-backs.
    let writer = std::thread::spawn(move || {
        common::run(std::process::Command::new("/usr/bin/python3").args([
            "-m",
            "nbd",
            "-u",
            &uri,
            "-c",
            "import itertools\nfor g in itertools.count():\n    for b in range(64):\n        h.pwrite(bytes([(b * 7 + g) % 251 + 1]) * 65536, b * 65536)",
        ]))
    });
    std::thread::sleep(Duration::from_secs(3));
    nbdkit.crash();
    let _ = writer.join();
    let nbdkit = Nbdkit::start(&params);
    let out = nbdkit.nbdsh(
        "torn = []\nstored = 0\nfor b in range(64):\n    blk = h.pread(65536, b * 65536)\n    if any(blk):\n        stored += 1\n    if len(set(blk)) > 1:\n        torn.append(b)\nprint(stored > 0, torn)",
    );
    assert_eq!(out.trim(), "True []", "blocks written back before the crash, and torn blocks");
}

/// No torn block on S3 after `kill -9` mid-stream.
#[test]
fn kill_9_during_writes_never_tears_an_s3_block() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    kill_9_during_writes_never_tears_a_block(params(&env.endpoint, &common::unique("tear"), &[]));
}

/// No torn block in a directory after `kill -9` mid-stream.
#[test]
fn kill_9_during_writes_never_tears_a_file_block() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let params = vec!["storage=file".to_string(), format!("dir={}", dir.path().display()), "size=256M".into()];
    kill_9_during_writes_never_tears_a_block(params);
}
