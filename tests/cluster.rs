//! nbds3 on a replicated SeaweedFS cluster (`scripts/seaweedfs-cluster`: a master, three volume
//! servers, a filer with the S3 gateway, every object on two servers) that loses a volume server
//! to `kill -9` under load: I/O goes on after a bounded stall, nothing FLUSH acknowledged is lost,
//! and all of it still verifies once the server is back. Prints the stall and the retries.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Nbdkit, S3Env};

/// nbds3's bound on one S3 request, retries included: a request the cluster cannot serve within
/// it fails the I/O, so no stall may last longer.
const S3_TIMEOUT: Duration = Duration::from_secs(15);

/// Block size of the export and of fio's I/O: one S3 object per fio write, which keeps the test
/// within CI's time on two cores.
const BLOCK: u64 = 64 * 1024;

/// The probe's region: after the regions fio writes.
const PROBE_OFFSET: u64 = 96 << 20;
/// Blocks the probe writes in turn.
const PROBE_SLOTS: u64 = 16;

/// A private cluster in a temp dir on free ports; every process is killed by PID on drop.
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    env: S3Env,
}

impl Cluster {
    /// Starts the cluster, or returns `None` (after saying why) outside CI when SeaweedFS cannot
    /// be installed.
    fn start() -> Option<Cluster> {
        let installed = Command::new(script("seaweedfs")).arg("bin").output().is_ok_and(|o| o.status.success());
        if !installed {
            assert!(!common::in_ci(), "scripts/seaweedfs bin failed: SeaweedFS cannot be installed");
            eprintln!("SKIPPED: SeaweedFS cannot be installed (scripts/seaweedfs bin)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let env = S3Env {
            endpoint: String::new(),
            access_key: String::new(),
            secret_key: String::new(),
            server: "seaweedfs".into(),
        };
        let mut cluster = Cluster { dir, port: free_port_range(), env };
        let out = cluster.run(&["start"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let var = |name: &str| {
            let prefix = format!("export {name}=");
            text.lines().find_map(|l| l.strip_prefix(&prefix)).map(String::from).unwrap_or_else(|| {
                panic!("scripts/seaweedfs-cluster start printed no {name}:\n{text}\n{}", cluster.logs())
            })
        };
        cluster.env = S3Env {
            endpoint: var("NBDS3_S3_ENDPOINT"),
            access_key: var("AWS_ACCESS_KEY_ID"),
            secret_key: var("AWS_SECRET_ACCESS_KEY"),
            server: "seaweedfs".into(),
        };
        Some(cluster)
    }

    /// `scripts/seaweedfs-cluster ARGS` on this cluster.
    fn script(&self, args: &[&str]) -> Command {
        let mut command = Command::new(script("seaweedfs-cluster"));
        command
            .args(args)
            .env("NBDS3_SEAWEEDFS_CLUSTER_DIR", self.dir.path())
            .env("NBDS3_SEAWEEDFS_CLUSTER_PORT", self.port.to_string());
        command
    }

    /// Runs `scripts/seaweedfs-cluster ARGS` on this cluster, asserting it succeeded.
    fn run(&self, args: &[&str]) -> std::process::Output {
        let out = common::run(&mut self.script(args));
        assert!(
            out.status.success(),
            "scripts/seaweedfs-cluster {args:?} failed:\n{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        out
    }

    /// How many copies each volume has (`status`, which fails while a process is down), in
    /// volume order.
    fn copies(&self) -> Vec<(String, usize)> {
        let out = common::run(&mut self.script(&["status"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (volume, rest) = l.split_once(": ")?;
                let copies = rest.strip_suffix(" copies").or_else(|| rest.split(" copies:").next())?;
                Some((volume.strip_prefix("volume ")?.to_string(), copies.parse().ok()?))
            })
            .collect()
    }

    /// How many of the filer's uploads to volume server `n` failed on a dead connection (the
    /// filer then uploads the chunk to another volume): SeaweedFS 4.48 logs each one.
    fn failed_uploads_to_volume(&self, n: u16) -> usize {
        let server = format!("127.0.0.1:{}", self.port + 2 + n);
        let log = std::fs::read_to_string(self.dir.path().join("filer.log")).unwrap_or_default();
        let dead = ["connection refused", "broken pipe", "connection reset"];
        log.lines().filter(|l| l.contains(&server) && dead.iter().any(|d| l.contains(d))).count()
    }

    /// The end of every process's log, for a failure's message.
    fn logs(&self) -> String {
        let mut logs = String::new();
        for entry in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                logs += &format!("--- {}\n", path.display());
                logs.extend(tail.into_iter().rev().map(|l| format!("{l}\n")));
            }
        }
        logs
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGKILL by the PIDs the script recorded: the data goes with the temp dir anyway.
        for entry in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid") {
                if let Some(pid) = std::fs::read_to_string(&path).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                    // SAFETY: killing a process this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// A script of this repository.
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

/// A base port whose cluster ports (base..base+5, each gRPC port 10000 above) are free now.
/// Bases are 12000-21999, so that every port stays below Linux's ephemeral range (from 32768),
/// where other tests' servers and clients get their ports.
fn free_port_range() -> u16 {
    let seed =
        std::process::id() as u64 * 7919 + SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    for attempt in 0..200u64 {
        let base = 12000 + ((seed + attempt * 104_729) % 10_000) as u16;
        let ports = (0..6).flat_map(|i| [base + i, base + i + 10_000]);
        let listeners: Vec<_> = ports.map(|p| std::net::TcpListener::bind(("127.0.0.1", p))).collect();
        if listeners.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("no free range of ports for the cluster");
}

/// What fio does in a phase of the test.
enum Phase {
    /// `base` writes 32 MiB sequentially, and FLUSHes.
    Prefill,
    /// `live` writes 64 MiB at random with a FLUSH every 16 writes (and at the end), then reads
    /// it back and checks it; meanwhile `base` is read and checked twice over. Both go at a
    /// steady 64 blocks/s (4 MiB/s), so that the node dies in the middle of both.
    Live,
    /// Both are read back and checked.
    Verify,
}

/// fio's jobs on `uri` for `phase`, each block with a verify header (crc32c of the block, its
/// offset, fio's seed).
fn fio_jobs(uri: &str, phase: Phase) -> String {
    let global = format!("[global]\nioengine=nbd\nuri={uri}\nbs={BLOCK}\nverify=crc32c\nverify_fatal=1\n");
    let base = "[base]\nrw=write\noffset=0\nsize=32M\n";
    let live = "[live]\nrw=randwrite\noffset=32M\nsize=64M\niodepth=4\n";
    match phase {
        Phase::Prefill => format!("{global}{base}do_verify=0\nend_fsync=1\n"),
        Phase::Live => {
            format!("{global}{base}verify_only=1\nloops=2\nrate_iops=64\n{live}fsync=16\nend_fsync=1\nrate_iops=,64\n")
        }
        Phase::Verify => format!("{global}{base}verify_only=1\n{live}verify_only=1\n"),
    }
}

/// Runs fio on `jobs` in `dir` (where it keeps its verify state), asserting every job passed.
/// Returns the longest FLUSH and the longest read or write of any job, in seconds.
fn fio(dir: &Path, name: &str, jobs: &str) -> (f64, f64) {
    let file = dir.join(format!("{name}.fio"));
    std::fs::write(&file, jobs).unwrap();
    let report = dir.join(format!("{name}.json"));
    common::run_ok(
        Command::new("fio").arg(&file).arg("--output-format=json").arg("--output").arg(&report).current_dir(dir),
    );
    let worst = common::run_ok(Command::new("/usr/bin/python3").arg("-c").arg(FIO_WORST).arg(&report));
    let text = String::from_utf8_lossy(&worst.stdout);
    let figures: Vec<f64> = text.split_whitespace().map(|n| n.parse().expect("fio figure")).collect();
    (figures[0], figures[1])
}

/// Prints the longest FLUSH and the longest read or write (completion latency) in fio's JSON
/// report, in seconds. A `verify_only` job issues only reads, yet fio 3.33 reports writes for it
/// too, whose latency is the machine's uptime (a start time of zero): they are left out.
const FIO_WORST: &str = r#"
import json, sys
jobs = json.load(open(sys.argv[1]))["jobs"]
def done(j):
    return ("read",) if j["job options"].get("verify_only") == "1" else ("read", "write")
flush = max(j["sync"]["lat_ns"]["max"] for j in jobs)
io = max(j[d]["clat_ns"]["max"] for j in jobs for d in done(j))
print(flush / 1e9, io / 1e9)
"#;

/// One probe round: when it started (Unix seconds), and how long its read and its write plus
/// FLUSH took.
struct Round {
    started: f64,
    read: f64,
    write_flush: f64,
}

/// Reads one block from fio's `base` region (from S3, mostly: the cache is small), then writes
/// a block of the probe's and FLUSHes, in a loop until `stop` exists (or two minutes passed, so
/// that a test failing elsewhere does not wait for it); prints each round. Round `i` fills its
/// slot with `i` as 8 little-endian bytes, over and over.
const PROBE: &str = r#"
import nbd, os, random, sys, time
uri, stop, offset, slots, block = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
h = nbd.NBD()
h.connect_uri(uri)
i, end = 0, time.time() + 120
while not os.path.exists(stop) and time.time() < end:
    started = time.time()
    h.pread(block, random.randrange(32 * 2**20 // block) * block)
    read = time.time()
    h.pwrite(i.to_bytes(8, "little") * (block // 8), offset + (i % slots) * block)
    h.flush()
    print(f"{started:.3f} {read - started:.3f} {time.time() - read:.3f}", flush=True)
    i += 1
    time.sleep(0.05)
print(f"rounds {i}")
"#;

/// Runs the probe on `uri` until `stop` exists; its rounds and how many there were.
fn probe(uri: &str, stop: &Path) -> (Vec<Round>, u64) {
    let out = common::run(Command::new("/usr/bin/python3").args([
        "-c",
        PROBE,
        uri,
        &stop.display().to_string(),
        &PROBE_OFFSET.to_string(),
        &PROBE_SLOTS.to_string(),
        &BLOCK.to_string(),
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the probe's I/O failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut rounds = Vec::new();
    let mut count = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("rounds ") {
            count = n.parse().ok();
        } else if let [started, read, write_flush] = line.split(' ').collect::<Vec<_>>()[..] {
            let number = |s: &str| s.parse::<f64>().expect("probe figure");
            rounds.push(Round { started: number(started), read: number(read), write_flush: number(write_flush) });
        }
    }
    (rounds, count.expect("the probe's count of rounds"))
}

/// Checks that each probe slot holds the last round written to it: every one was FLUSHed.
fn check_probe_slots(nbdkit: &Nbdkit, rounds: u64) {
    let script = format!(
        "print(' '.join(str(int.from_bytes(h.pread({BLOCK}, {PROBE_OFFSET} + s * {BLOCK})[:8], 'little')) \
         for s in range({PROBE_SLOTS})))"
    );
    let found: Vec<u64> = nbdkit.nbdsh(&script).split_whitespace().map(|n| n.parse().unwrap()).collect();
    let expected: Vec<u64> =
        (0..PROBE_SLOTS).map(|s| (s..rounds).step_by(PROBE_SLOTS as usize).last().unwrap_or(0)).collect();
    assert_eq!(found, expected, "the probe's slots hold the last round FLUSHed to each");
}

/// The export's counters from the stats file, once it has been rewritten after `since`.
fn stats_after(path: &Path, since: SystemTime) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = std::fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t > since);
        if fresh {
            return std::fs::read_to_string(path).unwrap();
        }
        assert!(Instant::now() < deadline, "{} was not rewritten", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of counter `key` in a stats line.
fn counter(stats: &str, key: &str) -> u64 {
    let prefix = format!("{key}=");
    stats
        .split_whitespace()
        .find_map(|f| f.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {stats}"))
}

/// fio writes with verify headers and FLUSHes, reads and checks older data, while a probe times
/// a read and a write+FLUSH every 50 ms; volume server 1 is killed with SIGKILL 6 s in. Every
/// I/O must succeed, none may stall past `s3-timeout`, and after a cold restart of nbdkit (so
/// reads come from S3, not its cache) everything verifies; again once the server is back.
#[test]
fn a_volume_server_killed_under_load_loses_nothing() {
    require!("nbdkit", "fio", "curl");
    let Some(cluster) = Cluster::start() else { return };
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("secret");
    std::fs::write(&secret, &cluster.env.secret_key).unwrap();
    let stats = work.path().join("stats");
    let params = || -> Vec<String> {
        let mut p = cluster.env.params("nbds3-cluster");
        p.extend([
            format!("access-key={}", cluster.env.access_key),
            format!("secret-key=+{}", secret.display()),
            "export=cluster".into(),
            "size=128M".into(),
            format!("block-size={BLOCK}"),
            // Small, so that reads and write-back reach the cluster while the node is dead.
            "cache-size=1M".into(),
            "max-dirty=2M".into(),
            format!("s3-timeout={}", S3_TIMEOUT.as_secs()),
            format!("stats-file={}", stats.display()),
            "stats-interval=1".into(),
        ]);
        p
    };

    let nbdkit = Nbdkit::start(&params());
    fio(work.path(), "prefill", &fio_jobs(&nbdkit.uri(), Phase::Prefill));
    let copies = cluster.copies();
    assert!(
        !copies.is_empty() && copies.iter().all(|(_, n)| *n == 2),
        "every volume has two copies before the kill: {copies:?}"
    );

    // fio and the probe run while volume server 1 dies.
    let live_started = Instant::now();
    let (uri, stop) = (nbdkit.uri(), work.path().join("stop"));
    let jobs = fio_jobs(&uri, Phase::Live);
    let (killed_at, probed, (fio_flush, fio_io)) = std::thread::scope(|s| {
        let fio = s.spawn(|| fio(work.path(), "live", &jobs));
        let probe = s.spawn(|| probe(&uri, &stop));
        std::thread::sleep(Duration::from_secs(6));
        cluster.run(&["kill-volume", "1"]);
        let killed_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        let fio = fio.join();
        std::fs::write(&stop, "").unwrap();
        let probed = probe.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let fio_worst = fio.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (killed_at, probed, fio_worst)
    });
    let live = live_started.elapsed();
    let counters = stats_after(&stats, SystemTime::now());
    let (rounds, count) = probed;
    let worst = |after_kill: bool, f: fn(&Round) -> f64| {
        rounds
            .iter()
            .filter(|r| (r.started + r.read + r.write_flush > killed_at) == after_kill)
            .map(f)
            .fold(0.0, f64::max)
    };
    let (read_before, write_before) = (worst(false, |r| r.read), worst(false, |r| r.write_flush));
    let (read_after, write_after) = (worst(true, |r| r.read), worst(true, |r| r.write_flush));
    common::note(&format!(
        "volume server 1 killed {:.1} s into {:.1} s of fio and {} probe rounds; longest probe read \
         {:.3} s before the kill, {read_after:.3} s after; longest write+FLUSH {:.3} s before, {write_after:.3} s \
         after; fio's longest FLUSH {fio_flush:.3} s, longest read or write {fio_io:.3} s; S3 requests retried: \
         {}, failed: {}",
        killed_at - rounds.first().map_or(killed_at, |r| r.started),
        live.as_secs_f64(),
        count,
        read_before,
        write_before,
        counter(&counters, "retries"),
        counter(&counters, "errors"),
    ));
    common::note(&format!("stats after the kill: {}", counters.trim()));
    let copies = cluster.copies();
    let single = copies.iter().filter(|(_, n)| *n == 1).count();
    assert!(single > 0, "the master saw volume server 1 die: {copies:?}");
    common::note(&format!(
        "{single} volumes down to one copy; {} uploads of the filer's to the dead server failed (redone \
         elsewhere)",
        cluster.failed_uploads_to_volume(1)
    ));
    assert!(rounds.iter().any(|r| r.started > killed_at), "the probe went on after the kill ({count} rounds)");
    let stall = read_after.max(write_after).max(fio_flush).max(fio_io);
    assert!(stall < S3_TIMEOUT.as_secs_f64(), "I/O stalled {stall:.1} s, past s3-timeout");

    // Cold: only what reached the cluster counts. fio FLUSHed at its end, the probe each round.
    nbdkit.crash();
    let nbdkit = Nbdkit::start(&params());
    fio(work.path(), "verify-without-node", &fio_jobs(&nbdkit.uri(), Phase::Verify));
    check_probe_slots(&nbdkit, count);
    nbdkit.stop();

    cluster.run(&["start-volume", "1"]);
    common::note(&format!("volume server 1 back; copies per volume: {:?}", cluster.copies()));
    let nbdkit = Nbdkit::start(&params());
    fio(work.path(), "verify-with-node-back", &fio_jobs(&nbdkit.uri(), Phase::Verify));
    check_probe_slots(&nbdkit, count);
    nbdkit.stop();
    common::note(&format!(
        "whole test {:.1} s (live phase {:.1} s)",
        started.elapsed().as_secs_f64(),
        live.as_secs_f64()
    ));
}
