//! `nbds3ctl` as a user runs it, on a directory and on S3, together with a real nbdkit.

mod common;

use std::process::{Command, Output};

use common::Nbdkit;

fn ctl(params: &[String], args: &[&str]) -> Output {
    common::run(Command::new(env!("CARGO_BIN_EXE_nbds3ctl")).args(params).args(args))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Create an export with nbds3ctl, serve it with nbdkit without size=, write to it, grow it
/// (a new connection sees the new size; deleting or shrinking it meanwhile is refused), see the
/// stored bytes in `list` and `info` (and their JSON), shrink it (the object past the new end
/// goes), then delete it: its objects are gone.
fn lifecycle(params: Vec<String>, objects: impl Fn(&str) -> usize) {
    let export = common::unique("ctl");
    let out = ctl(&params, &["create", &export, "--size", "64M", "--block-size", "64K"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("created export {export}: 64M in 65536-byte blocks, layout plain"));
    let again = ctl(&params, &["create", &export, "--size", "64M"]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(stderr(&again).contains("already exists"));

    let mut serve = params.clone();
    serve.push(format!("export={export}"));
    let nbdkit = Nbdkit::start(&serve);
    assert_eq!(nbdkit.nbdsh("h.pwrite(b'c' * 200000, 0); h.flush(); print(h.get_size())").trim(), "67108864");
    let grown = ctl(&params, &["resize", &export, "--size", "128M"]);
    assert!(grown.status.success(), "{}", stderr(&grown));
    let script = "print(h.get_size(), h.pread(1, 0)); h.pwrite(b'e' * 65536, 100 << 20); h.flush()";
    assert_eq!(nbdkit.nbdsh(script).trim(), "134217728 bytearray(b'c')");
    let shrink = ctl(&params, &["resize", &export, "--size", "64M", "--shrink", "--yes"]);
    assert_eq!(shrink.status.code(), Some(1), "shrinking a served export: {}", stderr(&shrink));
    assert!(stderr(&shrink).contains("is held by another writer"), "{}", stderr(&shrink));
    let busy = ctl(&params, &["delete", &export, "--yes"]);
    assert_eq!(busy.status.code(), Some(1), "deleting a served export: {}", stderr(&busy));
    assert!(
        stderr(&busy).contains(&format!("is held by another writer, nbds3 pid {}", nbdkit.pid())),
        "{}",
        stderr(&busy)
    );
    let pid = nbdkit.pid();
    nbdkit.stop();

    // Both at once: each lists the blocks of every export in the bucket, which other tests share.
    let (list, all) = std::thread::scope(|s| {
        let json = s.spawn(|| ctl(&params, &["list", "--json"]));
        (ctl(&params, &["list"]), json.join().unwrap())
    });
    assert!(list.status.success(), "{}", stderr(&list));
    // The row ends with who held the export's lease: the nbdkit that served it, and released it.
    let list = stdout(&list);
    let row = list.lines().find(|l| l.starts_with(&export)).unwrap_or_default();
    let (columns, host) = row.split_once(&format!("  released by pid {pid} on ")).unwrap_or_default();
    assert_eq!(columns.split_whitespace().collect::<Vec<_>>().join(" "), format!("{export} 128M 64K 320K 5"), "{list}");
    let info = ctl(&params, &["info", &export]);
    assert!(stdout(&info).contains("stored:      320K in 5 objects"), "{}", stdout(&info));
    let json = ctl(&params, &["info", &export, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("info --json is JSON");
    let expected = serde_json::json!({
        "name": export,
        "size": 128 << 20,
        "block_size": 65536,
        "blocks": 2048,
        "layout": "plain",
        "stored_blocks": 5,
        "stored_bytes": 5 * 65536,
        "lease": { "host": host, "pid": pid, "expires": 0 },
    });
    let mut plus_holes = expected.clone();
    plus_holes.as_object_mut().unwrap().extend([
        ("mapped_blocks".to_string(), serde_json::json!(5)),
        ("mapped_bytes".to_string(), serde_json::json!(5 * 65536)),
        ("holes_saved_bytes".to_string(), serde_json::json!((128 << 20) - 5 * 65536)),
    ]);
    assert_eq!(json, plus_holes, "list's object, and what holes saved");
    let all: Vec<serde_json::Value> = serde_json::from_slice(&all.stdout).expect("list --json is a JSON array");
    assert_eq!(all.iter().filter(|e| **e == expected).count(), 1, "{all:?}");
    assert_eq!(objects(&export), 5);

    let refused = ctl(&params, &["resize", &export, "--size", "64M"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("give --shrink to do that"), "{}", stderr(&refused));
    let shrunk = ctl(&params, &["resize", &export, "--size", "64M", "--shrink", "--yes"]);
    assert_eq!(
        stdout(&shrunk).trim(),
        format!("shrank export {export} from 128M to 64M, deleting 1 objects past the new end"),
        "{}",
        stderr(&shrunk)
    );
    assert!(!stderr(&shrunk).contains("deleting ["), "progress on a pipe: {}", stderr(&shrunk));
    assert_eq!(objects(&export), 4);

    let refused = ctl(&params, &["delete", &export]);
    assert_eq!(refused.status.code(), Some(2), "without --yes and no terminal: {}", stderr(&refused));
    let deleted = ctl(&params, &["delete", &export, "--yes"]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    assert_eq!(stdout(&deleted).trim(), format!("deleted export {export} and its 4 objects"));
    assert!(!stderr(&deleted).contains("deleting ["), "progress on a pipe: {}", stderr(&deleted));
    assert_eq!(objects(&export), 0);
    assert_eq!(ctl(&params, &["info", &export]).status.code(), Some(3));
}

/// The whole life of an export in a directory.
#[test]
fn export_lifecycle_in_a_directory() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    lifecycle(vec![format!("dir={}", root.display())], |export| {
        std::fs::read_dir(root.join("blocks").join(export)).map(|d| d.count()).unwrap_or(0)
    });
}

/// The whole life of an export in an S3 bucket.
#[test]
fn export_lifecycle_in_s3() {
    require!("nbdkit", "/usr/bin/python3");
    let Some(env) = common::s3() else { return };
    let params = env.params(common::TEST_BUCKET);
    lifecycle(params, |export| env.list(common::TEST_BUCKET, &format!("blocks/{export}/")).len());
}

/// Bad usage exits 2 with a hint; a bad parameter names itself.
#[test]
fn bad_usage_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = vec![format!("dir={}", dir.path().display())];
    for (args, expected) in [
        (vec!["frob"], "unknown command \"frob\""),
        (vec!["create", "x"], "create needs --size SIZE"),
        (vec!["create", "x", "--size", "1G", "--colour", "red"], "unknown option \"--colour\""),
        (vec!["list", "extra"], "unexpected argument \"extra\""),
        (vec![], "no command given"),
        (vec!["list", "--json=yes"], "unknown option \"--json=yes\" for list"),
        (vec!["resize", "x"], "resize needs --size SIZE"),
        (vec!["resize", "x", "--size"], "--size needs a value"),
        (vec!["help", "frob"], "no help for \"frob\": it is not a command"),
    ] {
        let out = ctl(&p, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{args:?}: {}", stderr(&out));
    }
    let out = ctl(&[], &["list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("say where the exports are"), "{}", stderr(&out));
    let out = ctl(&["block-size=3".into(), format!("dir={}", dir.path().display())], &["list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("block-size: 3 is not allowed"), "{}", stderr(&out));
    let out = ctl(&p, &["create", "../etc", "--size", "1G"]);
    assert!(stderr(&out).contains("invalid export name"), "{}", stderr(&out));
    for args in [vec!["info", "nothing"], vec!["resize", "nothing", "--size", "1G"], vec!["delete", "nothing", "--yes"]]
    {
        let out = ctl(&p, &args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("export nothing does not exist"), "{args:?}: {}", stderr(&out));
    }
}

/// Every command has its own help, reached as `help COMMAND` and `COMMAND --help`, without
/// parameters; the general help lists every command.
#[test]
fn every_command_has_help() {
    let general = ctl(&[], &["--help"]);
    assert!(general.status.success());
    for command in ["list", "info", "create", "resize", "delete"] {
        assert!(stdout(&general).contains(&format!("\n  {command} ")), "{command}: {}", stdout(&general));
        let help = ctl(&[], &["help", command]);
        assert!(help.status.success(), "{}", stderr(&help));
        assert!(stdout(&help).starts_with(&format!("Usage: nbds3ctl [KEY=VALUE ...] {command} ")), "{}", stdout(&help));
        assert_eq!(stdout(&ctl(&[], &[command, "--help"])), stdout(&help));
    }
    let resize = stdout(&ctl(&[], &["resize", "-h"]));
    assert!(resize.contains("Shrinking is refused unless --shrink is given"), "{resize}");
}

/// Output into a pipe whose reader has gone (`nbds3ctl list | head -1`) ends nbds3ctl quietly,
/// as it ends any Unix tool, instead of a panic about a broken pipe.
#[test]
fn a_closed_pipe_ends_it_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let mut fds = [0; 2];
    // SAFETY: `pipe` fills `fds` with two new descriptors, each owned once below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe: {}", std::io::Error::last_os_error());
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let out =
        Command::new(env!("CARGO_BIN_EXE_nbds3ctl")).arg("--help").stdout(writer).output().expect("nbds3ctl runs");
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {}", out.status, stderr(&out));
}
