//! `scripts/install` puts the plugin where nbdkit loads it, nbds3ctl and the man page under
//! PREFIX, all under DESTDIR: staged as a package would be, from the debug build the other
//! process tests use (it never builds).

mod common;

use std::path::Path;
use std::process::Command;

/// An install into a DESTDIR gives a plugin that nbdkit loads and whose `--help` lists every
/// parameter, a working nbds3ctl, and a man page that `man -l` renders.
#[test]
fn install_into_a_destdir_gives_a_loadable_plugin_nbds3ctl_and_the_man_page() {
    require!("nbdkit", "pod2man", "man");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let build_dir = common::plugin().parent().unwrap().to_path_buf();
    let destdir = tempfile::tempdir().unwrap();
    let plugindir = "/usr/lib/nbdkit/plugins";
    common::run_ok(
        Command::new(root.join("scripts/install"))
            .env("DESTDIR", destdir.path())
            .env("PREFIX", "/opt/nbds3")
            .env("PLUGINDIR", plugindir)
            .env("BUILD_DIR", &build_dir),
    );
    let staged = |path: &str| destdir.path().join(path.trim_start_matches('/'));

    let plugin = staged(&format!("{plugindir}/nbdkit-nbds3-plugin.so"));
    let help = common::run_ok(Command::new("nbdkit").arg(&plugin).arg("--help"));
    let help = String::from_utf8_lossy(&help.stdout);
    for key in nbds3::config::ConfigKey::ALL {
        assert!(help.contains(&format!("{}=", key.name())), "{} is not in nbdkit's --help:\n{help}", key.name());
    }
    let version = common::run_ok(Command::new("nbdkit").arg(&plugin).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));

    let usage = common::run_ok(Command::new(staged("/opt/nbds3/bin/nbds3ctl")).arg("--help"));
    assert!(String::from_utf8_lossy(&usage.stdout).starts_with("Usage: nbds3ctl"));

    let page = staged("/opt/nbds3/share/man/man1/nbdkit-nbds3-plugin.1");
    let shown = common::run_ok(Command::new("man").arg("-l").arg(&page).env("MANWIDTH", "200"));
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("nbdkit-nbds3-plugin - serve an S3 bucket"), "{shown}");
    assert!(shown.contains(&format!("nbds3-{}", env!("CARGO_PKG_VERSION"))), "no version in the footer:\n{shown}");
}
