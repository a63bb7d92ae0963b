//! `cas` exports end to end, as a user drives them: `nbds3ctl` creates, snapshots, clones, diffs
//! and collects garbage, while a real nbdkit serves the exports, their snapshots (`EXPORT@SNAP`,
//! read-only) and clones to real clients (nbdsh, qemu-img), on a directory and on S3.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::block_device::{checksums, Access, Device};
use common::{Nbdkit, S3Env};

const BLOCK: usize = 4096;
const MIB: usize = 1 << 20;

fn ctl(params: &[String], args: &[&str]) -> Output {
    common::run(Command::new(env!("CARGO_BIN_EXE_nbds3ctl")).args(params).args(args))
}

/// Runs `nbds3ctl` and returns its standard output, asserting it succeeded.
fn ctl_ok(params: &[String], args: &[&str]) -> String {
    let out = ctl(params, args);
    assert!(out.status.success(), "nbds3ctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The NBD URI of `export` on `nbdkit`'s socket.
fn uri(nbdkit: &Nbdkit, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", nbdkit.socket.display())
}

/// Reads `len` bytes at `offset` of `export` through nbdkit.
fn read(nbdkit: &Nbdkit, export: &str, offset: usize, len: usize) -> Vec<u8> {
    let hex = common::nbdsh(&uri(nbdkit, export), &format!("print(h.pread({len}, {offset}).hex())"));
    (0..hex.trim().len()).step_by(2).map(|i| u8::from_str_radix(&hex.trim()[i..i + 2], 16).unwrap()).collect()
}

/// Writes `data` at `offset` of `export` through nbdkit, then FLUSHes.
fn write(nbdkit: &Nbdkit, export: &str, offset: usize, data: &[u8]) {
    // Through a file: the data is too large for an argument.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), data).unwrap();
    let script = format!("h.pwrite(open('{}', 'rb').read(), {offset}); h.flush()", file.path().display());
    common::nbdsh(&uri(nbdkit, export), &script);
}

/// The whole story of issue 16 on one store (`store`: the plugin's and nbds3ctl's parameters;
/// `cas_objects`: how many objects the store holds under `cas/`): write, snapshot, write more,
/// clone; the snapshot, the clone and the export each read what they should through nbdkit, the
/// snapshot refuses writes, the clone's writes stay its own; diff names exactly the changed
/// ranges; an export-diff applied to a fresh clone makes it equal to the export (qemu-img
/// compare); a deleted snapshot's blocks are freed by gc and nothing live is lost.
fn snapshots_clones_and_diffs(store: Vec<String>, cas_objects: impl Fn() -> usize) {
    let dev = common::unique("cas");
    ctl_ok(&store, &["create", &dev, "--size", "4M", "--layout", "cas"]);
    assert!(ctl_ok(&store, &["info", &dev]).contains("layout:      cas\nsnapshots:   0\n"));
    let mut params = store.clone();
    params.push(format!("export={dev}"));
    let nbdkit = Nbdkit::start(&params);

    let first = common::random_bytes(64 * 1024, 1);
    write(&nbdkit, &dev, 0, &first);
    ctl_ok(&store, &["snapshot", &dev, "s1"]);
    let later = common::random_bytes(2 * BLOCK, 2);
    write(&nbdkit, &dev, MIB, &later);
    common::nbdsh(&uri(&nbdkit, &dev), &format!("h.zero({BLOCK}, 0); h.flush()"));
    let c1 = format!("{dev}-c1");
    ctl_ok(&store, &["clone", &format!("{dev}@s1"), &c1]);
    assert_eq!(ctl_ok(&store, &["snapshots", &dev]), "s1\n");

    let snap = format!("{dev}@s1");
    for old in [&snap, &c1] {
        assert_eq!(read(&nbdkit, old, 0, first.len()), first, "{old} holds the first write");
        assert_eq!(read(&nbdkit, old, MIB, later.len()), vec![0; later.len()], "{old} predates the later write");
    }
    let refused = "import nbd\ntry:\n    h.pwrite(b'x', 0)\n    print('written')\nexcept nbd.Error as e:\n    print('refused', h.is_read_only())";
    assert_eq!(common::nbdsh(&uri(&nbdkit, &snap), refused).trim(), "refused True", "a snapshot is read-only");
    let own = common::random_bytes(BLOCK, 3);
    write(&nbdkit, &c1, 2 * MIB, &own);
    assert_eq!(read(&nbdkit, &c1, 2 * MIB, BLOCK), own);
    assert_eq!(read(&nbdkit, &dev, 2 * MIB, BLOCK), vec![0; BLOCK], "a clone's writes are its own");
    assert_eq!(read(&nbdkit, &dev, 0, BLOCK), vec![0; BLOCK]);
    assert_eq!(read(&nbdkit, &dev, BLOCK, first.len() - BLOCK), first[BLOCK..]);
    assert_eq!(read(&nbdkit, &dev, MIB, later.len()), later);

    let missing = common::run(Command::new("/usr/bin/python3").args([
        "-m",
        "nbd",
        "-u",
        &uri(&nbdkit, &format!("{dev}@nope")),
        "-c",
        "pass",
    ]));
    assert!(!missing.status.success(), "a missing snapshot is no export");
    assert!(nbdkit.stderr().contains(&format!("export {dev}@nope does not exist; export {dev} has no snapshot nope")));

    let diff = ctl_ok(&store, &["diff", &snap, &dev]);
    assert_eq!(
        diff,
        format!(
            "{{\"offset\":0,\"length\":{BLOCK},\"kind\":\"zero\"}}\n{{\"offset\":{MIB},\"length\":{},\"kind\":\"data\"}}\n",
            later.len()
        )
    );

    let c2 = format!("{dev}-c2");
    ctl_ok(&store, &["clone", &snap, &c2]);
    let ctl_line = |args: &str| {
        let quoted: Vec<String> = store.iter().map(|p| format!("'{p}'")).collect();
        format!("{} {} {args}", env!("CARGO_BIN_EXE_nbds3ctl"), quoted.join(" "))
    };
    let pipeline =
        format!("{} | {}", ctl_line(&format!("export-diff {snap} {dev} -")), ctl_line(&format!("import-diff - {c2}")));
    common::run_ok(Command::new("sh").args(["-c", &pipeline]));
    common::run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &uri(&nbdkit, &c2),
        &uri(&nbdkit, &dev),
    ]));

    // A region only snapshot s2 still holds once dev is overwritten: gc frees it when s2 goes.
    let doomed = common::random_bytes(32 * BLOCK, 4);
    write(&nbdkit, &dev, 3 * MIB, &doomed);
    ctl_ok(&store, &["snapshot", &dev, "s2"]);
    write(&nbdkit, &dev, 3 * MIB, &common::random_bytes(32 * BLOCK, 5));
    ctl_ok(&store, &["delete-snapshot", &dev, "s2"]);
    let before = cas_objects();
    let gc: serde_json::Value =
        serde_json::from_str(&ctl_ok(&store, &["gc", "--grace", "0", "--force", "--json"])).unwrap();
    let after = cas_objects();
    let freed = gc["freed_objects"].as_u64().unwrap() as usize;
    assert!(freed >= 32, "the 32 chunks only s2 held are freed: {gc}");
    assert_eq!(before - after, freed, "{gc}");
    assert_eq!(read(&nbdkit, &snap, 0, first.len()), first, "gc keeps what snapshots hold");
    assert_eq!(read(&nbdkit, &c1, 2 * MIB, BLOCK), own, "gc keeps what clones hold");
    assert_eq!(read(&nbdkit, &dev, MIB, later.len()), later, "gc keeps what exports hold");
    nbdkit.stop();
}

/// Files under `dir`, recursively.
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries.filter_map(|e| e.ok()).map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum()
    })
}

#[test]
fn snapshots_clones_and_diffs_in_a_directory() {
    require!("nbdkit", "qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let store = vec!["storage=file".to_string(), format!("dir={}", dir.path().display())];
    snapshots_clones_and_diffs(store, || count_files(&dir.path().join("cas")));
}

/// `info` accounts for a cas export's space exactly (`store`: parameters of an empty store of
/// the test's own, since the bucket's figures count everything in it). Export a has eight
/// distinct blocks and four duplicates; its snapshot s1; then one block of a is rewritten and one
/// zeroed; b shares four blocks with a; c, a clone of a@s1, writes one block of its own.
fn info_accounts_for_holes_and_dedup(store: Vec<String>) {
    const MB: u64 = 1 << 20;
    let bs = BLOCK as u64;
    let block = |seed: u64| common::random_bytes(BLOCK, 100 + seed);
    let blocks = |seeds: &[u64]| seeds.iter().flat_map(|&s| block(s)).collect::<Vec<u8>>();
    for export in ["a", "b"] {
        ctl_ok(&store, &["create", export, "--size", "4M", "--layout", "cas"]);
    }
    let mut params = store.clone();
    params.push("export=a".into());
    let nbdkit = Nbdkit::start(&params);
    write(&nbdkit, "a", 0, &blocks(&[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]));
    ctl_ok(&store, &["snapshot", "a", "s1"]);
    write(&nbdkit, "a", 5 * BLOCK, &block(8));
    common::nbdsh(&uri(&nbdkit, "a"), &format!("h.zero({BLOCK}, {}); h.flush()", 11 * BLOCK));
    write(&nbdkit, "b", 0, &blocks(&[0, 1, 2, 3]));
    write(&nbdkit, "b", 10 * BLOCK, &block(9));
    ctl_ok(&store, &["clone", "a@s1", "c"]);
    write(&nbdkit, "c", 30 * BLOCK, &block(10));
    nbdkit.stop();

    let info = |export: &str| {
        let out = ctl_ok(&store, &["info", export, "--json"]);
        let mut json: serde_json::Value = serde_json::from_str(&out).expect("info --json is JSON");
        json.as_object_mut().unwrap().remove("lease");
        json
    };
    // Every map is a delta in its head (far fewer than 1024 blocks changed: no fold), so the
    // bucket holds no map page; and chunks 0 to 7, 8 (a's rewrite), 9 (b's own) and 10 (c's own).
    let bucket = serde_json::json!({
        "chunk_objects": 11, "chunk_bytes": 11 * bs,
        "page_objects": 0, "page_bytes": 0,
        "stored_bytes": 11 * bs,
    });
    let expected = |name: &str, mapped: u64, distinct: u64, snapshots: u64, with_distinct: u64| {
        serde_json::json!({
            "name": name, "size": 4 * MB, "block_size": BLOCK, "blocks": 1024, "layout": "cas",
            "stored_blocks": mapped, "stored_bytes": mapped * bs,
            "mapped_blocks": mapped, "mapped_bytes": mapped * bs, "holes_saved_bytes": 4 * MB - mapped * bs,
            "snapshots": snapshots,
            "distinct_chunks": distinct, "distinct_chunk_bytes": distinct * bs,
            "dedup_saved_bytes": (mapped - distinct) * bs,
            "map_pages": 0, "map_page_bytes": 0,
            "with_snapshots": {
                "distinct_chunks": with_distinct, "distinct_chunk_bytes": with_distinct * bs,
                "map_pages": 0, "map_page_bytes": 0,
            },
            "bucket": bucket,
        })
    };
    // a: blocks 0-4, 6-10 (8 replaced 5, 11 zeroed); chunks 0-4, 6, 7, 8; with s1 also 5.
    assert_eq!(info("a"), expected("a", 11, 8, 1, 9));
    assert_eq!(info("b"), expected("b", 5, 5, 0, 5));
    assert_eq!(info("c"), expected("c", 13, 9, 0, 9));

    let text = ctl_ok(&store, &["info", "a"]);
    for line in [
        "snapshots:   1\n",
        "the export as of its last flush, snapshots not included:\n",
        "  logical size           4M  4194304 bytes\n",
        "  mapped                44K  45056 bytes in 11 blocks that hold data\n",
        "  holes saved          4.0M  4149248 bytes: blocks never written, zeroed or trimmed\n",
        "  distinct chunks       32K  32768 bytes in 8 chunks\n",
        "  dedup saved           12K  12288 bytes: identical blocks in the export stored once\n",
        "with its 1 snapshot:\n  distinct chunks       36K  36864 bytes in 9 chunks\n",
        "  chunk objects         44K  45056 bytes in 11 objects\n",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
}

#[test]
fn info_accounts_for_holes_and_dedup_in_a_directory() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    info_accounts_for_holes_and_dedup(vec!["storage=file".to_string(), format!("dir={}", dir.path().display())]);
}

#[test]
fn info_accounts_for_holes_and_dedup_in_s3() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let bucket = OwnBucket::new(&env, "cas-info");
    info_accounts_for_holes_and_dedup(cas_params(&env, &bucket.name));
}

/// A plain export has no snapshots: the refusal says how to copy it into a cas export.
#[test]
fn a_plain_export_refuses_snapshots_and_says_how_to_copy_it_into_a_cas_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = vec!["storage=file".to_string(), format!("dir={}", dir.path().display())];
    ctl_ok(&store, &["create", "old", "--size", "1M"]);
    let out = ctl(&store, &["snapshot", "old", "s1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("export old has layout plain, which has no snapshots; copy it into a cas export first: `nbds3ctl create NEW --size 1048576 --block-size 4096 --layout cas`, then `nbdcopy` from old to NEW"),
        "{err}"
    );
    assert_eq!(count_files(&dir.path().join("cas")), 0, "nothing written");
}

/// A bucket of this test's own, removed when dropped: gc with no grace period would free the
/// uncommitted uploads of other tests' writers in a shared one.
struct OwnBucket {
    env: S3Env,
    name: String,
}

impl OwnBucket {
    fn new(env: &S3Env, what: &str) -> Self {
        OwnBucket { env: env.clone(), name: common::unique(what).to_lowercase() }
    }
}

/// The parameters of `bucket` on `env` for tests with one writer per export: on a server that
/// ignores conditional writes they opt in to the risk that fencing would cover.
fn cas_params(env: &S3Env, bucket: &str) -> Vec<String> {
    let mut params = env.params(bucket);
    if !env.conditional_writes() {
        params.push("cas-unconditional=true".into());
    }
    params
}

impl Drop for OwnBucket {
    fn drop(&mut self) {
        self.env.remove_bucket(&self.name);
    }
}

#[test]
fn snapshots_clones_and_diffs_in_s3() {
    require!("nbdkit", "qemu-img");
    let Some(env) = common::s3() else { return };
    let bucket = OwnBucket::new(&env, "cas-e2e");
    common::note(&format!("on {}", env.name()));
    snapshots_clones_and_diffs(cas_params(&env, &bucket.name), || env.list(&bucket.name, "cas/").len());
}

/// A cas export is written only where the server can fence a second writer, unless the operator
/// opts in: on a server that ignores conditional writes (Garage) nbdkit refuses the export,
/// naming the server's limitation and the opt-in; with `cas-unconditional=true` it serves it.
/// Reading needs no fencing: `nbdkit -r` serves it without the opt-in.
#[test]
fn a_cas_export_is_refused_where_the_server_ignores_conditional_writes() {
    require!("nbdkit");
    let Some(env) = common::s3() else { return };
    let dev = common::unique("cas-cw");
    let store = env.params(common::TEST_BUCKET);
    ctl_ok(&store, &["create", &dev, "--size", "1M", "--layout", "cas"]);
    let mut params = store.clone();
    params.push(format!("export={dev}"));
    let nbdkit = Nbdkit::start(&params);
    let script = "h.pwrite(b'kept', 0); h.flush(); print(h.pread(4, 0))";
    let out =
        common::run(Command::new("/usr/bin/python3").args(["-m", "nbd", "-u", &uri(&nbdkit, &dev), "-c", script]));
    if env.conditional_writes() {
        common::note(&format!("{} honours conditional writes: the cas export is served", env.name()));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bytearray(b'kept')");
        return;
    }
    common::note(&format!("{} ignores conditional writes: the cas export is refused", env.name()));
    assert!(!out.status.success(), "served without fencing");
    let log = nbdkit.stderr();
    assert!(log.contains("does not honour conditional writes") && log.contains("cas-unconditional=true"), "{log}");
    nbdkit.stop();
    params.push("cas-unconditional=true".into());
    let opted_in = Nbdkit::start(&params);
    assert_eq!(common::nbdsh(&uri(&opted_in, &dev), script).trim(), "bytearray(b'kept')");
    opted_in.stop();
    params.pop();
    let read_only = Nbdkit::start_with(&["-r"], &params);
    let read = common::nbdsh(&uri(&read_only, &dev), "print(h.pread(4, 0), h.is_read_only())");
    assert_eq!(read.trim(), "bytearray(b'kept') True", "served read-only without the opt-in");
}

/// Writes `count` files of a few KiB under `root/dir`, different for each `seed`.
fn write_files(root: &Path, dir: &str, count: usize, seed: u64) {
    std::fs::create_dir_all(root.join(dir)).unwrap();
    for i in 0..count {
        let data = common::random_bytes(1000 + 997 * i, seed * 1000 + i as u64);
        std::fs::write(root.join(dir).join(format!("f{i}")), data).unwrap();
    }
}

/// The issue's done-when, on `store` (the plugin's and nbds3ctl's parameters): ext4 on a cas
/// export served by nbdkit; files; the filesystem frozen (so a FLUSH covers them, journal
/// included) and snapshot s1 taken while it stays mounted and nbdkit serves it; more files;
/// clone c1 of s1. Then, all three attached at once from one nbdkit: the snapshot itself mounts
/// read-only with exactly the files it was taken with, the clone with the same and then its own,
/// the export with every file it was given and none of the clone's.
fn ext4_snapshot_and_clone_mount(store: Vec<String>, work: &Path) {
    let dev = common::unique("ext4");
    let (snap, clone) = (format!("{dev}@s1"), format!("{dev}-c1"));
    let mut params = store.clone();
    params.extend([format!("export={dev}"), "create=none".into(), "cache-size=32M".into()]);
    ctl_ok(&store, &["create", &dev, "--size", "256M", "--layout", "cas"]);
    let nbdkit = Nbdkit::start(&params);
    let mut device = Device::attach(&nbdkit, &work.join("dev"));
    common::run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(device.dev()));
    let mnt = device.mount();
    write_files(&mnt, "before", 40, 1);
    let at_snapshot = checksums(&mnt);
    device.freeze();
    let taken = ctl_ok(&store, &["snapshot", &dev, "s1"]);
    device.thaw();
    assert_eq!(taken.trim(), format!("took snapshot {snap}"));
    write_files(&mnt, "after", 40, 2);
    let later = checksums(&mnt);
    assert_ne!(later, at_snapshot);
    device.umount();
    device.detach();

    ctl_ok(&store, &["clone", &snap, &clone]);
    let (snap_uri, clone_uri) = (uri(&nbdkit, &snap), uri(&nbdkit, &clone));
    common::run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &snap_uri, &clone_uri]));

    // The journal of a snapshot taken while mounted may want replaying, which a read-only device
    // cannot have: noload mounts it as it is (frozen, it is consistent without).
    let mut snapshot = Device::attach_export(&nbdkit, &snap, Access::ReadOnly, &work.join("snap"));
    let snap_mnt = snapshot.mount_with("ro,noload");
    assert_eq!(checksums(&snap_mnt), at_snapshot, "the snapshot holds exactly the files it was taken with");
    let mut cloned = Device::attach_export(&nbdkit, &clone, Access::ReadWrite, &work.join("clone"));
    let clone_mnt = cloned.mount();
    assert_eq!(checksums(&clone_mnt), at_snapshot, "the clone starts as the snapshot");
    write_files(&clone_mnt, "clone-only", 5, 3);
    let clone_files = checksums(&clone_mnt);
    let mut origin = Device::attach_export(&nbdkit, &dev, Access::ReadWrite, &work.join("dev-again"));
    let origin_mnt = origin.mount();
    assert_eq!(checksums(&origin_mnt), later, "the export has every file it was given, none of the clone's");
    assert_eq!(checksums(&snap_mnt), at_snapshot, "the clone's writes do not reach the snapshot");
    for (mut device, mounted, expected) in
        [(origin, origin_mnt, &later), (cloned, clone_mnt, &clone_files), (snapshot, snap_mnt, &at_snapshot)]
    {
        assert_eq!(&checksums(&mounted), expected);
        device.umount();
        device.detach();
    }
    let refused =
        "import nbd\ntry:\n    h.pwrite(b'x', 0)\n    print('written')\nexcept nbd.Error:\n    print('refused')";
    assert_eq!(common::nbdsh(&snap_uri, refused).trim(), "refused", "the snapshot stays read-only");
    nbdkit.stop();

    // Each once more from a fresh nbdkit, as committed: what a restart or another host sees.
    let nbdkit = Nbdkit::start(&params);
    for (export, access, options, expected) in [
        (&snap, Access::ReadOnly, "ro,noload", &at_snapshot),
        (&clone, Access::ReadWrite, "defaults", &clone_files),
        (&dev, Access::ReadWrite, "defaults", &later),
    ] {
        let mut device = Device::attach_export(&nbdkit, export, access, &work.join(format!("again-{export}")));
        let mnt = device.mount_with(options);
        assert_eq!(&checksums(&mnt), expected, "{export} after a restart");
        device.umount();
        device.detach();
    }
    nbdkit.stop();
}

#[test]
fn ext4_on_a_cas_export_snapshot_and_clone_mount_in_a_directory() {
    if !common::block_device::ready() || !common::have("qemu-img") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("store")).unwrap();
    let store = vec!["storage=file".to_string(), format!("dir={}", work.path().join("store").display())];
    ext4_snapshot_and_clone_mount(store, work.path());
}

#[test]
fn ext4_on_a_cas_export_snapshot_and_clone_mount_in_s3() {
    if !common::block_device::ready() || !common::have("qemu-img") {
        return;
    }
    let Some(env) = common::s3() else { return };
    common::note(&format!("on {}", env.name()));
    let work = tempfile::tempdir().unwrap();
    ext4_snapshot_and_clone_mount(cas_params(&env, common::TEST_BUCKET), work.path());
}
