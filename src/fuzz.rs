//! Test support for fuzzing what nbds3 parses from servers and from the bucket (HTTP answers on
//! the direct path, export records, leases, block keys in listings): the committed corpus of
//! nasty inputs, the budget of random cases, and a meter of the memory a call allocates.
//!
//! Why here and not cargo-fuzz: cargo-fuzz needs a nightly toolchain, and the parsers are private
//! to their modules, so the fuzzing is property tests (proptest, with shrinking) inside the crate.
//! They run in `cargo test` with a small budget, a few seconds in all, so CI runs them every
//! time; `NBDS3_FUZZ_SCALE=N` runs N times as many random cases, e.g.
//! `NBDS3_FUZZ_SCALE=200 cargo test --lib fuzz`.
//!
//! The corpus lives in `tests/corpus/{target}/`, one input per file, named for what it is. Every
//! input found to break a parser is added there, beside a test that names it and asserts the
//! fixed behaviour; every corpus input is also replayed by its target's fuzz test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

use proptest::test_runner::Config;

/// How a fuzz test runs: `cases` random inputs times `NBDS3_FUZZ_SCALE`, and no regression files
/// written beside the sources (inputs worth keeping go to the corpus, by hand, with a name).
pub(crate) fn config(cases: u32) -> Config {
    let scale = std::env::var("NBDS3_FUZZ_SCALE").ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(1);
    Config { cases: cases.saturating_mul(scale.max(1)), failure_persistence: None, ..Config::default() }
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(target)
}

/// Every input of `target`'s corpus, with its file name, in name order.
pub(crate) fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    inputs
}

/// One input of `target`'s corpus, for the test of the fix it led to.
pub(crate) fn corpus_input(target: &str, name: &str) -> Vec<u8> {
    let path = corpus_dir(target).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The system allocator, counting what each thread holds, so that a test can bound the memory a
/// parser takes for an input (a 1 GB Content-Length must not become a 1 GB buffer).
struct Metered;

thread_local! {
    /// Bytes this thread allocated minus those it freed, and the most that ever was.
    static HELD: Cell<(isize, isize)> = const { Cell::new((0, 0)) };
}

fn count(delta: isize) {
    // After the thread's locals are gone (at its exit) nothing is measured any more.
    let _ = HELD.try_with(|held| {
        let (now, peak) = held.get();
        held.set((now + delta, peak.max(now + delta)));
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; counting never allocates.
unsafe impl GlobalAlloc for Metered {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static METERED: Metered = Metered;

/// Runs `f`, returning what it returned and the most memory this thread held at once meanwhile,
/// beyond what it held before.
pub(crate) fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = HELD.with(|held| {
        let (now, _) = held.get();
        held.set((now, now));
        now
    });
    let value = f();
    let (_, peak) = HELD.with(Cell::get);
    (value, usize::try_from(peak - start).unwrap_or(0))
}

/// Export records and block keys as a bucket may hold them: written by this version, mangled,
/// or anything at all. Corpora: `tests/corpus/export-record/` (`refused-*` must not parse,
/// `readable-*` must) and `tests/corpus/block-leaf/` (`stray-*` must not be taken for a block).
mod records {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::{config, corpus};
    use crate::export_record::ExportRecord;
    use crate::storage::keys::{block_leaf, parse_block_leaf};
    use crate::storage::BlockId;
    use crate::volume::{Geometry, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

    fn block_size() -> impl Strategy<Value = usize> {
        (MIN_BLOCK_SIZE.trailing_zeros()..=MAX_BLOCK_SIZE.trailing_zeros()).prop_map(|shift| 1 << shift)
    }

    fn geometry() -> impl Strategy<Value = Geometry> {
        block_size().prop_flat_map(|bs| {
            (1..=i64::MAX as u64 / bs as u64).prop_map(move |blocks| Geometry::new(blocks * bs as u64, bs).unwrap())
        })
    }

    /// A written record with a line replaced, added or cut, or arbitrary text, or much of it.
    fn record_text() -> impl Strategy<Value = String> {
        prop_oneof![
            geometry().prop_map(|g| ExportRecord::plain(g).to_text()),
            (geometry(), any::<String>(), any::<usize>()).prop_map(|(g, junk, at)| {
                let text = ExportRecord::plain(g).to_text();
                let at = text.char_indices().map(|(i, _)| i).nth(at % text.chars().count()).unwrap_or(0);
                format!("{}{junk}{}", &text[..at], &text[at..])
            }),
            (
                vec(prop_oneof![Just("size="), Just("block-size="), Just("\n"), Just("#"), Just("=")], 0..20),
                any::<u64>()
            )
                .prop_map(|(parts, n)| parts.iter().map(|p| format!("{p}{n}")).collect()),
            any::<String>(),
            (1..100_000usize).prop_map(|n| "x".repeat(n)),
        ]
    }

    /// Anything, or what looks nearly like a leaf.
    fn leaf() -> impl Strategy<Value = String> {
        let near = vec(proptest::sample::select(b"0123456789abcdefABCDEF.+-".to_vec()), 15..=17);
        prop_oneof![any::<String>(), near.prop_map(|b| String::from_utf8(b).unwrap_or_default())]
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn fuzz_export_records(text in record_text()) {
            match ExportRecord::parse(&text) {
                Ok(ExportRecord { geometry: g, .. }) => prop_assert_eq!(Geometry::new(g.size(), g.block_size()).ok(), Some(g)),
                // The error shows at most the record's start, however big the record.
                Err(e) => prop_assert!(e.to_string().len() < 2048, "{} bytes", e.to_string().len()),
            }
        }

        #[test]
        fn written_export_records_read_back(g in geometry()) {
            let record = ExportRecord::plain(g);
            prop_assert_eq!(ExportRecord::parse(&record.to_text()).ok(), Some(record));
        }

        #[test]
        fn fuzz_block_leaves(leaf in leaf(), bs in block_size()) {
            if let Some(id) = parse_block_leaf(&leaf, bs) {
                prop_assert_eq!(block_leaf(id, bs), leaf);
            }
        }

        #[test]
        fn block_leaves_read_back(bs in block_size(), offset in any::<u64>()) {
            let id = BlockId(offset / bs as u64);
            prop_assert_eq!(parse_block_leaf(&block_leaf(id, bs), bs), Some(id));
        }
    }

    #[test]
    fn corpus_of_export_records() {
        for (name, bytes) in corpus("export-record") {
            let parsed = ExportRecord::parse(&String::from_utf8_lossy(&bytes));
            if name.starts_with("refused-") {
                let e = parsed.expect_err(&name).to_string();
                assert!(e.len() < 2048, "tests/corpus/export-record/{name}: {} bytes", e.len());
            } else if name.starts_with("readable-") {
                assert!(parsed.is_ok(), "tests/corpus/export-record/{name}");
            }
        }
    }

    #[test]
    fn corpus_of_block_leaves() {
        for (name, bytes) in corpus("block-leaf") {
            let leaf = String::from_utf8_lossy(&bytes);
            let parsed = parse_block_leaf(leaf.trim_end_matches('\n'), 4096);
            assert!(!name.starts_with("stray-") || parsed.is_none(), "tests/corpus/block-leaf/{name}: {parsed:?}");
        }
    }
}
