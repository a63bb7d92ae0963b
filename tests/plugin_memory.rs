//! The plugin in a real nbdkit with the memory backend, driven by real clients.

mod common;

use std::process::Command;

use common::{nbdsh, run, run_ok, Nbdkit};

fn params(extra: &[&str]) -> Vec<String> {
    ["storage=memory", "size=128M"].iter().chain(extra).map(|s| s.to_string()).collect()
}

/// A user writes with nbdsh, reads back, flushes; the device reports its size and capabilities.
#[test]
fn nbdsh_write_read_flush() {
    require!("nbdkit", "/usr/bin/python3");
    let nbdkit = Nbdkit::start(&params(&[]));
    let out = nbdkit.nbdsh(
        "h.pwrite(b'hello, world' * 1000, 4000)\n\
         assert h.pread(12, 4000) == b'hello, world'\n\
         assert h.pread(12000, 4000) == b'hello, world' * 1000\n\
         assert h.pread(4000, 0) == bytes(4000)\n\
         h.flush()\n\
         print(h.get_size(), h.can_flush(), h.can_fua(), h.can_multi_conn(), h.can_trim(), h.can_zero(), h.can_fast_zero())",
    );
    assert_eq!(out.trim(), "134217728 True True True True True True");
}

/// Two connections to one export share its volume: what one writes, the other reads at once.
#[test]
fn connections_share_one_volume() {
    require!("nbdkit", "/usr/bin/python3");
    let nbdkit = Nbdkit::start(&params(&[]));
    nbdkit.nbdsh("h.pwrite(b'\\x42' * 5000, 1000)");
    let out = nbdkit.nbdsh("print(h.pread(5000, 1000) == b'\\x42' * 5000)");
    assert_eq!(out.trim(), "True");
}

/// `qemu-img convert` copies a random 64 MiB image in and out, and `qemu-img compare` finds them equal.
#[test]
fn qemu_img_round_trip() {
    require!("nbdkit", "qemu-img");
    let nbdkit = Nbdkit::start(&params(&[]));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("in.raw");
    std::fs::write(&image, common::random_bytes(64 << 20, 1)).unwrap();
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&image).arg(nbdkit.uri()));
    let out = dir.path().join("out.raw");
    run_ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(nbdkit.uri()).arg(&out));
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&image).arg(&out));
}

/// `nbdcopy` writes an image to the device and reads it back byte for byte.
#[test]
fn nbdcopy_round_trip() {
    require!("nbdkit", "nbdcopy");
    let nbdkit = Nbdkit::start(&params(&["block-size=64K"]));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("in.raw");
    let mut data = common::random_bytes(128 << 20, 2);
    data[10 << 20..20 << 20].fill(0);
    std::fs::write(&image, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&image).arg(nbdkit.uri()));
    let out = dir.path().join("out.raw");
    run_ok(Command::new("nbdcopy").arg(nbdkit.uri()).arg(&out));
    assert!(std::fs::read(&out).unwrap() == data, "nbdcopy round trip differs");
}

/// Without `-f`, nbdkit forks after loading the plugin; the device must still work (no runtime
/// or thread may exist before the fork).
#[test]
fn works_when_nbdkit_forks_into_the_background() {
    require!("nbdkit", "/usr/bin/python3");
    let nbdkit = Nbdkit::start_daemon(&params(&[]));
    let out = nbdsh(&nbdkit.uri(), "h.pwrite(b'x' * 8192, 0); h.flush(); print(bytes(h.pread(3, 8190)))");
    assert_eq!(out.trim(), "b'xx\\x00'");
    nbdkit.stop();
}

/// A read-only server (`nbdkit -r`) advertises itself read-only and refuses writes.
#[test]
fn read_only_refuses_writes() {
    require!("nbdkit", "/usr/bin/python3");
    let nbdkit = Nbdkit::start_with(&["-r"], &params(&[]));
    let out = nbdkit.nbdsh(
        "import errno\n\
         print(h.is_read_only())\n\
         try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print('refused')\n\
         print(h.pread(1, 0))",
    );
    assert_eq!(out.trim(), "True\nrefused\nbytearray(b'\\x00')");
}

/// Requests past the end of the device fail with an error, not a crash.
#[test]
fn requests_past_the_end_fail_cleanly() {
    require!("nbdkit", "/usr/bin/python3");
    let nbdkit = Nbdkit::start(&params(&["size=1M"]));
    let out = nbdkit.nbdsh(
        "try:\n    h.pread(2, 1024*1024 - 1)\nexcept nbd.Error as e:\n    print('error')\n\
         print(h.pread(1, 1024*1024 - 1))",
    );
    assert_eq!(out.trim(), "error\nbytearray(b'\\x00')");
}

/// `--help` lists every parameter, and `--dump-plugin` works.
#[test]
fn help_and_dump_plugin() {
    require!("nbdkit");
    let help = run_ok(Command::new("nbdkit").arg(common::plugin()).arg("--help"));
    let help = String::from_utf8_lossy(&help.stdout);
    for key in nbds3::config::ConfigKey::ALL {
        assert!(help.contains(&format!("\n{}=", key.name())), "--help lacks {}", key.name());
    }
    let dump = run_ok(Command::new("nbdkit").arg(common::plugin()).args([
        "bucket=b",
        "access-key=AK",
        "secret-key=hunter2",
        "--dump-plugin",
    ]));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("name=nbds3") && dump.contains("thread_model=parallel"), "{dump}");
    assert!(!dump.contains("hunter2"), "the secret is in --dump-plugin: {dump}");
}

/// Bad parameters stop nbdkit at start-up with one message naming the parameter.
#[test]
fn bad_parameters_stop_nbdkit_with_a_clear_message() {
    require!("nbdkit");
    let cases: &[(&[&str], &str)] = &[
        (
            &["storage=memory", "size=1G", "block-size=1000"],
            "block-size: 1000 is not allowed: use a power of two from 512 to 4M",
        ),
        (&["storage=memory", "size=4097"], "size: 4097 is not allowed: use a positive multiple of the block size"),
        (&["storage=memory", "size=big"], "size: \"big\" is not a size"),
        (&["storage=memory", "size=1G", "colour=red"], "colour: unknown parameter"),
        (&["storage=file", "size=1G"], "dir: storage=file needs dir=PATH"),
        (&["storage=memory", "size=1G", "export=../x"], "export: invalid export name"),
        (&["storage=memory", "size=1G", "cache-size=lots"], "cache-size: \"lots\" is not a size"),
    ];
    for (params, expected) in cases {
        let out = run(Command::new("nbdkit")
            .args(["-f", "-U", "-"])
            .arg(common::plugin())
            .args(*params)
            .arg("--run")
            .arg("true"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{params:?} started");
        assert!(stderr.contains(expected), "{params:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{params:?}: {stderr}");
    }
}
