//! The plugin in a real nbdkit with the file backend: data survives restarts and crashes.

mod common;

use common::Nbdkit;

fn params(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut p =
        vec!["storage=file".to_string(), format!("dir={}", dir.display()), "size=64M".into(), "export=dev".into()];
    p.extend(extra.iter().map(|s| s.to_string()));
    p
}

/// Write, flush, stop nbdkit, start it again on the same directory: the bytes are there, and
/// the directory holds exactly the non-zero blocks under the S3-style names.
#[test]
fn data_survives_a_restart() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let nbdkit = Nbdkit::start(&params(dir.path(), &[]));
    nbdkit.nbdsh("h.pwrite(b'persist' * 1000, 4096 * 3 + 100); h.pwrite(bytes(4096), 0); h.flush()");
    nbdkit.stop();
    let mut files: Vec<_> = std::fs::read_dir(dir.path().join("blocks/dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["0000000000003000", "0000000000004000"], "7000 bytes at 12388 touch blocks 3 and 4");
    let nbdkit = Nbdkit::start(&params(dir.path(), &[]));
    let out = nbdkit.nbdsh("print(h.pread(7000, 4096 * 3 + 100) == b'persist' * 1000)");
    assert_eq!(out.trim(), "True");
}

/// `kill -9` right after FLUSH returned: every flushed byte is there after a restart.
#[test]
fn flushed_data_survives_a_crash() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let nbdkit = Nbdkit::start(&params(dir.path(), &[]));
    nbdkit.nbdsh("import random\nrandom.seed(7)\nh.pwrite(random.randbytes(1 << 20), 12345)\nh.flush()");
    nbdkit.crash();
    let nbdkit = Nbdkit::start(&params(dir.path(), &[]));
    let out =
        nbdkit.nbdsh("import random\nrandom.seed(7)\nprint(h.pread(1 << 20, 12345) == random.randbytes(1 << 20))");
    assert_eq!(out.trim(), "True");
}

/// A client that disconnects without FLUSH still has its writes stored when nbdkit stops cleanly.
#[test]
fn unflushed_writes_are_written_back_at_clean_shutdown() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let nbdkit = Nbdkit::start(&params(dir.path(), &[]));
    nbdkit.nbdsh("h.pwrite(b'late' * 1024, 8192)");
    nbdkit.stop();
    let nbdkit = Nbdkit::start(&params(dir.path(), &[]));
    assert_eq!(nbdkit.nbdsh("print(h.pread(4096, 8192) == b'late' * 1024)").trim(), "True");
}
