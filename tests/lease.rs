//! One writer per export: a second writer is refused with the holder's name, readers are not,
//! a takeover fences the old writer (its unflushed writes fail and never reach the bucket), and
//! a released or crashed holder's lease is taken at once. The exact single-writer checks run on
//! the S3 server under test when it honours conditional writes (SeaweedFS, the primary server in
//! CI); the best-effort ones when it does not (Garage, which gets a warning); and on a directory.
//! Each test that depends on conditional writes says in the run's output whether it ran, and where.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{Nbdkit, S3Env, TEST_BUCKET};

fn params(env: &S3Env, export: &str, extra: &[&str]) -> Vec<String> {
    let mut p = env.params(TEST_BUCKET);
    p.extend([
        format!("access-key={}", env.access_key),
        format!("secret-key={}", env.secret_key),
        format!("export={export}"),
        "size=64M".into(),
        // Short, so that a takeover is noticed within seconds: renewals every (6 - 2) / 3 s.
        "lease-time=6".into(),
        "s3-timeout=2".into(),
    ]);
    p.extend(extra.iter().map(|s| s.to_string()));
    p
}

/// Connects to `nbdkit` and runs `script`, returning the output even when connecting fails.
fn try_nbdsh(nbdkit: &Nbdkit, script: &str) -> Output {
    common::run(Command::new("/usr/bin/python3").args(["-m", "nbd", "-u", &nbdkit.uri(), "-c", script]))
}

const DATA: &str = "import random\ndef data(seed, n):\n    return random.Random(seed).randbytes(n)\n";

/// The S3 server under test if it honours conditional writes, which the exact single-writer
/// guarantee needs; if it does not, says so in the run's output and returns `None`: there
/// `without_conditional_writes_a_warning_and_best_effort_refusal` runs instead.
fn server_with_conditional_writes() -> Option<S3Env> {
    let env = common::s3()?;
    if env.conditional_writes() {
        common::note(&format!("ran on {}, which honours conditional writes", env.name()));
        Some(env)
    } else {
        common::note(&format!(
            "not run on {}, which ignores conditional writes (the best-effort test runs instead)",
            env.name()
        ));
        None
    }
}

#[test]
fn one_writer_per_export_on_a_server_with_conditional_writes() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = &server_with_conditional_writes() else { return };
    let export = common::unique("lease");

    let a = Nbdkit::start(&params(env, &export, &[]));
    a.nbdsh(&format!("{DATA}h.pwrite(data(1, 1 << 20), 0)\nh.flush()"));
    let lease = env.get_text(TEST_BUCKET, &format!("leases/{export}")).expect("the lease object");
    assert!(lease.contains(&format!("pid={}", a.pid())), "{lease}");

    // A second writer starts, but cannot open the export; the message names the holder.
    let b = Nbdkit::start(&params(env, &export, &[]));
    let out = try_nbdsh(&b, "print('connected')");
    assert!(!out.status.success(), "a second writer connected: {}", String::from_utf8_lossy(&out.stdout));
    let refusal = format!("export {export}: is held by another writer, nbds3 pid {} on", a.pid());
    assert!(b.stderr().contains(&refusal), "{}", b.stderr());
    assert!(b.stderr().contains("lease-takeover=true"), "{}", b.stderr());
    b.stop();

    // A reader is welcome.
    let reader = Nbdkit::start_with(&["-r"], &params(env, &export, &[]));
    assert_eq!(reader.nbdsh(&format!("{DATA}print(h.pread(1 << 20, 0) == data(1, 1 << 20))")).trim(), "True");
    reader.stop();

    // A keeps writing and flushing one block while another writer takes the export over.
    // Within a renewal or two A notices: its next write or FLUSH fails with EIO. It prints how
    // many rounds it flushed, whether the error was EIO, and which call failed.
    let uri = a.uri();
    let writer = std::thread::spawn(move || {
        common::nbdsh(
            &uri,
            "import time\nlast = 0\ndeadline = time.time() + 20\nwhile time.time() < deadline:\n\
             \x20   call = 'pwrite'\n    try:\n        h.pwrite(bytes([last % 250 + 1]) * 4096, 8 << 20)\n\
             \x20       call = 'flush'\n        h.flush()\n\
             \x20   except nbd.Error as e:\n        print(last, 'EIO' in str(e), call)\n        break\n\
             \x20   last += 1\n    time.sleep(0.2)\nelse:\n    print(last, 'never failed')",
        )
    });
    std::thread::sleep(Duration::from_secs(1));
    let c = Nbdkit::start(&params(env, &export, &["lease-takeover=true"]));
    c.nbdsh(&format!("{DATA}h.pwrite(data(3, 1 << 20), 4 << 20)\nh.flush()"));
    let out = writer.join().expect("the old writer's client");
    let fields: Vec<&str> = out.split_whitespace().collect();
    let [flushed, eio, failed_call] = fields[..] else { panic!("the old writer's client printed {out:?}") };
    let flushed: u32 = flushed.parse().expect("count");
    assert_eq!(eio, "True", "the old writer kept writing after a takeover: {out}");
    assert!(flushed > 0, "the old writer never wrote before the takeover");
    assert!(a.stderr().contains(&format!("taken over by nbds3 pid {} on", c.pid())), "{}", a.stderr());
    // A new writable connection to A is refused too.
    assert!(!try_nbdsh(&a, "print(1)").status.success());
    a.stop();

    // C stops cleanly, releasing the lease: the next writer gets it at once and sees C's data,
    // and A's last acknowledged write. A write A could not even accept never reaches the bucket;
    // one whose FLUSH failed may have (the FLUSH wrote the block back, then found the lease
    // gone), as a disk's failed flush may have written some of its data: nothing else may.
    c.stop();
    // -v: taking a released lease is normal, so it is logged at info level, not as a warning.
    let d = Nbdkit::start_with(&["-v"], &params(env, &export, &[]));
    let acknowledged = (flushed - 1) % 250 + 1;
    let possible = if failed_call == "flush" { vec![acknowledged, flushed % 250 + 1] } else { vec![acknowledged] };
    let out = d.nbdsh(&format!(
        "{DATA}print(h.pread(1 << 20, 0) == data(1, 1 << 20), h.pread(1 << 20, 4 << 20) == data(3, 1 << 20), \
         any(h.pread(4096, 8 << 20) == bytes([v]) * 4096 for v in {possible:?}))"
    ));
    assert_eq!(out.trim(), "True True True", "after the takeover (the old writer's {failed_call} failed)");
    assert!(d.stderr().contains("released it"), "{}", d.stderr());

    // A writer killed with -9 on this machine leaves its lease behind; its successor sees that
    // the holder is gone and takes it without waiting for it to expire.
    d.nbdsh(&format!("{DATA}h.pwrite(data(4, 4096), 0)\nh.flush()"));
    d.crash();
    let e = Nbdkit::start(&params(env, &export, &[]));
    assert_eq!(e.nbdsh(&format!("{DATA}print(h.pread(4096, 0) == data(4, 4096))")).trim(), "True");
    assert!(e.stderr().contains("no longer runs"), "{}", e.stderr());
    assert!(!e.stderr().contains("ignores conditional writes"), "{}", e.stderr());
}

/// A lease written by a writer on another host is honoured until it expires, then taken over,
/// with or without conditional writes: reading the lease needs none.
#[test]
fn a_lease_from_another_host_expires() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = &common::s3() else { return };
    let export = common::unique("expiry");
    let foreign = |expires: u64| {
        format!("holder=nbds3 pid 7 on far-away\nhost=far-away\nboot=b\npid=7\ntoken=t\nexpires={expires}\n")
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    env.put(TEST_BUCKET, &format!("leases/{export}"), foreign(now + 3600).as_bytes());
    let a = Nbdkit::start(&params(env, &export, &[]));
    assert!(!try_nbdsh(&a, "print(1)").status.success());
    assert!(a.stderr().contains("nbds3 pid 7 on far-away, for"), "{}", a.stderr());

    env.put(TEST_BUCKET, &format!("leases/{export}"), foreign(now - 5).as_bytes());
    assert_eq!(a.nbdsh("h.pwrite(b'y' * 512, 0)\nh.flush()\nprint(h.pread(512, 0) == b'y' * 512)").trim(), "True");
    assert!(a.stderr().contains("expired"), "{}", a.stderr());
}

/// On a server that ignores conditional writes (Garage), nbds3 says so at start-up, and still
/// refuses a writer that starts while another holds the export.
#[test]
fn without_conditional_writes_a_warning_and_best_effort_refusal() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    if env.conditional_writes() {
        common::note(&format!(
            "not run on {}, which honours conditional writes (the exact single-writer tests run instead)",
            env.name()
        ));
        return;
    }
    common::note(&format!("ran on {}, which ignores conditional writes", env.name()));
    let export = common::unique("garage-lease");
    let a = Nbdkit::start(&params(&env, &export, &[]));
    // Said at start-up, before any client connects, and only once.
    assert!(a.stderr().contains("the S3 server ignores conditional writes"), "{}", a.stderr());
    a.nbdsh("h.pwrite(b'a' * 4096, 0)\nh.flush()");
    assert_eq!(a.stderr().matches("ignores conditional writes").count(), 1, "{}", a.stderr());
    let b = Nbdkit::start(&params(&env, &export, &[]));
    assert!(!try_nbdsh(&b, "print(1)").status.success());
    assert!(b.stderr().contains(&format!("is held by another writer, nbds3 pid {} on", a.pid())), "{}", b.stderr());
}

/// Two processes on one directory: the same rules, with the lease kept under an flock.
#[test]
fn one_writer_per_export_on_a_directory() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let p = vec![format!("dir={}", dir.path().display()), "size=16M".into()];
    let a = Nbdkit::start(&p);
    a.nbdsh("h.pwrite(b'a' * 4096, 0)\nh.flush()");
    let b = Nbdkit::start(&p);
    assert!(!try_nbdsh(&b, "print(1)").status.success());
    assert!(b.stderr().contains(&format!("is held by another writer, nbds3 pid {} on", a.pid())), "{}", b.stderr());
    b.stop();
    a.stop();
    let c = Nbdkit::start(&p);
    assert_eq!(c.nbdsh("print(h.pread(4096, 0) == b'a' * 4096)").trim(), "True");
}
