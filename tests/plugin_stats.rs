//! `stats-format=prometheus` through a real nbdkit: the stats file node_exporter's textfile
//! collector reads counts what the client did, in Prometheus' text format.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Nbdkit;

/// The samples of a Prometheus text file by series (`name{labels}`), after checking that every
/// sample follows its metric's `# TYPE` line and that counters are named `_total`.
fn samples(text: &str) -> HashMap<String, f64> {
    let mut types = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(typed) = line.strip_prefix("# TYPE ") {
            let (name, kind) = typed.split_once(' ').expect("# TYPE name kind");
            assert!(matches!(kind, "counter" | "gauge"), "{line}");
            assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "{name} typed twice");
        } else if !line.starts_with("# HELP ") {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let name = series.split('{').next().unwrap_or_default();
            assert!(types.contains_key(name), "{name} has no # TYPE line before its sample");
            samples.insert(series.to_string(), value.parse::<f64>().expect("a number"));
        }
    }
    samples
}

/// A client writes 64 KiB, flushes and reads a hole; the stats file, rewritten by rename every
/// 0.1 s, then shows 16 block writes, 64 KiB stored and one hole for export "dev", and the file
/// it is written to before the rename is not one the collector reads.
#[test]
fn prometheus_stats_file_counts_what_the_client_did() {
    require!("nbdkit", "/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("nbds3.prom");
    let nbdkit = Nbdkit::start(&[
        "storage=memory".into(),
        "size=1M".into(),
        "block-size=4K".into(),
        "stats-interval=0.1".into(),
        "stats-format=prometheus".into(),
        format!("stats-file={}", stats.display()),
    ]);
    nbdkit.nbdsh("h.pwrite(b'p' * 65536, 0); h.flush(); h.pread(4096, 1 << 19)");
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let text = std::fs::read_to_string(&stats).unwrap_or_default();
        let found = samples(&text);
        if found.get("nbds3_holes_total{export=\"dev\"}") == Some(&1.0) {
            break found;
        }
        assert!(Instant::now() < deadline, "the stats file never counted the client's read:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(found["nbds3_puts_total{export=\"dev\"}"], 16.0, "{found:?}");
    assert_eq!(found["nbds3_stored_bytes{export=\"dev\"}"], 65536.0, "{found:?}");
    assert_eq!(found["nbds3_dirty_bytes{export=\"dev\"}"], 0.0, "{found:?}");
    assert_eq!(found["nbds3_written_bytes_total{export=\"dev\"}"], 65536.0, "{found:?}");
    // The collector reads every *.prom file: the file being written must not be one of them.
    let prom: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".prom"))
        .collect();
    assert_eq!(prom, ["nbds3.prom"]);
    nbdkit.stop();
}
