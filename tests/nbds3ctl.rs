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

/// Create an export with nbds3ctl, serve it with nbdkit without size=, write to it (deleting it
/// meanwhile is refused), see the stored bytes in `list` and `info`, then delete it: its
/// objects are gone.
fn lifecycle(params: Vec<String>, objects: impl Fn(&str) -> usize) {
    let export = common::unique("ctl");
    let out = ctl(&params, &["create", &export, "--size", "64M", "--block-size", "64K"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("created export {export}: 64M in 65536-byte blocks"));
    let again = ctl(&params, &["create", &export, "--size", "64M"]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(stderr(&again).contains("already exists"));

    let mut serve = params.clone();
    serve.push(format!("export={export}"));
    let nbdkit = Nbdkit::start(&serve);
    assert_eq!(nbdkit.nbdsh("h.pwrite(b'c' * 200000, 0); h.flush(); print(h.get_size())").trim(), "67108864");
    let busy = ctl(&params, &["delete", &export, "--yes"]);
    assert_eq!(busy.status.code(), Some(1), "deleting a served export: {}", stderr(&busy));
    assert!(
        stderr(&busy).contains(&format!("is held by another writer, nbds3 pid {}", nbdkit.pid())),
        "{}",
        stderr(&busy)
    );
    let writer = format!("  released by pid {} on ", nbdkit.pid());
    nbdkit.stop();

    let list = ctl(&params, &["list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let row = stdout(&list)
        .lines()
        .find(|l| l.starts_with(&export))
        .and_then(|l| l.split_once(writer.as_str()).map(|(columns, _host)| columns))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "));
    assert_eq!(row, Some(format!("{export} 64M 64K 256K 4")));
    let info = ctl(&params, &["info", &export]);
    assert!(stdout(&info).contains("stored:      256K in 4 objects"), "{}", stdout(&info));
    assert_eq!(objects(&export), 4);

    let refused = ctl(&params, &["delete", &export]);
    assert_eq!(refused.status.code(), Some(2), "without --yes and no terminal: {}", stderr(&refused));
    let deleted = ctl(&params, &["delete", &export, "--yes"]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    assert_eq!(stdout(&deleted).trim(), format!("deleted export {export} and its 4 objects"));
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
}
