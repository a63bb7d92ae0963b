//! `kill -9` of a real nbdkit serving a `cas` export on S3, while a client writes (some writes
//! with FUA) and FLUSHes: after a restart the export reads exactly as after the last FLUSH or
//! FUA write the client saw acknowledged, or as after the one under way: never a mix (the crash
//! model of `cas_crash`, with the whole process: the cache's write-back, its threads, the
//! plugin).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Nbdkit;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const DEVICE: usize = 1 << 20;

/// The client: reads the device as its model, then writes random unaligned ranges forever, one
/// in thirty with FUA, and FLUSHes after every few dozen. A FLUSH, or a FUA write (which on a cas
/// export commits as a FLUSH does), is durable point `k`: the model as it will be once that is
/// acknowledged is saved as `{k}.img`, and `flushing k` logged, before it is sent, `flushed k`
/// once it is acknowledged. It ends when nbdkit is killed under it.
const CLIENT: &str = r#"
import nbd, random, sys
uri, states, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
model = bytearray(h.pread(size, 0))
rng = random.Random(seed)
log = open(states + "/log", "a", buffering=1)
k = 0
def durably(send):
    global k
    k += 1
    with open("%s/%d.img" % (states, k), "wb") as f:
        f.write(model)
    log.write("flushing %d\n" % k)
    send()
    log.write("flushed %d\n" % k)
while True:
    for _ in range(rng.randrange(1, 40)):
        n = rng.randrange(1, 3 * 4096)
        off = rng.randrange(0, size - n)
        data = rng.randbytes(n)
        model[off:off + n] = data
        if rng.randrange(30) == 0:
            durably(lambda: h.pwrite(data, off, nbd.CMD_FLAG_FUA))
        else:
            h.pwrite(data, off)
    durably(h.flush)
"#;

/// When a life's nbdkit is killed.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// This long after the client started.
    After(Duration),
    /// This long after the client sent FLUSH `k`.
    DuringFlush(u32, Duration),
    /// This long after FLUSH `k` was acknowledged, while the client writes and the cache writes
    /// back.
    AfterFlush(u32, Duration),
}

/// What one life's client logged: the last FLUSH acknowledged, and one sent but unanswered.
fn flushes(log: &str) -> (u32, Option<u32>) {
    let number = |prefix: &str| log.lines().filter_map(|l| l.strip_prefix(prefix)?.parse::<u32>().ok()).max();
    let acked = number("flushed ").unwrap_or(0);
    (acked, number("flushing ").filter(|&k| k > acked))
}

/// Runs the client on `nbdkit` until it is killed at `kill`; returns whether the kill came while
/// a FLUSH was under way.
fn life(nbdkit: Nbdkit, states: &Path, seed: u64, kill: Kill) -> bool {
    let mut client: Child = Command::new("/usr/bin/python3")
        .args(["-c", CLIENT, &nbdkit.uri(), &states.display().to_string(), &seed.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the client");
    let log = states.join("log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (line, delay) = match kill {
        Kill::After(delay) => (None, delay),
        Kill::DuringFlush(k, delay) => (Some(format!("flushing {k}\n")), delay),
        Kill::AfterFlush(k, delay) => (Some(format!("flushed {k}\n")), delay),
    };
    while let Some(line) = &line {
        if std::fs::read_to_string(&log).unwrap_or_default().contains(line) {
            break;
        }
        assert!(Instant::now() < deadline, "no {line:?} within 30 s");
        if let Some(status) = client.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut client.stderr.take().unwrap(), &mut stderr).unwrap();
            panic!("the client ended ({status}) before {line:?}: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(delay);
    let (_, before) = flushes(&std::fs::read_to_string(&log).unwrap_or_default());
    nbdkit.crash();
    // The client fails once its connection is gone; stopped by PID should it not.
    let waited = Instant::now();
    while client.try_wait().unwrap().is_none() {
        if waited.elapsed() > Duration::from_secs(10) {
            let _ = client.kill();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, after) = flushes(&std::fs::read_to_string(&log).unwrap_or_default());
    before.is_some() && after.is_some()
}

/// The device's bytes through `nbdkit`.
fn image(nbdkit: &Nbdkit, dir: &Path) -> Vec<u8> {
    let file = dir.join("read.img");
    nbdkit.nbdsh(&format!("open('{}', 'wb').write(h.pread(h.get_size(), 0))", file.display()));
    std::fs::read(file).expect("the image read back")
}

/// The 4 KiB blocks where `a` and `b` differ.
fn differing_blocks(a: &[u8], b: &[u8]) -> Vec<usize> {
    (0..a.len() / BLOCK).filter(|i| a[i * BLOCK..(i + 1) * BLOCK] != b[i * BLOCK..(i + 1) * BLOCK]).collect()
}

/// Six lives of a client on one cas export, each ended by `kill -9` of nbdkit at a random
/// moment: two at a random time, two just after a FLUSH is sent, two while the client writes
/// after one; after each, a restarted nbdkit must serve the state of the last acknowledged FLUSH
/// or of the one under way, and the next life goes on from there.
#[test]
fn kill_9_leaves_a_cas_export_at_a_flush() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3_with_conditional_writes() else { return };
    let bucket = env.own_bucket("cas-kill9");
    let mut params = env.params(&bucket.name);
    params.extend([
        "export=dev".to_string(),
        format!("size={DEVICE}"),
        "layout=cas".into(),
        // Write-back runs between FLUSHes, so a kill finds chunks and pages uploaded that no
        // commit names yet.
        "max-dirty=64K".into(),
        // A tiny delta, so commits carry a delta and folds store pages between FLUSHes too.
        "cas-delta-entries=8".into(),
    ]);
    let work = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(u64::from(std::process::id()));
    let mut expected = vec![0u8; DEVICE];
    let mut nbdkit = Nbdkit::start(&params);
    let (mut during_flush, mut at_later) = (0, 0);
    for round in 0..6u64 {
        let states: PathBuf = work.path().join(format!("life{round}"));
        std::fs::create_dir(&states).unwrap();
        let delay = Duration::from_millis(rng.random_range(0..50));
        let kill = match round % 3 {
            0 => Kill::After(Duration::from_millis(rng.random_range(300..2500))),
            1 => Kill::DuringFlush(rng.random_range(1..4), delay),
            _ => Kill::AfterFlush(rng.random_range(1..4), delay),
        };
        let killed_in_flush = life(nbdkit, &states, rng.random(), kill);
        during_flush += u32::from(killed_in_flush);
        let (acked, under_way) = flushes(&std::fs::read_to_string(states.join("log")).unwrap_or_default());
        let state =
            |k: u32| if k == 0 { expected.clone() } else { std::fs::read(states.join(format!("{k}.img"))).unwrap() };
        nbdkit = Nbdkit::start(&params);
        let found = image(&nbdkit, &states);
        let last = state(acked);
        if found == last {
            expected = last;
            continue;
        }
        match under_way.map(state) {
            Some(later) if found == later => {
                at_later += 1;
                expected = later;
            }
            later => panic!(
                "life {round} ({kill:?}): after the kill the export is neither FLUSH {acked}, the last acknowledged (blocks {:?} differ), nor FLUSH {under_way:?}, the one under way (blocks {:?} differ)",
                differing_blocks(&found, &last),
                later.map(|l| differing_blocks(&found, &l))
            ),
        }
    }
    common::note(&format!(
        "{during_flush} of 6 kills came while a FLUSH was under way; {at_later} exports held that FLUSH's state after the restart"
    ));
    nbdkit.stop();
}
