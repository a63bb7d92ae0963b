//! Many exports from one nbdkit: independent data, hostile and unknown names refused, recorded
//! geometry enforced, exports grown while served, and BLOCK_STATUS extents that show holes to
//! real clients.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::{run_ok, Nbdkit};

fn file_params(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut p = vec!["storage=file".to_string(), format!("dir={}", dir.display())];
    p.extend(extra.iter().map(|s| s.to_string()));
    p
}

/// Connects to export `name` and runs `script` (`h` is the handle), returning stdout, or the
/// connection error's text.
fn nbdsh_export(nbdkit: &Nbdkit, name: &str, script: &str) -> String {
    let code = format!(
        "h = nbd.NBD()\nh.set_export_name({name:?})\ntry:\n    h.connect_unix({:?})\nexcept nbd.Error as e:\n    print('refused:', e)\n    raise SystemExit\n{script}",
        nbdkit.socket.display().to_string()
    );
    let out = run_ok(Command::new("/usr/bin/python3").args(["-c", &format!("import nbd\n{code}")]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two exports served by one nbdkit hold independent data; the default export is `export=`.
#[test]
fn exports_are_independent() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let nbdkit = Nbdkit::start(&file_params(dir.path(), &["size=16M", "export=main", "create=any"]));
    nbdsh_export(&nbdkit, "alpha", "h.pwrite(b'A' * 4096, 0); h.flush()");
    nbdsh_export(&nbdkit, "beta", "h.pwrite(b'B' * 4096, 0); h.flush()");
    nbdsh_export(&nbdkit, "", "h.pwrite(b'M' * 4096, 0); h.flush()");
    assert_eq!(nbdsh_export(&nbdkit, "alpha", "print(h.pread(2, 0))").trim(), "bytearray(b'AA')");
    assert_eq!(nbdsh_export(&nbdkit, "beta", "print(h.pread(2, 0))").trim(), "bytearray(b'BB')");
    assert_eq!(nbdsh_export(&nbdkit, "main", "print(h.pread(2, 0))").trim(), "bytearray(b'MM')");
    let mut names: Vec<_> = std::fs::read_dir(dir.path().join("exports"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["alpha", "beta", "main"]);
}

/// Export names that could escape their prefix or directory are refused at connection time, with
/// the reason in nbdkit's log, and nothing is created for them.
#[test]
fn hostile_export_names_are_refused() {
    require!("nbdkit", "/usr/bin/python3", "nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let nbdkit = Nbdkit::start(&file_params(dir.path(), &["size=16M"]));
    let long = "x".repeat(1000);
    for name in ["..", ".", "a/b", "../../etc", "tab\there", long.as_str(), "caf\u{e9}"] {
        let out = nbdsh_export(&nbdkit, name, "print('connected')");
        assert!(out.starts_with("refused:"), "{name:?}: {out}");
    }
    // A name that is not UTF-8 (%FF in the URI) is refused too, not mistaken for the default.
    let uri = format!("nbd+unix:///caf%FF?socket={}", nbdkit.socket.display());
    let out = common::run(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert!(!out.status.success(), "served: {}", String::from_utf8_lossy(&out.stdout));
    let log = nbdkit.stderr();
    assert!(log.contains("invalid export name \"caf\u{fffd}\": it is not UTF-8"), "{log}");
    assert!(log.contains("invalid export name \"../../etc\": character '/' is not allowed"), "{log}");
    assert!(log.contains("the name is 1000 bytes long, the limit is 128"), "{log}");
    let created: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(created.is_empty(), "created {created:?}");
}

/// An export keeps the geometry it was created with: a contradicting size= or block-size= is
/// refused with what is recorded; no size= opens it as recorded; an unknown export needs size=.
#[test]
fn recorded_geometry_is_enforced() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let nbdkit = Nbdkit::start(&file_params(dir.path(), &["size=16M", "block-size=64K", "export=dev"]));
    nbdkit.nbdsh("h.pwrite(b'g' * 100, 0); h.flush()");
    nbdkit.stop();

    let nbdkit = Nbdkit::start(&file_params(dir.path(), &["export=dev"]));
    assert_eq!(nbdkit.nbdsh("print(h.get_size(), h.pread(1, 0))").trim(), "16777216 bytearray(b'g')");
    nbdkit.stop();

    let nbdkit = Nbdkit::start(&file_params(dir.path(), &["export=dev", "block-size=4096"]));
    assert!(nbdsh_export(&nbdkit, "", "print('connected')").starts_with("refused:"));
    assert!(nbdkit.stderr().contains("export dev was created with block-size=65536"), "{}", nbdkit.stderr());
    nbdkit.stop();

    // size= only sizes new exports: an export resized since keeps its recorded size.
    let nbdkit = Nbdkit::start(&file_params(dir.path(), &["export=dev", "size=32M"]));
    assert_eq!(nbdkit.nbdsh("print(h.get_size())").trim(), "16777216");
    assert!(nbdkit.stderr().contains("export dev is 16777216 bytes; size=33554432 only sizes new exports"));
}

/// A mistyped export name is refused, naming the export and how to create it, and creates
/// nothing: only export= is created on first open, unless create=any; with create=none, nothing
/// is, and an export made by `nbds3ctl create` opens.
#[test]
fn only_the_default_export_is_created_on_first_open() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let nbdkit = Nbdkit::start(&file_params(dir.path(), &["size=16M", "export=main"]));
    let out = nbdsh_export(&nbdkit, "mian", "print('connected')");
    assert!(out.starts_with("refused:"), "{out}");
    let expected = "export mian does not exist; only export=main is created on first open; create it with \
                    `nbds3ctl create mian --size SIZE`, or start nbdkit with create=any";
    assert!(nbdkit.stderr().contains(expected), "{}", nbdkit.stderr());
    assert_eq!(nbdsh_export(&nbdkit, "", "print(h.get_size())").trim(), "16777216");
    nbdkit.stop();
    let exports = || {
        let mut names: Vec<_> = std::fs::read_dir(dir.path().join("exports"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(exports(), ["main"]);

    let nbdkit = Nbdkit::start(&file_params(dir.path(), &["size=16M", "export=other", "create=none"]));
    assert!(nbdsh_export(&nbdkit, "", "").starts_with("refused:"));
    let expected = "export other does not exist; nbdkit runs with create=none; create it with `nbds3ctl create other";
    assert!(nbdkit.stderr().contains(expected), "{}", nbdkit.stderr());
    let ctl = run_ok(
        Command::new(env!("CARGO_BIN_EXE_nbds3ctl"))
            .args(file_params(dir.path(), &[]))
            .args(["create", "other", "--size", "8M"]),
    );
    assert!(ctl.status.success());
    assert_eq!(nbdsh_export(&nbdkit, "", "print(h.get_size())").trim(), "8388608");
    assert_eq!(nbdsh_export(&nbdkit, "main", "print(h.get_size())").trim(), "16777216");
    nbdkit.stop();
    assert_eq!(exports(), ["main", "other"]);
}

/// `nbds3ctl resize` grows an export while nbdkit serves it: a connection opened before keeps
/// its size and keeps working, one opened afterwards sees the new size, the old data, and the
/// other connection's writes (one shared volume); a new nbdkit serves the grown export too.
fn grow_while_served(store: Vec<String>) {
    let export = common::unique("grow");
    let ctl = |args: &[&str]| run_ok(Command::new(env!("CARGO_BIN_EXE_nbds3ctl")).args(&store).args(args));
    ctl(&["create", &export, "--size", "8M"]);
    let nbdkit = Nbdkit::start(&store);
    let script = format!(
        r#"
import nbd, sys
def connect():
    h = nbd.NBD()
    h.set_export_name({export:?})
    h.connect_unix({socket:?})
    return h
old = connect()
old.pwrite(b'o' * 4096, (8 << 20) - 4096)
old.flush()
print('ready', old.get_size(), flush=True)
sys.stdin.readline()
new = connect()
print('sizes', old.get_size(), new.get_size())
print('old data', new.pread(4096, (8 << 20) - 4096) == b'o' * 4096)
new.pwrite(b'n' * 4096, (24 << 20) - 4096)
new.pwrite(b'm' * 4096, 0)
new.flush()
old.pwrite(b'p' * 4096, 4096)
old.flush()
print('shared', old.pread(4096, 0) == b'm' * 4096, new.pread(4096, 4096) == b'p' * 4096)
try:
    old.pread(1, 8 << 20)
    print('old connection read past its size')
except nbd.Error:
    print('old connection keeps its size')
"#,
        socket = nbdkit.socket.display().to_string()
    );
    let mut python = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(python.stdout.take().unwrap());
    let mut ready = String::new();
    stdout.read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready 8388608", "{}", nbdkit.stderr());
    let grown = ctl(&["resize", &export, "--size", "24M"]);
    let grown = String::from_utf8_lossy(&grown.stdout);
    assert_eq!(
        grown.trim(),
        format!("grew export {export} from 8M to 24M; clients see the new size when they reconnect")
    );
    python.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(python.wait().unwrap().success(), "{rest}\n{}", nbdkit.stderr());
    assert_eq!(
        rest.lines().collect::<Vec<_>>(),
        ["sizes 8388608 25165824", "old data True", "shared True True", "old connection keeps its size"],
        "{}",
        nbdkit.stderr()
    );
    nbdkit.stop();

    let nbdkit = Nbdkit::start(&store);
    let out = nbdsh_export(&nbdkit, &export, "print(h.get_size(), h.pread(2, (24 << 20) - 2), h.pread(2, 4096))");
    assert_eq!(out.trim(), "25165824 bytearray(b'nn') bytearray(b'pp')");
}

#[test]
fn an_export_grows_while_served_from_a_directory() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    grow_while_served(file_params(dir.path(), &[]));
}

#[test]
fn an_export_grows_while_served_from_s3() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    grow_while_served(env.params(common::TEST_BUCKET));
}

/// `nbdinfo --map` and `qemu-img map` see holes where nothing is stored, and data where it is.
#[test]
fn extents_show_holes_to_real_clients() {
    require!("nbdkit", "/usr/bin/python3", "nbdinfo", "qemu-img");
    let nbdkit = Nbdkit::start(&["storage=memory".to_string(), "size=64M".into()]);
    nbdkit.nbdsh("h.pwrite(b'd' * (1 << 20), 8 << 20); h.flush()");
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(nbdkit.uri()));
    let map = String::from_utf8_lossy(&map.stdout);
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    let summary: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r[0], r[1], r[2])).collect();
    assert_eq!(summary, [("0", "8388608", "3"), ("8388608", "1048576", "0"), ("9437184", "57671680", "3")], "{map}");
    let qmap = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(nbdkit.uri()));
    let qmap = String::from_utf8_lossy(&qmap.stdout);
    assert!(
        qmap.contains(
            "\"start\": 8388608, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"
        ),
        "{qmap}"
    );
}

/// A full-device trim of a 100 GiB S3 export (what mkfs does first) costs requests per stored
/// block, not per device block: it finishes in seconds and leaves no objects.
#[test]
fn trimming_a_100g_s3_export_is_fast_and_leaves_no_objects() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let export = common::unique("trim100g");
    let mut params = env.params(common::TEST_BUCKET);
    params.extend([format!("export={export}"), "size=100G".into()]);
    let nbdkit = Nbdkit::start(&params);
    nbdkit.nbdsh("for i in range(50):\n    h.pwrite(b'x' * 4096, i * (2 << 30))\nh.flush()");
    let prefix = format!("blocks/{export}/");
    assert_eq!(env.list(common::TEST_BUCKET, &prefix).len(), 50);
    let started = std::time::Instant::now();
    nbdkit.nbdsh("size = h.get_size()\nfor off in range(0, size, 1 << 30):\n    h.trim(1 << 30, off)\nh.flush()");
    assert!(started.elapsed().as_secs() < 60, "trim took {:?}", started.elapsed());
    assert_eq!(env.list(common::TEST_BUCKET, &prefix), Vec::<String>::new());
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(nbdkit.uri()));
    assert_eq!(String::from_utf8_lossy(&map.stdout).lines().count(), 1, "one hole");
}

/// The README's filter example works: the exportname filter lists the exports, and the
/// blocksize-policy filter advertises the block size as the preferred I/O size.
#[test]
fn filters_list_exports_and_advertise_the_block_size() {
    require!("nbdkit", "nbdinfo");
    let params: Vec<String> = [
        "storage=memory",
        "size=64M",
        "block-size=64K",
        "create=any",
        "exportname-list=explicit",
        "exportname=vm1",
        "exportname=vm2",
        "blocksize-preferred=64K",
        "blocksize-minimum=512",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nbdkit = Nbdkit::start_with(&["--filter=exportname", "--filter=blocksize-policy"], &params);
    let out = run_ok(Command::new("nbdinfo").arg("--list").arg(nbdkit.uri()));
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("export=\"vm1\":") && out.contains("export=\"vm2\":"), "{out}");
    assert!(out.contains("block_size_preferred: 65536"), "{out}");
}
