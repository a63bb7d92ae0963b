//! The `cas` garbage collector: frees the chunks and map pages that no head and no snapshot
//! record references any more, so deleting an export or a snapshot shrinks the bucket.
//!
//! Chunks and pages are shared by every export, snapshot and clone, and writers upload them
//! before anything names them, so "unreferenced" alone would free data a running writer is about
//! to commit. The GC follows the rules of docs/CAS-FORMAT.md ("Garbage collection"):
//!
//! | step | what | why |
//! |---|---|---|
//! | 1. list | every object under `cas/chunks/` and `cas/pages/`, with size and modified time | only what is listed can be deleted, so an object written later is never a candidate |
//! | 2. mark | read every head and snapshot record (twice), walk their maps, take their deltas' chunks | what is referenced is kept |
//! | 3. lease | take `cas/gc/sweeping`, wait one [`UPLOAD_PERMIT`] | uploads, snapshots and clones allowed before are over; new ones wait |
//! | 4. look again | list again, drop what was written since; mark again | a writer that wrote garbage's bytes again (dedup) keeps them |
//! | 5. sweep | delete, 1000 keys a request, what is unmarked and was modified more than the grace period before 1 | writers upload again what they keep uncommitted ([`WRITER_REFRESH_AFTER`]) |
//!
//! A head, snapshot record or page that cannot be read or decoded aborts the GC before step 5,
//! naming the object: deleting on partial knowledge could free live data.
//!
//! Memory: the listed candidates older than the grace period (a hash, a flag and a size: about
//! 48 bytes each) and the set of reachable objects (a hash each, about 48 bytes with the hash
//! set's overhead). A TiB of distinct 4 KiB blocks is 268 million chunks, about 26 GiB; at
//! 64 KiB blocks about 1.6 GiB, at 1 MiB blocks about 100 MiB.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::fetch_page;
use super::format::{chunk_key, page_key, Entry, Hash, Head, Root, SnapshotRecord, CAS_PREFIX, MAX_RECORD_BYTES};
use crate::storage::objects::{Listed, ObjectStore, Put, ReadInto};
use crate::storage::{BlockBuf, Fence};
use crate::{lock, Error, Result};

/// How long an unreferenced chunk or page stays before a GC may free it, unless told otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// How old a writer lets its uncommitted uploads get before it uploads them again (see
/// [`CasStorage`](super::CasStorage)): the GC relies on never seeing an upload a writer still
/// needs that is older than this.
pub const WRITER_REFRESH_AFTER: Duration = Duration::from_secs(3600);

/// The shortest grace period the GC accepts without `force`: twice what writers assume, so a
/// writer slow to refresh (it does so on its next write or FLUSH) still has an hour.
pub const MIN_GRACE: Duration = Duration::from_secs(2 * 3600);

/// How long a writer's look at the sweep lease lets it upload: a GC waits this long after taking
/// the lease before it looks at the objects again, so no upload allowed before is still under way.
pub const UPLOAD_PERMIT: Duration = Duration::from_secs(10);

/// [`UPLOAD_PERMIT`] in milliseconds; tests shorten it for the whole process, writers and GC alike.
static UPLOAD_PERMIT_MS: AtomicU64 = AtomicU64::new(UPLOAD_PERMIT.as_millis() as u64);

fn upload_permit() -> Duration {
    Duration::from_millis(UPLOAD_PERMIT_MS.load(Ordering::Relaxed))
}

/// Shortens upload permits, and so the GC's wait, for tests with tiny grace periods.
#[cfg(test)]
fn set_upload_permit(permit: Duration) {
    UPLOAD_PERMIT_MS.store(permit.as_millis() as u64, Ordering::Relaxed);
}

/// How long a GC's sweep lease lasts: writers that need to upload wait for its end at most this
/// long, and the sweep stops deleting [`UPLOAD_PERMIT`] before it.
pub const SWEEP_LEASE: Duration = Duration::from_secs(300);

/// The sweep lease: present while a GC deletes; writers upload nothing while it is.
const SWEEP_KEY: &str = "cas/gc/sweeping";

/// Keys deleted per request (the S3 DeleteObjects limit).
const DELETE_BATCH: usize = 1000;

/// How a GC runs.
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Unreferenced objects modified less than this long ago are kept.
    pub grace: Duration,
    /// Find what would be freed, delete nothing.
    pub dry_run: bool,
    /// Accept a grace period shorter than [`MIN_GRACE`] (tests; an operator who knows no writer
    /// is running).
    pub force: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { grace: DEFAULT_GRACE, dry_run: false, force: false }
    }
}

/// What a GC found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks and pages listed.
    pub listed_objects: u64,
    /// Their bytes.
    pub listed_bytes: u64,
    /// Unreferenced objects deleted (or, in a dry run, that would be).
    pub freed_objects: u64,
    /// Their bytes.
    pub freed_bytes: u64,
    /// Unreferenced objects kept because they are younger than the grace period.
    pub young_objects: u64,
    /// Their bytes.
    pub young_bytes: u64,
    /// Chunks some head or snapshot references.
    pub live_chunks: u64,
    /// Their bytes: what the bucket stores for all exports and snapshots after dedup.
    pub live_chunk_bytes: u64,
    /// Pages some head or snapshot references.
    pub live_pages: u64,
    /// Their bytes.
    pub live_page_bytes: u64,
}

/// Where a GC is, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcPhase {
    /// Listing chunks and pages; `done` counts objects listed, `total` is not known (0).
    Listing,
    /// Walking maps; `done` counts pages read, `total` is not known (0).
    Marking,
    /// Deleting; `done` of `total` objects.
    Deleting,
}

/// An object listed in step 1 that is old enough to be freed if nothing references it.
struct Candidate {
    hash: Hash,
    page: bool,
    size: u64,
}

impl Candidate {
    fn key(&self) -> String {
        if self.page {
            page_key(&self.hash)
        } else {
            chunk_key(&self.hash)
        }
    }
}

/// Which of the GC's safety rules are followed: all of them, except in the tests that show each
/// one is needed.
#[derive(Clone, Copy, Debug)]
struct Rules {
    /// Keep unreferenced objects younger than the grace period.
    grace: bool,
    /// List the candidates before reading heads and snapshot records.
    list_first: bool,
    /// Take the sweep lease, wait out the writers' permits, and look again before deleting.
    lease: bool,
}

const ALL_RULES: Rules = Rules { grace: true, list_first: true, lease: true };

/// Frees the chunks and pages of `store` that no head and no snapshot record references and that
/// were modified more than `options.grace` ago, calling `progress(phase, done, total)` as it goes.
///
/// # Errors
/// [`Error::Config`] for a grace period shorter than [`MIN_GRACE`] without `force`; store
/// failures; a head, snapshot record or map page that cannot be read or decoded (named), in which
/// case nothing is deleted. A failure while deleting leaves some of the garbage in place, which a
/// later GC frees.
pub fn gc(
    store: &dyn ObjectStore,
    options: &GcOptions,
    progress: &mut dyn FnMut(GcPhase, u64, u64),
) -> Result<GcReport> {
    if options.grace < MIN_GRACE && !options.force {
        return Err(Error::config(
            "grace",
            format!(
                "a grace period of {}s is shorter than the {}s the GC needs to be sure running writers' uncommitted uploads are safe; pass force if no writer is running",
                options.grace.as_secs_f64(),
                MIN_GRACE.as_secs()
            ),
        ));
    }
    collect(store, options, ALL_RULES, progress)
}

/// The bytes of the chunks that some head or snapshot references: what all exports and snapshots
/// of `store` take after dedup (pages not counted). Deletes nothing.
///
/// # Errors
/// As [`gc`], which this is without the sweep.
pub fn stored_bytes(store: &dyn ObjectStore) -> Result<u64> {
    let options = GcOptions { dry_run: true, ..GcOptions::default() };
    Ok(collect(store, &options, ALL_RULES, &mut |_, _, _| {})?.live_chunk_bytes)
}

fn collect(
    store: &dyn ObjectStore,
    options: &GcOptions,
    rules: Rules,
    progress: &mut dyn FnMut(GcPhase, u64, u64),
) -> Result<GcReport> {
    let mut marked = Marked::default();
    if !rules.list_first {
        marked.mark_records(store, progress)?;
    }
    let started = SystemTime::now();
    let cutoff =
        if rules.grace { started.checked_sub(options.grace).unwrap_or(SystemTime::UNIX_EPOCH) } else { started };
    let mut report = GcReport::default();
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut all_listed = Vec::new();
    for (kind, page) in [("chunks/", false), ("pages/", true)] {
        let prefix = format!("{CAS_PREFIX}{kind}");
        store.list(&prefix, None, &mut |Listed { key, size, modified }| {
            // Keys that are not `{h0h1}/{hash}` were not written by nbds3: left alone.
            let Some(hash) = key.rsplit('/').next().and_then(Hash::parse_hex) else { return true };
            report.listed_objects += 1;
            report.listed_bytes += size;
            all_listed.push((hash, page, size));
            if modified <= cutoff {
                candidates.push(Candidate { hash, page, size });
            }
            progress(GcPhase::Listing, report.listed_objects, 0);
            true
        })?;
    }
    if rules.list_first {
        marked.mark_twice(store, progress)?;
    }
    for (hash, page, size) in all_listed {
        match (marked.has(&Candidate { hash, page, size }), page) {
            (true, false) => {
                (report.live_chunks, report.live_chunk_bytes) = (report.live_chunks + 1, report.live_chunk_bytes + size)
            }
            (true, true) => {
                (report.live_pages, report.live_page_bytes) = (report.live_pages + 1, report.live_page_bytes + size)
            }
            (false, _) => {
                (report.young_objects, report.young_bytes) = (report.young_objects + 1, report.young_bytes + size)
            }
        }
    }
    let mut garbage: Vec<Candidate> = candidates.into_iter().filter(|c| !marked.has(c)).collect();
    let count = |garbage: &[Candidate]| (garbage.len() as u64, garbage.iter().map(|c| c.size).sum::<u64>());
    (report.freed_objects, report.freed_bytes) = count(&garbage);
    if !options.dry_run && !garbage.is_empty() {
        let lease = SweepLease::take(store)?;
        let swept = sweep(store, rules, &lease, &mut marked, &mut garbage, cutoff, progress);
        lease.release(store);
        swept?;
        (report.freed_objects, report.freed_bytes) = count(&garbage);
        log::info!("{store}: gc freed {} objects ({} bytes)", report.freed_objects, report.freed_bytes);
    }
    report.young_objects -= report.freed_objects;
    report.young_bytes -= report.freed_bytes;
    Ok(report)
}

/// Holding the sweep lease: waits out the upload permits writers got before it, drops from
/// `garbage` what was written since the listing or is referenced now, and deletes the rest.
/// Once the permits are over, nothing uploads and no snapshot or clone is made until the lease
/// is released, so the second look is the last word.
fn sweep(
    store: &dyn ObjectStore,
    rules: Rules,
    lease: &SweepLease,
    marked: &mut Marked,
    garbage: &mut Vec<Candidate>,
    cutoff: SystemTime,
    progress: &mut dyn FnMut(GcPhase, u64, u64),
) -> Result<()> {
    if rules.lease {
        std::thread::sleep(upload_permit());
        let mut unchanged = HashSet::new();
        for prefix in ["chunks/", "pages/"] {
            store.list(&format!("{CAS_PREFIX}{prefix}"), None, &mut |listed| {
                if listed.modified <= cutoff {
                    unchanged.insert(listed.key);
                }
                true
            })?;
        }
        garbage.retain(|c| unchanged.contains(&c.key()));
        marked.mark_records(store, progress)?;
        garbage.retain(|c| !marked.has(c));
    }
    let total = garbage.len() as u64;
    progress(GcPhase::Deleting, 0, total);
    let mut done = 0;
    let deadline = || lease.deadline(store);
    for batch in garbage.chunks(DELETE_BATCH) {
        let keys: Vec<String> = batch.iter().map(Candidate::key).collect();
        store.delete(&keys, Some(&deadline))?;
        done += keys.len() as u64;
        progress(GcPhase::Deleting, done, total);
    }
    store.sync()
}

/// A GC's hold on [`SWEEP_KEY`].
struct SweepLease {
    /// Deletes are sent only before this: an upload permit before the lease's end.
    deletes_until: Instant,
}

impl SweepLease {
    /// Takes the sweep lease, replacing one that has ended (a GC that died).
    fn take(store: &dyn ObjectStore) -> Result<Self> {
        let now_ms = crate::unix_nanos() / 1_000_000;
        let until_ms = now_ms + SWEEP_LEASE.as_millis();
        let text = format!("nbds3-cas-sweep 1\nuntil-ms={until_ms}\n");
        let condition = match store.get(SWEEP_KEY, MAX_RECORD_BYTES)? {
            None => None,
            Some(held) => match sweep_until_ms(&held.bytes) {
                Some(until) if until > now_ms => {
                    return Err(Error::config(
                        "gc",
                        format!("another GC is deleting ({SWEEP_KEY} is held for {} s more)", (until - now_ms) / 1000),
                    ))
                }
                _ => Some(held.version),
            },
        };
        let put = match &condition {
            None => Put::IfAbsent,
            Some(version) => Put::IfVersion(version),
        };
        let started = Instant::now();
        store
            .put(SWEEP_KEY, text.as_bytes(), put, None)?
            .ok_or_else(|| Error::config("gc", format!("another GC took {SWEEP_KEY} at the same time")))?;
        Ok(SweepLease { deletes_until: started + SWEEP_LEASE.saturating_sub(upload_permit()) })
    }

    /// The fence of the sweep's deletes.
    fn deadline(&self, store: &dyn ObjectStore) -> Result<Instant> {
        if Instant::now() < self.deletes_until {
            return Ok(self.deletes_until);
        }
        Err(Error::Timeout {
            store: store.to_string(),
            message: format!("the GC's sweep lease {SWEEP_KEY} ran out; run gc again to delete the rest"),
        })
    }

    /// Gives the lease back, so writers wait no longer; if that fails they wait for its end.
    fn release(self, store: &dyn ObjectStore) {
        if let Err(e) = store.delete(&[SWEEP_KEY.to_string()], None) {
            log::warn!("{store}: releasing {SWEEP_KEY}: {e}; writers wait until it ends");
        }
    }
}

/// When a sweep lease ends, in Unix milliseconds; `None` for one this binary cannot read (then it
/// counts as ended, so a stray object cannot block writers for ever).
fn sweep_until_ms(bytes: &[u8]) -> Option<u128> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.lines().find_map(|l| l.strip_prefix("until-ms="))?.parse().ok()
}

/// The writers' side of the sweep lease: permits to upload, each good until a deadline, given
/// while no GC sweeps. Every PUT of a chunk or page, and every snapshot or clone (from reading
/// its source to writing its record), runs under one.
#[derive(Debug, Default)]
pub struct UploadGate {
    /// The deadline of the last permit, reused while it has at least half its period left.
    permit: Mutex<Option<Instant>>,
}

impl UploadGate {
    /// A deadline before which an upload may be sent, waiting while a GC sweeps.
    ///
    /// # Errors
    /// Store failures reading the lease.
    pub fn permit(&self, store: &dyn ObjectStore) -> Result<Instant> {
        let period = upload_permit();
        // Held while the lease is read, so that uploaders whose permit ran out together wait
        // for one read and share its answer, rather than each reading the lease.
        let mut permit = lock(&self.permit);
        if let Some(until) = *permit {
            if until.checked_duration_since(Instant::now()).is_some_and(|left| left > period / 2) {
                return Ok(until);
            }
        }
        loop {
            let asked = Instant::now();
            let held = store.get(SWEEP_KEY, MAX_RECORD_BYTES)?.and_then(|held| sweep_until_ms(&held.bytes));
            let now_ms = crate::unix_nanos() / 1_000_000;
            match held {
                Some(until) if until > now_ms => {
                    let left = Duration::from_millis(u64::try_from(until - now_ms).unwrap_or(u64::MAX));
                    log::debug!("{store}: a GC is deleting; uploads wait for it");
                    std::thread::sleep(left.min(period / 4).max(Duration::from_millis(1)));
                }
                _ => {
                    let until = asked + period;
                    *permit = Some(until);
                    return Ok(until);
                }
            }
        }
    }

    /// A fence for one upload under `permit`: refused once it has passed.
    pub fn check(store: &dyn ObjectStore, permit: Instant) -> Result<Instant> {
        if Instant::now() < permit {
            return Ok(permit);
        }
        Err(Error::Timeout {
            store: store.to_string(),
            message: "an upload's permit (see the GC's sweep lease) ran out before it could be sent; try again".into(),
        })
    }
}

/// What the heads and snapshot records read so far reference.
#[derive(Default)]
struct Marked {
    pages: HashSet<Hash>,
    chunks: HashSet<Hash>,
    pages_read: u64,
}

impl Marked {
    fn has(&self, c: &Candidate) -> bool {
        if c.page {
            self.pages.contains(&c.hash)
        } else {
            self.chunks.contains(&c.hash)
        }
    }

    /// Marks what the heads and snapshot records reference, reading them twice: a snapshot
    /// taken, or a clone made, while the first pass ran may hold a root whose old head or
    /// snapshot the first pass read after it had moved on.
    fn mark_twice(&mut self, store: &dyn ObjectStore, progress: &mut dyn FnMut(GcPhase, u64, u64)) -> Result<()> {
        self.mark_records(store, progress)?;
        self.mark_records(store, progress)
    }

    /// Reads every head and snapshot record and marks what their maps reach.
    fn mark_records(&mut self, store: &dyn ObjectStore, progress: &mut dyn FnMut(GcPhase, u64, u64)) -> Result<()> {
        let mut roots = Vec::new();
        for (kind, snapshot) in [("heads/", false), ("snapshots/", true)] {
            let mut keys = Vec::new();
            store.list(&format!("{CAS_PREFIX}{kind}"), None, &mut |listed| {
                keys.push(listed.key);
                true
            })?;
            for key in keys {
                // Gone since the listing: deleted, so nothing to keep for it.
                let Some(object) = store.get(&key, MAX_RECORD_BYTES)? else { continue };
                let why = |e: Error| Error::backend(store, format!("gc stopped, nothing deleted: {e}"));
                roots.push(if snapshot {
                    SnapshotRecord::decode(store, &key, &object.bytes).map_err(why)?.root
                } else {
                    Head::decode(store, &key, &object.bytes).map_err(why)?.root
                });
            }
        }
        for root in roots {
            self.mark_map(store, &root, progress)?;
        }
        Ok(())
    }

    /// Marks every page and chunk of the map under `root`, skipping subtrees already marked, and
    /// the chunks of its delta (which may also shadow some of the tree's: those are kept too, as
    /// the tree names them).
    fn mark_map(
        &mut self,
        store: &dyn ObjectStore,
        root: &Root,
        progress: &mut dyn FnMut(GcPhase, u64, u64),
    ) -> Result<()> {
        self.chunks.extend(root.delta.entries().filter_map(|(_, chunk)| chunk));
        let Some(top) = root.page else { return Ok(()) };
        let mut stack = vec![(top, root.depth - 1)];
        while let Some((hash, level)) = stack.pop() {
            if !self.pages.insert(hash) {
                continue;
            }
            let page = fetch_page(store, &hash, level)
                .map_err(|e| Error::backend(store, format!("gc stopped, nothing deleted: {e}")))?;
            self.pages_read += 1;
            progress(GcPhase::Marking, self.pages_read, 0);
            for entry in page.entries.values() {
                match entry {
                    Entry::Chunk(chunk) => {
                        self.chunks.insert(*chunk);
                    }
                    Entry::Page(child) => stack.push((*child, level.saturating_sub(1))),
                }
            }
        }
        Ok(())
    }
}

/// Uploads again every page and chunk of the tree of `new` that the tree of `old` does not have at
/// the same place, and every chunk of `new`'s delta that `old`'s delta does not hold (what a
/// writer has stored since its last commit), so that their modified times are recent: a writer
/// calls it before its uncommitted uploads are [`WRITER_REFRESH_AFTER`] old. Reads cost one GET a
/// changed page and chunk, plus the PUT.
///
/// # Errors
/// Store failures; an object that is missing (a GC ran with a grace period shorter than the
/// writer's rule) or fails its hash, named.
pub(crate) fn refresh_uncommitted(
    store: &dyn ObjectStore,
    old: &Root,
    new: &Root,
    block_size: usize,
    fence: Fence<'_>,
) -> Result<u64> {
    let mut refreshed = 0;
    let mut buf = BlockBuf::zeroed(block_size);
    let committed: HashSet<Hash> = old.delta.entries().filter_map(|(_, chunk)| chunk).collect();
    let mut delta_chunks: Vec<Hash> =
        new.delta.entries().filter_map(|(_, chunk)| chunk).filter(|c| !committed.contains(c)).collect();
    delta_chunks.sort_unstable();
    delta_chunks.dedup();
    for chunk in &delta_chunks {
        refresh_chunk(store, chunk, &mut buf, fence)?;
        refreshed += 1;
    }
    let Some(top) = new.page else { return Ok(refreshed) };
    let old_top = old.page.map(|h| (h, old.depth - 1));
    let mut stack = vec![(old_top, top, new.depth - 1)];
    while let Some((old_node, hash, level)) = stack.pop() {
        if old_node == Some((hash, level)) {
            continue;
        }
        let page = fetch_page(store, &hash, level)?;
        store.put(&page_key(&hash), &page.encode(), Put::Always, Some(fence))?;
        refreshed += 1;
        // The old map, seen at this level: its page here, or, when it is shallower, its whole
        // tree as slot 0.
        let old_entries = match old_node {
            Some((h, l)) if l == level => fetch_page(store, &h, level)?.entries,
            Some((h, _)) => [(0, Entry::Page(h))].into(),
            None => Default::default(),
        };
        for (slot, entry) in &page.entries {
            let before = old_entries.get(slot);
            if before == Some(entry) && level == old_node.map_or(level, |(_, l)| l) {
                continue;
            }
            match entry {
                Entry::Chunk(chunk) => {
                    refresh_chunk(store, chunk, &mut buf, fence)?;
                    refreshed += 1;
                }
                Entry::Page(child) => {
                    let below = match before {
                        Some(Entry::Page(h)) => Some((*h, level - 1)),
                        _ => None,
                    };
                    let below = match old_node {
                        Some((h, l)) if l < level && *slot == 0 => Some((h, l)),
                        _ => below,
                    };
                    stack.push((below, *child, level - 1));
                }
            }
        }
    }
    Ok(refreshed)
}

/// Reads chunk `chunk` and uploads it again.
fn refresh_chunk(store: &dyn ObjectStore, chunk: &Hash, buf: &mut BlockBuf, fence: Fence<'_>) -> Result<()> {
    let key = chunk_key(chunk);
    let lost = |what: &str| {
        Error::backend(store, format!("uncommitted chunk {key} {what} before this writer could refresh it"))
    };
    match store.read_into(&key, None, buf)? {
        ReadInto::Filled if Hash::of(buf) == *chunk => {}
        ReadInto::Missing => return Err(lost("was deleted (by a GC with a short grace period?)")),
        _ => return Err(lost("changed")),
    }
    store.put(&key, buf, Put::Always, Some(fence))?;
    Ok(())
}

#[cfg(test)]
mod tests;
