//! The plugin in a real nbdkit against a real S3 server: layout, sparseness, flush semantics,
//! persistence, start-up checks and hostile bucket contents.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{run, Nbdkit, S3Env, TEST_BUCKET};

fn params(env: &S3Env, export: &str, extra: &[&str]) -> Vec<String> {
    let mut p = env.params(TEST_BUCKET);
    p.push(format!("export={export}"));
    p.push("size=1G".into());
    p.extend(extra.iter().map(|s| s.to_string()));
    p
}

/// Objects appear only after FLUSH, and then exactly the non-zero blocks exist under
/// `blocks/{export}/{offset:016x}`; reading never-written blocks creates nothing.
#[test]
fn flush_uploads_exactly_the_nonzero_blocks_under_the_seed_keys() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let export = common::unique("layout");
    let prefix = format!("blocks/{export}/");
    let nbdkit = Nbdkit::start(&params(&env, &export, &[]));
    let out = nbdkit.nbdsh(
        "assert h.pread(65536, 1 << 29) == bytes(65536)\n\
         h.pwrite(b'a' * 4096, 4096)\n\
         h.pwrite(b'b' * 10000, 3 * 4096 + 5)\n\
         h.pwrite(bytes(4096), 20 * 4096)\n\
         print(h.pread(4, 4096 + 4094) + h.pread(2, 3 * 4096 + 4))",
    );
    assert_eq!(out.trim(), "bytearray(b'aa\\x00\\x00\\x00b')");
    assert_eq!(env.list(TEST_BUCKET, &prefix), Vec::<String>::new(), "objects before FLUSH");
    nbdkit.nbdsh("h.flush()");
    let keys: Vec<String> = [0x1000, 0x3000, 0x4000, 0x5000].iter().map(|o| format!("{prefix}{o:016x}")).collect();
    assert_eq!(env.list(TEST_BUCKET, &prefix), keys);
}

/// Write with nbdsh, flush, stop nbdkit, start a new one on the same bucket and export: the
/// bytes are identical. The second server forks into the background, as users run it.
#[test]
fn data_survives_a_restart() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let export = common::unique("restart");
    let nbdkit = Nbdkit::start(&params(&env, &export, &["block-size=64K"]));
    nbdkit.nbdsh("import random\nrandom.seed(3)\nh.pwrite(random.randbytes(3 << 20), 777)\nh.flush()");
    nbdkit.stop();
    let nbdkit = Nbdkit::start_daemon(&params(&env, &export, &["block-size=64K"]));
    let out = nbdkit.nbdsh("import random\nrandom.seed(3)\nprint(h.pread(3 << 20, 777) == random.randbytes(3 << 20))");
    assert_eq!(out.trim(), "True");
    nbdkit.stop();
}

/// Writing zeros over a stored block, or trimming it, deletes its object at the next FLUSH.
#[test]
fn zeros_and_trim_delete_objects() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let export = common::unique("zero");
    let prefix = format!("blocks/{export}/");
    let nbdkit = Nbdkit::start(&params(&env, &export, &[]));
    nbdkit.nbdsh("h.pwrite(b'z' * 4096 * 3, 0); h.flush()");
    assert_eq!(env.list(TEST_BUCKET, &prefix).len(), 3);
    nbdkit.nbdsh("h.pwrite(bytes(4096), 0); h.zero(4096, 4096); h.trim(4096, 8192); h.flush()");
    assert_eq!(env.list(TEST_BUCKET, &prefix), Vec::<String>::new());
    assert_eq!(nbdkit.nbdsh("print(h.pread(3 * 4096, 0) == bytes(3 * 4096))").trim(), "True");
}

/// A stray object of the wrong size under the export's prefix fails that read with EIO and a
/// message naming the key; nbdkit keeps serving.
#[test]
fn an_object_of_the_wrong_size_is_an_error_not_a_crash() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let export = common::unique("stray");
    let key = format!("blocks/{export}/0000000000002000");
    env.put(TEST_BUCKET, &key, b"not a block");
    let nbdkit = Nbdkit::start(&params(&env, &export, &[]));
    let out = nbdkit.nbdsh(
        "try:\n    h.pread(10, 8192)\nexcept nbd.Error as e:\n    print('EIO' if 'EIO' in str(e) else e)\n\
         print(h.pread(4, 0))",
    );
    assert_eq!(out.trim(), "EIO\nbytearray(b'\\x00\\x00\\x00\\x00')");
    let log = nbdkit.stderr();
    assert!(log.contains(&format!("block {key} is corrupt: it is 11 bytes, expected 4096")), "{log}");
}

/// nbds3 creates a missing bucket when the credentials allow it.
#[test]
fn a_missing_bucket_is_created() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let bucket = common::unique("bucket");
    let mut p = env.params(&bucket);
    p.push("size=16M".into());
    let nbdkit = Nbdkit::start(&p);
    nbdkit.nbdsh("h.pwrite(b'new' * 2000, 0); h.flush()");
    assert_eq!(env.list(&bucket, "blocks/dev/").len(), 2);
    nbdkit.stop();
    env.remove_bucket(&bucket);
}

/// Start-up fails fast, with the bucket and the reason, on bad credentials, a bucket the
/// credentials may not create (Garage says it does not exist, SeaweedFS and AWS deny the key
/// access to it), and an endpoint nothing listens on; no message shows a secret.
#[test]
fn start_up_refuses_bad_s3_settings_with_the_reason() {
    require!("nbdkit");
    let Some(env) = common::s3() else { return };
    let limited_id = std::env::var("NBDS3_S3_LIMITED_KEY_ID").expect("scripts/seaweedfs env");
    let limited_secret = std::env::var("NBDS3_S3_LIMITED_SECRET").expect("scripts/seaweedfs env");
    // (environment overrides, parameters, expected message)
    type Case<'a> = (Vec<(&'a str, String)>, Vec<String>, &'a str);
    let wrong_secret = "Wr0ngS3cretThatMustNeverBeShown1234567890";
    let secrets = [env.secret_key.clone(), limited_secret.clone(), wrong_secret.to_string()];
    let mut wrong_secret_params = env.params(TEST_BUCKET);
    let no_such_bucket = if env.server == "garage" {
        "bucket nbds3-no-such-bucket does not exist and could not be created"
    } else {
        "permission denied: bucket nbds3-no-such-bucket: AccessDenied"
    };
    wrong_secret_params.extend([format!("access-key={}", env.access_key), format!("secret-key={wrong_secret}")]);
    let cases: Vec<Case> = vec![
        (vec![("AWS_SECRET_ACCESS_KEY", "0".repeat(64))], env.params(TEST_BUCKET), "credentials rejected"),
        (vec![], wrong_secret_params, "credentials rejected"),
        (
            vec![("AWS_ACCESS_KEY_ID", limited_id), ("AWS_SECRET_ACCESS_KEY", limited_secret)],
            env.params("nbds3-no-such-bucket"),
            no_such_bucket,
        ),
        (
            vec![],
            vec![format!("bucket={TEST_BUCKET}"), "endpoint=http://127.0.0.1:9".into()],
            "cannot reach the endpoint",
        ),
    ];
    for (vars, params, expected) in cases {
        let started = std::time::Instant::now();
        let out = run(Command::new("nbdkit")
            .args(["-f", "-U", "-"])
            .arg(common::plugin())
            .args(&params)
            .args(["size=1G", "s3-timeout=5"])
            .envs(vars)
            .arg("--run")
            .arg("true"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{params:?} started");
        assert!(stderr.contains(expected), "{params:?}: {stderr}");
        assert!(started.elapsed().as_secs() < 30, "{params:?} took {:?}", started.elapsed());
        assert!(!secrets.iter().any(|secret| stderr.contains(secret.as_str())), "a secret in: {stderr}");
    }
}

/// Secret keys never reach the log, even at debug level, and can come from a file.
#[test]
fn the_secret_key_comes_from_a_file_and_never_shows_in_the_log() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, &env.secret_key).unwrap();
    let mut p = params(&env, &common::unique("secret"), &[]);
    p.push(format!("access-key={}", env.access_key));
    p.push(format!("secret-key=+{}", secret_file.display()));
    let nbdkit = Nbdkit::start_with(&["-v"], &p);
    nbdkit.nbdsh("h.pwrite(b's' * 4096, 0); h.flush()");
    let log = nbdkit.stderr();
    assert!(log.contains(" on s3://"), "{log}");
    assert!(!log.contains(&env.secret_key), "the secret is in the log");
}

/// `params` with a stats file written every 0.1 s, in a temporary directory that lives as long
/// as the first value returned.
fn params_with_stats(env: &S3Env, export: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats");
    let mut p = params(env, export, &[extra, &["stats-interval=0.1"]].concat());
    p.push(format!("stats-file={}", stats.display()));
    (dir, stats, p)
}

/// The counters of `export` in the stats file at `path`, waiting up to 10 s for its line.
fn export_stats(path: &Path, export: &str) -> std::collections::HashMap<String, u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with(&format!("export={export} "))) {
            return line
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .collect();
        }
        assert!(std::time::Instant::now() < deadline, "no stats line in {text:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A client reading on with 8 requests of 4 KiB in flight (as fio's and qemu's do) finds the
/// blocks already loaded: nbds3 notices the stream although nbdkit hands the requests to any of
/// the connection's threads.
#[test]
fn a_sequential_reader_through_nbdkit_is_read_ahead() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let export = common::unique("readahead");
    let (_dir, stats, p) = params_with_stats(&env, &export, &[]);
    let nbdkit = Nbdkit::start(&p);
    nbdkit.nbdsh("h.pwrite(b'r' * (1 << 20), 0); h.flush()");
    nbdkit.stop();
    std::fs::remove_file(&stats).unwrap();

    let nbdkit = Nbdkit::start(&p);
    let out = nbdkit.nbdsh(
        "from collections import deque\n\
         same, in_flight = True, deque()\n\
         def finish():\n    \
             global same\n    \
             cookie, buf = in_flight.popleft()\n    \
             while not h.aio_command_completed(cookie):\n        \
                 h.poll(-1)\n    \
             same = same and buf.to_bytearray() == b'r' * 4096\n\
         for offset in range(0, 1 << 20, 4096):\n    \
             buf = nbd.Buffer(4096)\n    \
             in_flight.append((h.aio_pread(buf, offset), buf))\n    \
             if len(in_flight) == 8:\n        \
                 finish()\n\
         while in_flight:\n    \
             finish()\n\
         print(same)",
    );
    assert_eq!(out.trim(), "True");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s = export_stats(&stats, &export);
    assert!(s["hits"] >= 192, "most of the 256 reads found their block loaded ahead: {s:?}");
}

/// NBD_CMD_CACHE loads blocks ahead of the reads that use them, and `stats-file` shows what each
/// step cost in S3 requests: the reads after a CACHE make no GET at all.
#[test]
fn cache_command_prefetches_and_stats_file_counts_requests() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let export = common::unique("cachecmd");
    let (_dir, stats, p) = params_with_stats(&env, &export, &["block-size=64K"]);
    let read_stats = || export_stats(&stats, &export);
    let nbdkit = Nbdkit::start(&p);
    nbdkit.nbdsh("h.pwrite(b'q' * (1 << 20), 0); h.flush()");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s = read_stats();
    assert_eq!((s["puts"], s["gets"], s["stored_bytes"]), (16, 0, 1 << 20), "{s:?}");
    nbdkit.stop();
    std::fs::remove_file(&stats).unwrap();

    let nbdkit = Nbdkit::start(&p);
    nbdkit.nbdsh("h.cache(1 << 20, 0)");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(read_stats()["gets"], 16, "CACHE loaded every block");
    assert_eq!(nbdkit.nbdsh("print(h.pread(1 << 20, 0) == b'q' * (1 << 20))").trim(), "True");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s = read_stats();
    assert_eq!((s["gets"], s["hits"] >= 16), (16, true), "the reads made no GET: {s:?}");
}

/// However many parts of nbds3 write back at once (write-behind of a sequential writer, the
/// background writer and every writer thread past `max-dirty`, FLUSH), at most `s3-concurrency`
/// block uploads are in flight (plus, at times, the lease's renewal).
#[test]
fn block_uploads_in_flight_are_bounded_by_s3_concurrency() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let proxy = common::proxy::Proxy::start(&env.endpoint);
    // Slow enough that requests overlap, so a missing bound would show.
    proxy.slow(std::time::Duration::from_millis(20));
    let export = common::unique("inflight");
    let mut p = params(&env, &export, &["block-size=64K", "max-dirty=1M", "s3-concurrency=2"]);
    p.retain(|kv| !kv.starts_with("endpoint="));
    p.push(format!("endpoint={}", proxy.endpoint()));
    let nbdkit = Nbdkit::start(&p);
    let out = nbdkit.nbdsh(
        "import random\n\
         data = random.Random(7).randbytes(16 << 20)\n\
         for at in range(0, 16 << 20, 256 << 10):\n    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data[at:at + (256 << 10)])), at)\n\
         while h.aio_in_flight() > 0:\n    h.poll(-1)\n\
         scattered = {random.Random(i).randrange(0, 256) for i in range(64)}\n\
         for b in scattered:\n    h.pwrite(data[:4096], (32 << 20) + (b << 16))\n\
         h.flush()\n\
         print(h.pread(16 << 20, 0) == data, len(scattered))",
    );
    let (ok, scattered) = out.trim().split_once(' ').expect("two words");
    assert_eq!(ok, "True");
    let peak = proxy.peak_in_flight();
    assert!(peak <= 2 + 1, "{peak} requests in flight at once with s3-concurrency=2");
    let stored = env.list(TEST_BUCKET, &format!("blocks/{export}/")).len();
    assert_eq!(stored, 256 + scattered.parse::<usize>().expect("a count"), "one object per block written");
}
