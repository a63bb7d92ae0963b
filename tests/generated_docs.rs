//! The parameter table (docs/PARAMETERS.md), the README's versions and the man page say what the
//! code does: each generated part of them is exactly what `nbds3::param_docs` generates now, and
//! the man page builds and renders.

mod common;

use std::path::Path;
use std::process::Command;

use nbds3::param_docs::SECTIONS;

/// A parameter added or changed in `ConfigKey` (or a counter of the stats file, or the version)
/// without regenerating the docs fails here, with the command that fixes it.
#[test]
fn generated_docs_match_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for section in &SECTIONS {
        let text = std::fs::read_to_string(root.join(section.path)).unwrap();
        let generated = section.splice(&text).unwrap();
        assert!(
            generated == text,
            "{} is out of date with the code: run `cargo run --example generate_docs` and commit the result",
            section.path
        );
    }
}

/// The man page source is valid POD, and renders with every parameter in it.
#[test]
fn the_man_page_renders_with_every_parameter() {
    require!("pod2man", "man");
    let pod = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/nbdkit-nbds3-plugin.pod");
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("nbdkit-nbds3-plugin.1");
    common::run_ok(
        Command::new("pod2man").args(["--errors=die", "--section=1", "--center=nbdkit"]).arg(&pod).arg(&page),
    );
    let shown = common::run_ok(Command::new("man").arg("-l").arg(&page).env("MANWIDTH", "200"));
    let shown = String::from_utf8_lossy(&shown.stdout);
    for heading in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "EXAMPLES",
        "PARAMETERS",
        "STATS FILE",
        "ENVIRONMENT",
        "FILES",
        "VERSION",
        "SEE ALSO",
    ] {
        assert!(shown.lines().any(|l| l == heading), "no {heading} section in:\n{shown}");
    }
    for key in nbds3::config::ConfigKey::ALL {
        assert!(shown.contains(&format!("{}=", key.name())), "{} is not on the page", key.name());
    }
}
