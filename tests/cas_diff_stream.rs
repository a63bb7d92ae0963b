//! Diff streams of `cas` exports, as a user of `export-diff`/`import-diff` would notice them:
//! a stream from snapshot A to B, applied to a clone of A, makes it read as B byte for byte; a
//! stream that is truncated, altered, of a newer version or for another base is refused and the
//! target reads as before; and a stream costs requests in proportion to what changed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbds3::diff_stream::{export_diff, import_diff, ImportOptions};
use nbds3::export_record::{ExportRecord, Layout};
use nbds3::lease::{Lease, LeaseConfig};
use nbds3::snapshots::{self, Version};
use nbds3::storage::cas::format::Root;
use nbds3::storage::cas::ops;
use nbds3::storage::cas::stream::StreamSummary;
use nbds3::storage::cas::{CasConfig, CasStorage};
use nbds3::storage::objects::faulty::{FaultyObjects, Request};
use nbds3::storage::{Backend, BlockBuf, BlockId, MemoryBackend, MemoryObjects, ObjectStore, Storage};
use nbds3::{ExportName, Geometry, Result};

const BS: usize = 4096;
/// Three leaf pages' worth of blocks, so diffs cross pages and the map has two levels.
const BLOCKS: u64 = 3000;
const DEVICE: u64 = BLOCKS * BS as u64;

fn name(s: &str) -> ExportName {
    ExportName::new(s).unwrap()
}

/// A block of bytes no other seed gives.
fn block(seed: u64) -> Vec<u8> {
    let mut bytes = vec![0; BS];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut bytes);
    bytes
}

/// A bucket: export records and leases in `backend`, the `cas` objects in `objects`.
struct Bucket {
    backend: Arc<dyn Backend>,
    objects: Arc<dyn ObjectStore>,
}

impl Bucket {
    fn new(objects: Arc<dyn ObjectStore>) -> Self {
        Bucket { backend: Arc::new(MemoryBackend::default()), objects }
    }

    /// Records the `cas` export `export` of `DEVICE` bytes in `block_size` blocks.
    fn create(&self, export: &str, block_size: usize) -> CasStorage {
        let geometry = Geometry::new(DEVICE, block_size).unwrap();
        ExportRecord { geometry, layout: Layout::Cas }.write(&*self.backend, &name(export)).unwrap();
        CasStorage::open(self.objects.clone(), &name(export), block_size, config()).unwrap()
    }

    fn snapshot(&self, export: &str, snap: &str) {
        snapshots::snapshot(&*self.backend, &*self.objects, &name(export), &name(snap)).unwrap();
    }

    fn export(&self, from: Option<&str>, to: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let from = from.map(|f| Version::parse(f).unwrap());
        let to = Version::parse(to).unwrap();
        export_diff(&*self.backend, self.objects.clone(), from.as_ref(), &to, &mut out, &mut |_, _| {}).unwrap();
        out
    }

    fn import(&self, target: &str, stream: &[u8], force: bool) -> Result<StreamSummary> {
        let objects = self.objects.clone();
        let options = ImportOptions { force, lease: Some(LEASE), cas: config() };
        import_diff(&self.backend, objects, &name(target), &mut &stream[..], options, &mut |_, _| {})
    }
}

const LEASE: LeaseConfig = LeaseConfig {
    time: std::time::Duration::from_secs(60),
    takeover: false,
    request_timeout: std::time::Duration::from_secs(30),
};

/// Writers whose deltas fold every 50 blocks, so streams go between maps that mix tree and delta.
fn config() -> CasConfig {
    CasConfig { delta_entries: 50, ..CasConfig::default() }
}

fn open(store: &Arc<dyn ObjectStore>, export: &str) -> CasStorage {
    CasStorage::open(store.clone(), &name(export), BS, config()).unwrap()
}

/// Every block of `s`, zeros for holes.
fn contents(s: &dyn Storage) -> Vec<Vec<u8>> {
    let mut buf = BlockBuf::zeroed(BS);
    (0..BLOCKS)
        .map(|id| if s.read_block(BlockId(id), &mut buf).unwrap() { buf.to_vec() } else { vec![0; BS] })
        .collect()
}

fn snapshot_contents(store: &Arc<dyn ObjectStore>, export: &str, snap: &str) -> Vec<Vec<u8>> {
    contents(&CasStorage::open_snapshot(store.clone(), &name(export), &name(snap), BS).unwrap())
}

fn write(s: &CasStorage, ids: impl IntoIterator<Item = u64>, seed: u64) {
    for id in ids {
        s.write_block(BlockId(id), &block(id * 1000 + seed)).unwrap();
    }
    s.flush().unwrap();
}

/// Export `e` with snapshot `a` (blocks 0..1200 written), snapshot `b` (some of those rewritten,
/// some zeroed, new ones in another leaf page), and a live state past `b`; and `c`, a clone of `a`.
fn lineage() -> Bucket {
    let bucket = Bucket::new(Arc::new(MemoryObjects::default()));
    let e = bucket.create("e", BS);
    write(&e, 0..1200, 1);
    bucket.snapshot("e", "a");
    write(&e, (0..1200).step_by(7), 2);
    for id in 500..700 {
        e.delete_block(BlockId(id)).unwrap();
    }
    write(&e, 2048..2100, 3);
    bucket.snapshot("e", "b");
    write(&e, [5, 600, 2999], 4);
    snapshots::clone(&*bucket.backend, &*bucket.objects, &name("e"), &name("a"), &name("c")).unwrap();
    bucket
}

#[test]
fn a_stream_from_a_to_b_makes_a_clone_of_a_read_as_b_and_chains_on_to_the_live_export() {
    let bucket = lineage();
    let store = &bucket.objects;
    let stream = bucket.export(Some("e@a"), "e@b");
    let applied = bucket.import("c", &stream, false).unwrap();
    let changed_in_place = 1200 / 7 + 1 - (500..700).filter(|id| id % 7 == 0).count() as u64;
    assert_eq!(
        applied,
        StreamSummary { data_blocks: changed_in_place + 52, zero_blocks: 200, stream_bytes: stream.len() as u64 }
    );
    assert!(contents(&open(store, "c")) == snapshot_contents(store, "e", "b"), "the clone reads as e@b");
    let b_root = ops::read_snapshot(&**store, &name("e"), &name("b")).unwrap().root;
    let folded = |root: &Root| ops::folded(&**store, root).unwrap();
    assert_eq!(
        folded(&open(store, "c").committed_root()),
        folded(&b_root),
        "the same map (however much of each is in its delta), so the stream from e@b applies"
    );

    // The next increment applies on top: e@b → the live export as of its last FLUSH.
    let writer = open(store, "e");
    writer.write_block(BlockId(7), &block(77)).unwrap();
    bucket.import("c", &bucket.export(Some("e@b"), "e"), false).unwrap();
    let c = contents(&open(store, "c"));
    assert!(c == contents(&open(store, "e")), "the clone reads as the live export's last FLUSH");
    assert_ne!(c[7], block(77), "a write not yet flushed is not in the stream");
}

#[test]
fn a_full_stream_fills_an_empty_export_in_another_bucket() {
    let source = lineage();
    let full = source.export(None, "e@b");
    let backup = Bucket::new(Arc::new(MemoryObjects::default()));
    backup.create("copy", BS);
    backup.import("copy", &full, false).unwrap();
    assert!(contents(&open(&backup.objects, "copy")) == snapshot_contents(&source.objects, "e", "b"));
    let e = backup.import("copy", &full, false).unwrap_err().to_string();
    assert!(e.contains("it already holds its result"), "{e}");
    let increment = source.export(Some("e@b"), "e");
    backup.import("copy", &increment, false).unwrap();
    assert!(contents(&open(&backup.objects, "copy")) == contents(&open(&source.objects, "e")));
}

/// Asserts that importing `stream` into `c` (a clone of `a`) fails with a message containing
/// `why`, and that `c` still holds its map afterwards, also from a new open.
fn refused(bucket: &Bucket, stream: &[u8], why: &str) {
    let before = open(&bucket.objects, "c").committed_root();
    let e = bucket.import("c", stream, false).unwrap_err().to_string();
    assert!(e.contains(why) && e.ends_with("export c is unchanged"), "{why:?} not in {e:?}");
    assert_eq!(open(&bucket.objects, "c").committed_root(), before, "{e}");
}

#[test]
fn truncated_altered_newer_or_misplaced_streams_are_refused_and_change_nothing() {
    let bucket = lineage();
    let store = &bucket.objects;
    let a = snapshot_contents(store, "e", "a");
    let stream = bucket.export(Some("e@a"), "e@b");
    let len = stream.len();
    for cut in [5, 20, 100, 300, len / 2, len - 33, len - 1] {
        refused(&bucket, &stream[..cut], "truncated");
    }
    for at in [200, 400, len / 3, len - 40, len - 10] {
        let mut flipped = stream.clone();
        flipped[at] ^= 0x10;
        refused(&bucket, &flipped, "at byte");
    }
    let mut data_flipped = stream.clone();
    data_flipped[len / 2] ^= 1;
    refused(&bucket, &data_flipped, "fails its BLAKE3 checksum");
    let mut newer = stream.clone();
    newer[8] = 2;
    refused(&bucket, &newer, "diff stream version 2, but this nbds3");
    refused(&bucket, &[&stream[..], &stream[..]].concat(), "bytes follow the end record");
    refused(&bucket, b"not a stream at all", "not an nbds3 diff stream");
    let later = bucket.export(Some("e@b"), "e");
    refused(&bucket, &later, "the stream applies to e@b");
    assert!(contents(&open(store, "c")) == a, "after every refusal the clone reads as snapshot a");

    bucket.create("small", 512);
    let e = bucket.import("small", &stream, false).unwrap_err().to_string();
    assert!(e.contains("4096-byte blocks and export small 512-byte blocks"), "{e}");
    let half = ExportRecord { geometry: Geometry::new(DEVICE / 2, BS).unwrap(), layout: Layout::Cas };
    half.write(&*bucket.backend, &name("half")).unwrap();
    let e = bucket.import("half", &stream, false).unwrap_err().to_string();
    assert!(e.contains("grow it first (nbds3ctl resize half --size 12288000)"), "{e}");

    // --force applies a stream to another base: only the blocks it carries change.
    bucket.import("c", &later, true).unwrap();
    let c = contents(&open(store, "c"));
    assert_eq!(c[2999], block(2999 * 1000 + 4), "a block the stream carries");
    assert_eq!(c[1], a[1], "a block the stream does not carry");
}

#[test]
fn an_import_takes_the_exports_lease_and_needs_a_cas_export() {
    let bucket = lineage();
    let stream = bucket.export(Some("e@a"), "e@b");
    let writer = Lease::new(bucket.backend.clone(), name("c"), LEASE);
    writer.hold().unwrap();
    let e = bucket.import("c", &stream, false).unwrap_err().to_string();
    assert!(e.starts_with("export c: is held by another writer"), "{e}");
    writer.release();
    bucket.import("c", &stream, false).unwrap();

    nbds3::admin::create(&*bucket.backend, &name("plain"), DEVICE, BS, nbds3::export_record::Layout::Plain).unwrap();
    let e = bucket.import("plain", &stream, false).unwrap_err().to_string();
    assert!(e.contains("export plain has layout plain, which has no diff imports"), "{e}");
    let e = bucket.import("missing", &stream, false).unwrap_err().to_string();
    assert!(e.contains("export missing does not exist"), "{e}");
}

#[test]
fn a_stream_costs_reads_in_proportion_to_what_changed_and_no_writes() {
    let counting = Arc::new(FaultyObjects::new(true));
    let bucket = Bucket::new(counting.clone());
    let e = bucket.create("e", BS);
    write(&e, 0..BLOCKS, 1);
    bucket.snapshot("e", "a");
    write(&e, [2500], 2);
    counting.reads.store(0, Ordering::Relaxed);
    counting.writes.store(0, Ordering::Relaxed);
    let stream = bucket.export(Some("e@a"), "e");
    let reads = counting.reads.load(Ordering::Relaxed);
    // The head and the snapshot record; the two tops and the changed leaf of each map (diff), the
    // path to the block again (reader) and its chunk: nowhere near the 3000 blocks.
    assert!(reads <= 12, "{reads} reads for a one-block change");
    eprintln!("{reads} reads, {} stream bytes for a one-block change of a 3000-block export", stream.len());
    assert!(stream.len() < 2 * BS, "{} bytes for a one-block change", stream.len());
    assert_eq!(counting.writes.load(Ordering::Relaxed), 0, "exporting changes nothing in the bucket");
}

#[test]
fn a_store_failure_during_an_import_leaves_the_export_unchanged_and_a_retry_applies_it() {
    let counting = Arc::new(FaultyObjects::new(true));
    let bucket = Bucket::new(counting.clone());
    let e = bucket.create("e", BS);
    write(&e, 0..100, 1);
    bucket.snapshot("e", "a");
    write(&e, 50..300, 2);
    bucket.snapshot("e", "b");
    snapshots::clone(&*bucket.backend, &*bucket.objects, &name("e"), &name("a"), &name("c")).unwrap();
    let stream = bucket.export(Some("e@a"), "e@b");
    let before = contents(&open(&bucket.objects, "c"));

    let writes = AtomicU64::new(0);
    counting.before_each(move |request| match request {
        Request::Put(_) | Request::Delete(_) if writes.fetch_add(1, Ordering::Relaxed) >= 120 => {
            Err("connection reset".into())
        }
        _ => Ok(()),
    });
    let e = bucket.import("c", &stream, false).unwrap_err().to_string();
    assert!(e.contains("connection reset (injected); export c is unchanged"), "{e}");
    counting.clear_hook();
    assert!(contents(&open(&bucket.objects, "c")) == before, "the failed import left no trace a reader sees");

    bucket.import("c", &stream, false).unwrap();
    assert!(contents(&open(&bucket.objects, "c")) == snapshot_contents(&bucket.objects, "e", "b"));
}

/// A sealed stream: `header` text, then `records`, then the end record and its checksum.
fn sealed(header: &str, records: &[u8]) -> Vec<u8> {
    let mut bytes = b"NBDS3DIF".to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(records);
    bytes.push(b'E');
    let check = *blake3::hash(&bytes).as_bytes();
    bytes.extend_from_slice(&check);
    bytes
}

fn zero_record(offset: u64, length: u64) -> Vec<u8> {
    [&[b'Z'][..], &offset.to_le_bytes(), &length.to_le_bytes()].concat()
}

#[test]
fn well_sealed_streams_are_still_checked_record_by_record_and_unknown_header_keys_are_ignored() {
    let bucket = lineage();
    let stream = bucket.export(Some("e@a"), "e@b");
    let len = u32::from_le_bytes(stream[12..16].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&stream[16..16 + len]).unwrap();
    let records = &stream[16 + len..stream.len() - 33];
    let two = header.lines().map(|l| if l.starts_with("blocks=") { "blocks=2" } else { l }).collect::<Vec<_>>();
    let two = two.join("\n") + "\n";
    let bs = BS as u64;

    let backwards = [zero_record(2 * bs, bs), zero_record(0, bs)].concat();
    refused(&bucket, &sealed(&two, &backwards), "out of order");
    let overlapping = [zero_record(0, 2 * bs), zero_record(bs, bs)].concat();
    refused(&bucket, &sealed(&two, &overlapping), "out of order");
    refused(&bucket, &sealed(&two, &[zero_record(DEVICE - bs, 2 * bs)].concat()), "past the");
    refused(&bucket, &sealed(&two, &[zero_record(1, bs), zero_record(2 * bs, bs)].concat()), "misaligned");
    refused(&bucket, &sealed(&two, &zero_record(0, bs)), "the records carry 1 blocks, the header says 2");
    refused(&bucket, &sealed(&header.replace("block-size=", "colour=blue\nblok-size="), records), "no block-size=");

    let with_a_note = format!("note=written by a later nbds3\n{header}");
    bucket.import("c", &sealed(&with_a_note, records), false).unwrap();
    assert!(contents(&open(&bucket.objects, "c")) == snapshot_contents(&bucket.objects, "e", "b"));
}
