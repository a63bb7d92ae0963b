//! A real kernel ext4 filesystem on an nbds3 device, across a clean nbdkit restart (S3), a
//! `kill -9` in the middle of a stream of writes (S3 and a directory), and an `nbds3ctl resize`
//! while it is served, followed by `resize2fs` (S3).
//!
//! The kernel reaches the NBD export through `nbd-client` and `/dev/nbdN` when the `nbd` module is
//! loaded, and otherwise through qemu-storage-daemon's FUSE export (the export shows up as a
//! regular file) and a loop device on that file. Needs root, `/dev/fuse` and `/dev/loop-control`
//! (or `/dev/nbd0`).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::block_device::{checksums, ready, Device};
use common::{run, run_ok, Nbdkit, TEST_BUCKET};

/// Number of small files written, in nested directories.
const SMALL_FILES: usize = 2000;

/// The parameters of `export` (`size` when new) on the backend `store` names (`bucket=...` or
/// `storage=file dir=...`), with `extra` ones.
fn params(store: &[String], export: &str, size: &str, extra: &[&str]) -> Vec<String> {
    let mut p = store.to_vec();
    p.push(format!("export={export}"));
    p.push(format!("size={size}"));
    // Far less cache and dirty data than the files written, so evictions and early write-back
    // happen while the filesystem is busy, not only at sync.
    p.push("cache-size=32M".into());
    p.push("max-dirty=8M".into());
    p.extend(extra.iter().map(|s| s.to_string()));
    p
}

/// Size of small file `i`, 0 B to 256 KiB: block-boundary sizes every 50th, otherwise one in
/// fifty log-uniform from 32 to 256 KiB and the rest log-uniform up to 16 KiB.
fn small_file_size(i: usize) -> usize {
    const EDGES: [usize; 10] = [0, 1, 511, 512, 4095, 4096, 4097, 65536, 65537, 262144];
    if i % 50 == 0 {
        return EDGES[(i / 50) % EDGES.len()];
    }
    let r = u64::from_le_bytes(common::random_bytes(8, 1_000_000 + i as u64).try_into().unwrap());
    let u = (r >> 11) as f64 / (1u64 << 53) as f64;
    let exponent = if r % 50 == 0 { 15.0 + 3.0 * u } else { 14.0 * u };
    2f64.powf(exponent) as usize - usize::from(exponent < 14.0)
}

/// Path (relative to the filesystem's root) of small file `i`: 10 × 8 nested directories.
fn small_file(i: usize) -> String {
    format!("d{}/e{}/f{i:04}", i % 10, (i / 10) % 8)
}

/// Writes the deterministic tree: `SMALL_FILES` small files in nested directories and a few
/// files of several MiB (one with a run of zero blocks, one sparse). Returns the number of files
/// and of bytes written.
fn write_tree(root: &Path) -> (usize, u64) {
    let mut bytes = 0u64;
    for i in 0..SMALL_FILES {
        let path = root.join(small_file(i));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let data = common::random_bytes(small_file_size(i), i as u64);
        std::fs::write(path, &data).unwrap();
        bytes += data.len() as u64;
    }
    let big = root.join("big");
    std::fs::create_dir_all(&big).unwrap();
    let three = common::random_bytes((3 << 20) + 333, 76);
    std::fs::write(big.join("three"), &three).unwrap();
    bytes += three.len() as u64;
    // 1.5 MiB of data, 1 MiB of zeros (blocks nbds3 never stores), 1.5 MiB of data.
    let mut zeros = common::random_bytes(4 << 20, 77);
    zeros[3 << 19..5 << 19].fill(0);
    std::fs::write(big.join("zeros"), &zeros).unwrap();
    bytes += zeros.len() as u64;
    // Sparse: 64 KiB at the start and at the end of 16 MiB.
    use std::os::unix::fs::FileExt;
    let sparse = std::fs::File::create(big.join("sparse")).unwrap();
    sparse.set_len(16 << 20).unwrap();
    sparse.write_all_at(&common::random_bytes(65536, 78), 0).unwrap();
    sparse.write_all_at(&common::random_bytes(65536, 79), (16 << 20) - 65536).unwrap();
    bytes += 2 * 65536;
    (SMALL_FILES + 3, bytes)
}

/// `fsck.ext4 -fn`: exit 0, or fail with its report and the tail of nbdkit's log.
fn fsck_clean(device: &Device, nbdkit: &Nbdkit, when: &str) {
    let out = run(Command::new("fsck.ext4").arg("-fn").arg(device.dev()));
    assert!(
        out.status.success(),
        "fsck.ext4 -fn {} {when} exited with {}:\n{}{}\nnbdkit log (tail):\n{}",
        device.dev(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&nbdkit.stderr(), 40)
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn step(started: Instant, what: &str) {
    eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());
}

/// The scenario, end to end against the real S3 server:
///
/// 1. nbdkit serves a new 1 GiB export of bucket `nbds3-test` (default 4 KiB blocks, 32 MiB
///    cache, 8 MiB dirty limit: less than the data written); the kernel sees it as a block device
///    (`nbd-client` + `/dev/nbdN`, or qemu-storage-daemon's FUSE export + `losetup`).
/// 2. `mkfs.ext4 -E discard` (the discard trims the whole device), mount, write 2000 files of
///    0 B to 256 KiB (block-boundary sizes included) in nested directories plus files of several
///    MiB (one with a MiB of zeros, one sparse), all of deterministic content; delete every 7th
///    small file, `sync -f` and `fstrim`, so freed blocks are trimmed while live ones must
///    survive.
/// 3. Record `sha256sum` of every file, `sync`, unmount, `fsck.ext4 -fn` (clean), detach, stop
///    qemu-storage-daemon, stop nbdkit (SIGTERM, a clean stop). The export's objects are in S3.
/// 4. A new nbdkit on the same bucket and export, a new block device: `fsck.ext4 -fn` is clean,
///    and after mounting, every file is there with the same checksum and nothing else is.
///
/// Every process is stopped by PID, and the `Device` guard unmounts, detaches and stops the
/// daemon even when an assertion fails.
#[test]
fn ext4_survives_an_nbdkit_restart_on_s3() {
    if !ready() {
        return;
    }
    let Some(env) = common::s3() else { return };
    let started = Instant::now();
    let export = common::unique("ext4");
    let tmp = tempfile::tempdir().unwrap();
    let params = params(&env.params(TEST_BUCKET), &export, "1G", &[]);

    // Phase 1: make the filesystem and fill it.
    let nbdkit = Nbdkit::start(&params);
    let mut device = Device::attach(&nbdkit, &tmp.path().join("first"));
    step(started, &format!("nbdkit serves export {export}; block device {}", device.dev()));
    assert_eq!(device.size(), 1 << 30);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "discard", "-L", "nbds3"]).arg(device.dev()));
    step(started, "mkfs.ext4 -E discard done");
    let mnt = device.mount();
    let (written, bytes) = write_tree(&mnt);
    step(started, &format!("wrote {written} files, {:.1} MiB", bytes as f64 / (1 << 20) as f64));
    let deleted: Vec<usize> = (0..SMALL_FILES).step_by(7).collect();
    for &i in &deleted {
        std::fs::remove_file(mnt.join(small_file(i))).unwrap();
    }
    run_ok(Command::new("sync").arg("-f").arg(&mnt));
    step(started, &format!("deleted {} files; sync -f done", deleted.len()));
    let trimmed = run_ok(Command::new("fstrim").arg("-v").arg(&mnt));
    step(started, &format!("fstrim: {}", String::from_utf8_lossy(&trimmed.stdout).trim()));
    let before = checksums(&mnt);
    let files = before.lines().count();
    assert_eq!(files, written - deleted.len(), "files in the filesystem:\n{before}");
    run_ok(&mut Command::new("sync"));
    device.umount();
    step(started, &format!("checksummed {files} files, synced, unmounted"));
    fsck_clean(&device, &nbdkit, "before the restart");
    device.detach();
    let log = nbdkit.stderr();
    nbdkit.stop();
    let objects = env.list(TEST_BUCKET, &format!("blocks/{export}/")).len();
    step(started, &format!("fsck clean; detached; nbdkit stopped; {objects} objects in S3"));
    assert!(
        objects > (bytes as usize) / 4096 / 2,
        "only {objects} objects in S3 for {bytes} bytes of files\n{}",
        tail(&log, 40)
    );

    // Phase 2: a new nbdkit and a new block device on the same bucket and export.
    let nbdkit = Nbdkit::start(&params);
    let mut device = Device::attach(&nbdkit, &tmp.path().join("second"));
    step(started, &format!("new nbdkit; block device {}", device.dev()));
    assert_eq!(device.size(), 1 << 30);
    fsck_clean(&device, &nbdkit, "after the restart");
    step(started, "fsck.ext4 -fn clean after the restart");
    let mnt = device.mount();
    let after = checksums(&mnt);
    if after != before {
        let old: std::collections::BTreeSet<&str> = before.lines().collect();
        let new: std::collections::BTreeSet<&str> = after.lines().collect();
        let lost: Vec<&&str> = old.difference(&new).take(20).collect();
        let changed: Vec<&&str> = new.difference(&old).take(20).collect();
        panic!(
            "{} of {} files differ after the restart\nbefore: {lost:#?}\nafter: {changed:#?}\nnbdkit log (tail):\n{}",
            old.difference(&new).count(),
            old.len(),
            tail(&nbdkit.stderr(), 40)
        );
    }
    step(started, &format!("all {files} checksums match"));
    device.umount();
    device.detach();
    nbdkit.stop();
    step(started, "unmounted, detached, nbdkit stopped");
}

/// Crash rounds per crash test: write, `kill -9`, restart, check; each starts where the last
/// one's journal replay left the filesystem.
const CRASH_ROUNDS: usize = 3;

/// Threads writing files at once in each crash round, each its own stream of files.
const WRITERS: usize = 2;

/// fsyncs that must have returned in a crash round before nbdkit is killed.
const FSYNCS_BEFORE_KILL: usize = 30;

/// Bytes of files after which a crash round kills nbdkit even if its time is not up, so a fast
/// machine cannot fill the 256 MiB filesystem in `CRASH_ROUNDS` rounds.
const BYTES_BEFORE_KILL: u64 = 32 << 20;

/// A file of the crash tests' write streams: (stream, index in the stream).
type StreamFile = (usize, usize);

/// Path (relative to the filesystem's root) of file `k` of write stream `stream`.
fn stream_file((stream, k): StreamFile) -> String {
    format!("w{stream}/f{k:05}")
}

/// Content of a stream's file: a small file's size, plus 1 MiB for every 16th file.
fn stream_data((stream, k): StreamFile) -> Vec<u8> {
    let extra = if k % 16 == 0 { 1 << 20 } else { 0 };
    common::random_bytes(small_file_size(k) + extra, 2_000_000 + 100_000 * stream as u64 + k as u64)
}

/// Whether the write stream fsyncs file `k` (and its directory).
fn stream_fsyncs(k: usize) -> bool {
    k % 3 == 0
}

/// Writes the files of write stream `stream` into directory `w{stream}` under `root` until
/// `stop` is set or something fails, and returns how many it wrote and why it stopped. Every 3rd
/// file is fsync'd together with its directory, and only then pushed onto `synced`; every 10th
/// file that is not fsync'd is deleted again 9 files later, so the journal carries frees as well
/// as allocations. Adds the size of every file written to `bytes`.
fn write_stream(
    root: &Path,
    stream: usize,
    stop: &AtomicBool,
    synced: &Mutex<Vec<StreamFile>>,
    bytes: &AtomicU64,
) -> (usize, String) {
    use std::io::Write;
    let dir = root.join(format!("w{stream}"));
    let made = std::fs::create_dir(&dir)
        .and_then(|()| std::fs::File::open(&dir)?.sync_all())
        .and_then(|()| std::fs::File::open(root)?.sync_all());
    if let Err(e) = made {
        return (0, format!("mkdir {}: {e}", dir.display()));
    }
    for k in 0.. {
        if stop.load(Ordering::SeqCst) {
            return (k, "stopped".into());
        }
        let path = root.join(stream_file((stream, k)));
        let data = stream_data((stream, k));
        let written = std::fs::File::create(&path).and_then(|mut f| {
            f.write_all(&data)?;
            if stream_fsyncs(k) {
                f.sync_all()?;
                std::fs::File::open(&dir)?.sync_all()?;
            }
            Ok(())
        });
        if let Err(e) = written {
            return (k, format!("file {k}: {e}"));
        }
        bytes.fetch_add(data.len() as u64, Ordering::SeqCst);
        if stream_fsyncs(k) {
            synced.lock().unwrap().push((stream, k));
        }
        if k % 10 == 9 && !stream_fsyncs(k - 9) {
            if let Err(e) = std::fs::remove_file(root.join(stream_file((stream, k - 9)))) {
                return (k + 1, format!("unlink {}: {e}", k - 9));
            }
        }
    }
    unreachable!()
}

/// Runs `WRITERS` write streams (numbered from `first_stream`) on the filesystem at `mnt` until
/// at least `FSYNCS_BEFORE_KILL` fsyncs have returned and `at_least` has passed (or
/// `BYTES_BEFORE_KILL` were written), then kills
/// `nbdkit` with SIGKILL while they are still writing, and waits (bounded) for them to stop at
/// their first error. Returns the files whose fsync had returned before the kill, and the bytes
/// of files written by then.
fn kill_9_while_writing(nbdkit: Nbdkit, mnt: &Path, first_stream: usize, at_least: Duration) -> (Vec<StreamFile>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let synced = Arc::new(Mutex::new(Vec::new()));
    let bytes = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let writers: Vec<_> = (first_stream..first_stream + WRITERS)
        .map(|stream| {
            let (stop, synced, bytes, done_tx) = (stop.clone(), synced.clone(), bytes.clone(), done_tx.clone());
            let mnt = mnt.to_path_buf();
            std::thread::spawn(move || {
                let _ = done_tx.send((stream, write_stream(&mnt, stream, &stop, &synced, &bytes)));
            })
        })
        .collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    let time_up = || started.elapsed() >= at_least || bytes.load(Ordering::SeqCst) >= BYTES_BEFORE_KILL;
    while synced.lock().unwrap().len() < FSYNCS_BEFORE_KILL || !time_up() {
        if let Ok((stream, (files, why))) = done_rx.try_recv() {
            stop.store(true, Ordering::SeqCst);
            panic!(
                "stream {stream} stopped before the kill, after {files} files: {why}\n{}",
                tail(&nbdkit.stderr(), 40)
            );
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {FSYNCS_BEFORE_KILL} fsyncs returned in 90 s\n{}",
            tail(&nbdkit.stderr(), 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let durable = synced.lock().unwrap().clone();
    let written = bytes.load(Ordering::SeqCst);
    nbdkit.crash();
    stop.store(true, Ordering::SeqCst);
    for _ in &writers {
        let (stream, (files, why)) =
            done_rx.recv_timeout(Duration::from_secs(60)).expect("every writer stops within 60 s of the kill");
        eprintln!("           stream {stream} stopped after {files} files: {why}");
    }
    writers.into_iter().for_each(|w| w.join().unwrap());
    (durable, written)
}

/// Asserts that every file of `durable` under `mnt` has exactly its content.
fn check_durable(mnt: &Path, durable: &[StreamFile], nbdkit: &Nbdkit) {
    let mut wrong = Vec::new();
    for &file in durable {
        let expected = stream_data(file);
        match std::fs::read(mnt.join(stream_file(file))) {
            Ok(data) if data == expected => {}
            Ok(data) => wrong.push(format!("{}: {} bytes, expected {}", stream_file(file), data.len(), expected.len())),
            Err(e) => wrong.push(format!("{}: {e}", stream_file(file))),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} fsync'd files are wrong after kill -9 (wrong content where the sizes match): {:#?}\n\
         nbdkit log (tail):\n{}",
        wrong.len(),
        durable.len(),
        &wrong[..wrong.len().min(20)],
        tail(&nbdkit.stderr(), 40)
    );
}

/// `kill -9` during streams of writes, on the backend `store` names:
///
/// 1. nbdkit serves a new 256 MiB export (4 KiB blocks, 8 MiB dirty limit, `writeback-delay=1`
///    so the background writer is busy too); the kernel sees it as a block device;
///    `mkfs.ext4 -b 4096`.
/// 2. `CRASH_ROUNDS` times: mount; two threads write files (0 B to 1.3 MiB; every 3rd one
///    fsync'd with its directory, some others deleted again) as fast as they can; once at least
///    30 fsyncs have returned and a few seconds (more each round) have passed or 32 MiB were
///    written, nbdkit gets SIGKILL while they are still writing. The dead device is torn down without hanging: the
///    writers stop at their first error, lazy unmount, detach, qemu-storage-daemon stopped,
///    every wait bounded, and nothing is left behind. A new nbdkit on the same export, a new
///    block device: mounting replays the journal; every file whose fsync returned before any of
///    the kills so far has its exact content; after unmounting, `fsck.ext4 -fn` is clean.
fn ext4_survives_kill_9_during_writes(store: &[String]) {
    let started = Instant::now();
    let export = common::unique("ext4-kill9");
    let tmp = tempfile::tempdir().unwrap();
    let params = params(store, &export, "256M", &["writeback-delay=1"]);

    let mut nbdkit = Nbdkit::start(&params);
    let mut device = Device::attach(&nbdkit, &tmp.path().join("dev0"));
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-L", "nbds3"]).arg(device.dev()));
    step(started, &format!("nbdkit serves export {export}; block device {}; mkfs.ext4 done", device.dev()));
    let mut durable = Vec::new();
    for round in 0..CRASH_ROUNDS {
        let mnt = device.mount();
        let at_least = Duration::from_millis(2000 + 1500 * round as u64);
        let (synced, bytes) = kill_9_while_writing(nbdkit, &mnt, round * WRITERS, at_least);
        let mib = bytes as f64 / (1 << 20) as f64;
        step(started, &format!("round {round}: killed nbdkit (SIGKILL) after {mib:.1} MiB, {} fsyncs", synced.len()));
        durable.extend(synced);
        device.abandon();
        step(started, "lazily unmounted, detached, qemu-storage-daemon stopped");

        nbdkit = Nbdkit::start(&params);
        device = Device::attach(&nbdkit, &tmp.path().join(format!("dev{}", round + 1)));
        let mnt = device.mount();
        step(started, &format!("new nbdkit; block device {}; mounted (journal replayed)", device.dev()));
        check_durable(&mnt, &durable, &nbdkit);
        device.umount();
        fsck_clean(&device, &nbdkit, &format!("after kill -9 number {} and journal replay", round + 1));
        step(started, &format!("all {} fsync'd files intact; unmounted; fsck.ext4 -fn clean", durable.len()));
    }
    device.detach();
    nbdkit.stop();
}

/// The crash scenario of [`ext4_survives_kill_9_during_writes`] on the real S3 server.
#[test]
fn ext4_survives_kill_9_during_writes_on_s3() {
    if !ready() {
        return;
    }
    let Some(env) = common::s3() else { return };
    ext4_survives_kill_9_during_writes(&env.params(TEST_BUCKET));
}

/// The crash scenario of [`ext4_survives_kill_9_during_writes`] on the file backend.
#[test]
fn ext4_survives_kill_9_during_writes_on_files() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    ext4_survives_kill_9_during_writes(&["storage=file".into(), format!("dir={}", dir.path().display())]);
}

/// `nbds3ctl resize` under a mounted ext4 filesystem, on the real S3 server:
///
/// 1. nbdkit serves a new 64 MiB export; the kernel sees it as a block device; `mkfs.ext4`,
///    mount, write the tree of files of [`ext4_survives_an_nbdkit_restart_on_s3`], checksum.
/// 2. `nbds3ctl resize --size 192M` while nbdkit serves the export and the filesystem is
///    mounted: the block device keeps its size (an NBD connection keeps the size it opened with).
/// 3. Unmount, detach; a new block device (a new NBD connection to the same nbdkit) is 192 MiB;
///    `e2fsck -f` (clean), `resize2fs`, mount: the filesystem is bigger, every file has its checksum, and a
///    48 MiB file (more than was free before) is written.
/// 4. Unmount, `fsck.ext4 -fn` clean; a new nbdkit (whose `size=64M` only sizes new exports)
///    serves 192 MiB, and every file, the big one included, has its checksum.
#[test]
fn ext4_grows_with_nbds3ctl_resize_while_served_on_s3() {
    if !ready() {
        return;
    }
    let Some(env) = common::s3() else { return };
    let started = Instant::now();
    let export = common::unique("ext4-grow");
    let tmp = tempfile::tempdir().unwrap();
    let store = env.params(TEST_BUCKET);
    let params = params(&store, &export, "64M", &[]);

    let nbdkit = Nbdkit::start(&params);
    let mut device = Device::attach(&nbdkit, &tmp.path().join("small"));
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-L", "nbds3"]).arg(device.dev()));
    let mnt = device.mount();
    let (written, bytes) = write_tree(&mnt);
    let before = checksums(&mnt);
    let (small_fs, small_free) = (filesystem_bytes(&mnt, "size"), filesystem_bytes(&mnt, "avail"));
    step(started, &format!("64 MiB export {export}: ext4 of {small_fs} bytes, {written} files of {bytes} bytes, {small_free} bytes free"));

    let resized =
        run_ok(Command::new(env!("CARGO_BIN_EXE_nbds3ctl")).args(&store).args(["resize", &export, "--size", "192M"]));
    step(started, String::from_utf8_lossy(&resized.stdout).trim());
    assert_eq!(device.size(), 64 << 20, "a connection keeps the size it opened with");
    run_ok(&mut Command::new("sync"));
    device.umount();
    device.detach();

    let mut device = Device::attach(&nbdkit, &tmp.path().join("grown"));
    assert_eq!(device.size(), 192 << 20, "a new connection sees the grown export");
    // Offline: online growth needs CAP_SYS_RESOURCE, which containers often lack; resize2fs wants
    // a check that records its time first, which `fsck -n` does not.
    run_ok(Command::new("e2fsck").args(["-f", "-y"]).arg(device.dev()));
    let grown = run_ok(Command::new("resize2fs").arg(device.dev()));
    let mnt = device.mount();
    let big_fs = filesystem_bytes(&mnt, "size");
    step(started, &format!("reconnected; resize2fs: {}", String::from_utf8_lossy(&grown.stdout).trim()));
    assert!(big_fs > small_fs + (120 << 20), "the filesystem grew from {small_fs} to only {big_fs} bytes");
    assert_eq!(checksums(&mnt), before, "files changed across the resize");
    let fill = common::random_bytes(48 << 20, 80);
    assert!(fill.len() as u64 > small_free, "the file must need the new space");
    std::fs::write(mnt.join("fill"), &fill).unwrap();
    run_ok(Command::new("sync").arg("-f").arg(&mnt));
    let with_fill = checksums(&mnt);
    step(started, "files intact; wrote a 48 MiB file, more than was free before");
    device.umount();
    fsck_clean(&device, &nbdkit, "after resize2fs");
    device.detach();
    nbdkit.stop();

    let nbdkit = Nbdkit::start(&params);
    let mut device = Device::attach(&nbdkit, &tmp.path().join("restarted"));
    assert_eq!(device.size(), 192 << 20, "a new nbdkit serves the grown export");
    let mnt = device.mount();
    assert_eq!(checksums(&mnt), with_fill, "files changed across the restart");
    step(started, "new nbdkit: 192 MiB, every file intact");
    device.umount();
    device.detach();
    nbdkit.stop();
}

/// `df`'s `field` (`size`, `avail`) of the filesystem mounted at `mnt`, in bytes.
fn filesystem_bytes(mnt: &Path, field: &str) -> u64 {
    let out = run_ok(Command::new("df").arg("-B1").arg(format!("--output={field}")).arg(mnt));
    let out = String::from_utf8_lossy(&out.stdout);
    out.lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("df: {out}"))
}
