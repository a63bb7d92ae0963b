//! The S3 secret key on nbdkit's command line, where `ps` and nbdkit's own `-v` log show it:
//! nbds3 warns about it at start-up, names the safe ways, and never shows the secret itself.

mod common;

use common::Nbdkit;

/// What nbdkit wrote to stderr when started with `secret` as the secret key, with `-v`, on an
/// endpoint where nothing listens (the configuration is read, then the bucket check fails).
fn stderr_of_start(secret: &str) -> String {
    let params =
        ["bucket=b", "endpoint=http://127.0.0.1:1", "s3-timeout=2", "access-key=AKID", &format!("secret-key={secret}")]
            .map(String::from);
    match Nbdkit::try_start(&params, &["-v"]) {
        Err(stderr) => stderr,
        Ok(nbdkit) => panic!("nbdkit served a bucket on a closed port: {}", nbdkit.stderr()),
    }
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("given on the command line")).collect()
}

/// An inline `secret-key=` gets one warning line that names `secret-key=+FILE` and the
/// environment, and does not contain the secret.
#[test]
fn an_inline_secret_key_is_warned_about_without_showing_it() {
    require!("nbdkit");
    let secret = "inline-Secret-7f3a9c";
    let stderr = stderr_of_start(secret);
    let warned = warnings(&stderr);
    assert_eq!(warned.len(), 1, "one warning expected in:\n{stderr}");
    let warning = warned[0];
    assert!(warning.contains("secret-key=+FILE") && warning.contains("AWS_SECRET_ACCESS_KEY"), "{warning}");
    assert!(warning.contains("`ps`") && warning.contains("-v"), "{warning}");
    assert!(!warning.contains(secret), "the warning shows the secret: {warning}");
}

/// A secret read from a file is not on the command line: no warning.
#[test]
fn a_secret_key_from_a_file_is_not_warned_about() {
    require!("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "file-Secret-51b2").unwrap();
    let stderr = stderr_of_start(&format!("+{}", file.display()));
    assert!(stderr.contains("127.0.0.1:1"), "the start did not get as far as the bucket check:\n{stderr}");
    assert_eq!(warnings(&stderr), Vec::<&str>::new(), "{stderr}");
    assert!(!stderr.contains("file-Secret-51b2"), "{stderr}");
}
