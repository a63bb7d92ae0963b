//! The two formats of `stats-file`: nbds3's own `key=value` lines, and Prometheus' text
//! exposition format, for hosts that scrape metrics with node_exporter's textfile collector
//! rather than read logs.
//!
//! Both are rendered from the counters each [`Volume`](crate::Volume) reports by name, so the
//! formats cannot disagree; `METRICS` gives each counter its Prometheus name, type and help.

use crate::export_name::ExportName;

/// How `stats-file` is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsFormat {
    /// One line per export: `export=NAME key=value ...`.
    Text,
    /// Prometheus' text exposition format: `nbds3_...{export="NAME"} value`.
    Prometheus,
}

/// The counters of one open export, by name, as [`Volume::counters`](crate::Volume::counters)
/// reports them.
pub type ExportCounters = (ExportName, Vec<(&'static str, u64)>);

/// Whether a metric only grows (a counter) or goes up and down (a gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    /// The name of the type on a Prometheus `# TYPE` line.
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One counter as Prometheus shows it.
#[derive(Debug)]
struct Metric {
    /// The counter's name in the text format.
    field: &'static str,
    /// Its Prometheus name: `nbds3_` prefix, base units, `_total` for counters.
    name: &'static str,
    kind: Kind,
    help: &'static str,
    /// What the value is divided by to get the metric's unit (microseconds to seconds).
    divisor: u32,
}

const fn metric(field: &'static str, name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric { field, name, kind, help, divisor: 1 }
}

/// Every counter a volume reports, in the order the text format writes them.
const METRICS: [Metric; 17] = [
    metric("dirty_bytes", "nbds3_dirty_bytes", Kind::Gauge, "Written data not yet stored, in memory."),
    metric("cached_bytes", "nbds3_cached_bytes", Kind::Gauge, "Clean blocks held in the cache."),
    metric("stored_bytes", "nbds3_stored_bytes", Kind::Gauge, "Blocks stored (blocks of zeros are not)."),
    metric("hits", "nbds3_cache_hits_total", Kind::Counter, "Block reads served from memory."),
    metric(
        "holes",
        "nbds3_holes_total",
        Kind::Counter,
        "Block reads of blocks not stored, answered without a request.",
    ),
    metric("misses", "nbds3_cache_misses_total", Kind::Counter, "Block reads that needed a read from storage."),
    metric(
        "read_modify_writes",
        "nbds3_read_modify_writes_total",
        Kind::Counter,
        "Partly written blocks completed with a read from storage.",
    ),
    metric("gets", "nbds3_gets_total", Kind::Counter, "Block reads from storage (S3 GET)."),
    metric("puts", "nbds3_puts_total", Kind::Counter, "Block writes to storage (S3 PUT)."),
    metric("deletes", "nbds3_deletes_total", Kind::Counter, "Blocks deleted from storage."),
    metric("delete_batches", "nbds3_delete_batches_total", Kind::Counter, "Batch delete requests (S3 DeleteObjects)."),
    metric("lists", "nbds3_lists_total", Kind::Counter, "Listings of the stored blocks."),
    metric("errors", "nbds3_errors_total", Kind::Counter, "Storage requests that failed."),
    metric("bytes_down", "nbds3_read_bytes_total", Kind::Counter, "Bytes read from storage."),
    metric("bytes_up", "nbds3_written_bytes_total", Kind::Counter, "Bytes written to storage."),
    Metric {
        field: "put_avg_us",
        name: "nbds3_put_mean_seconds",
        kind: Kind::Gauge,
        help: "Mean time of a block write to storage since nbdkit started.",
        divisor: 1_000_000,
    },
    metric(
        "retries",
        "nbds3_retries_total",
        Kind::Counter,
        "Storage requests sent again after a transient failure (S3: 5xx, throttling, a dropped connection).",
    ),
];

/// Every counter of the stats file, for its documentation: the name in the text format, the
/// Prometheus name and type, and what it counts.
pub fn described() -> impl Iterator<Item = [&'static str; 4]> {
    METRICS.iter().map(|m| [m.field, m.name, m.kind.as_str(), m.help])
}

/// `key=value` pairs, space-separated: a text-format line without its `export=`.
pub fn fields(counters: &[(&'static str, u64)]) -> String {
    counters.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join(" ")
}

/// The whole stats file for `exports`, sorted by name.
pub fn render(format: StatsFormat, exports: &mut [ExportCounters]) -> String {
    exports.sort_by(|a, b| a.0.cmp(&b.0));
    match format {
        StatsFormat::Text => {
            exports.iter().map(|(name, counters)| format!("export={name} {}\n", fields(counters))).collect()
        }
        StatsFormat::Prometheus => prometheus(exports),
    }
}

/// Prometheus' text format: each metric's HELP and TYPE once, then one sample per export, since
/// a metric's samples must follow its TYPE line without other metrics in between.
fn prometheus(exports: &[ExportCounters]) -> String {
    let mut out = String::new();
    for m in &METRICS {
        let samples: Vec<_> = exports
            .iter()
            .filter_map(|(name, counters)| Some((name, counters.iter().find(|(f, _)| *f == m.field)?.1)))
            .collect();
        if samples.is_empty() {
            continue;
        }
        out.push_str(&format!("# HELP {} {}\n# TYPE {} {}\n", m.name, m.help, m.name, m.kind.as_str()));
        for (export, value) in samples {
            // Export names are letters, digits, '.', '_' and '-' only: nothing in a label value
            // needs escaping.
            let value =
                if m.divisor == 1 { value.to_string() } else { (value as f64 / f64::from(m.divisor)).to_string() };
            out.push_str(&format!("{}{{export=\"{export}\"}} {value}\n", m.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::MemoryStorage;
    use crate::{Geometry, Volume, VolumeConfig};

    fn volume_counters() -> Vec<(&'static str, u64)> {
        let storage = Arc::new(MemoryStorage::new(4096));
        let config =
            VolumeConfig { cache_bytes: 1 << 20, max_dirty_bytes: 1 << 20, concurrency: 1, writeback_delay: None };
        let volume = Volume::new(storage, Geometry::new(1 << 20, 4096).unwrap(), config).unwrap();
        volume.write(&[7; 8192], 0, false).unwrap();
        volume.flush().unwrap();
        volume.counters()
    }

    #[test]
    fn every_counter_a_volume_reports_has_a_prometheus_metric_in_the_same_order() {
        let fields: Vec<_> = volume_counters().iter().map(|(f, _)| *f).collect();
        let described: Vec<_> = METRICS.iter().map(|m| m.field).collect();
        assert_eq!(fields, described);
    }

    #[test]
    fn text_is_one_line_of_key_value_pairs_per_export_sorted_by_name() {
        let counters = vec![("puts", 2), ("gets", 0)];
        let mut exports =
            vec![(ExportName::new("vm2").unwrap(), counters.clone()), (ExportName::new("dev").unwrap(), counters)];
        assert_eq!(render(StatsFormat::Text, &mut exports), "export=dev puts=2 gets=0\nexport=vm2 puts=2 gets=0\n");
    }

    #[test]
    fn prometheus_groups_each_metric_with_its_help_type_and_one_labelled_sample_per_export() {
        let mut exports = vec![
            (ExportName::new("vm-2.a").unwrap(), volume_counters()),
            (ExportName::new("dev").unwrap(), vec![("puts", 5), ("put_avg_us", 1500), ("dirty_bytes", 4096)]),
        ];
        let text = render(StatsFormat::Prometheus, &mut exports);
        assert!(
            text.starts_with(
                "# HELP nbds3_dirty_bytes Written data not yet stored, in memory.\n\
                 # TYPE nbds3_dirty_bytes gauge\n\
                 nbds3_dirty_bytes{export=\"dev\"} 4096\n\
                 nbds3_dirty_bytes{export=\"vm-2.a\"} 0\n"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE nbds3_puts_total counter\nnbds3_puts_total{export=\"dev\"} 5\n"), "{text}");
        assert!(text.contains("nbds3_puts_total{export=\"vm-2.a\"} 2\n"), "{text}");
        assert!(text.contains("nbds3_stored_bytes{export=\"vm-2.a\"} 8192\n"), "{text}");
        assert!(text.contains("# TYPE nbds3_put_mean_seconds gauge\nnbds3_put_mean_seconds{export=\"dev\"} 0.0015\n"));
        // Every line is a comment or `name{labels} value`, every metric has one TYPE, and every
        // counter (and only a counter) ends in _total, as Prometheus' naming rules ask.
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(typed.insert(name.to_string()), "{name} typed twice");
                assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
            } else if !line.starts_with("# HELP ") {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                assert!(typed.contains(name), "{name} sampled before its TYPE line");
                assert!(name.starts_with("nbds3_") && series.ends_with("\"}"), "{line}");
                value.parse::<f64>().unwrap();
            }
        }
        assert_eq!(typed.len(), METRICS.len());
    }
}
