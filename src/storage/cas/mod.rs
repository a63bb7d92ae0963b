//! The `cas` layout: an export's blocks as content-addressed chunks under a block map of
//! immutable pages, committed atomically at each FLUSH by a conditional write of the export's
//! head (format: docs/CAS-FORMAT.md).
//!
//! Why: a map of immutable, hash-named pages makes a snapshot one small record, a clone one new
//! head, a diff a walk that skips equal subtrees, and identical blocks one object; committing
//! the whole map with one `If-Match` write makes FLUSH atomic and fences a second writer.
//!
//! Why a delta: blocks written since the last fold are kept in an in-memory overlay and carried
//! inline in the head (format version 2), not in tree pages, so a FLUSH of scattered writes PUTs
//! their chunks and one head, not a leaf page and its ancestors per block. When the overlay
//! holds more than [`CasConfig::delta_entries`] blocks it is folded into the tree: applied to the
//! working tree's pages, which are stored at once, and emptied; the next FLUSH commits the new
//! tree with the (small) new delta.
//!
//! | object state | how it gets there | who may rely on it |
//! |---|---|---|
//! | chunk uploaded | `write_block` PUTs it before the map names it | the overlay |
//! | overlay entry | `write_block`/`delete_block` after the upload | reads of this store |
//! | page pending | frozen at FLUSH or at a fold (or when too many pages changed), not yet stored | reads of this store |
//! | page stored | its PUT returned | a head may name it |
//! | committed | the head naming the root and the overlay as its delta landed with `If-Match` | every reader, after a crash |
//!
//! A head write refused by its condition means another writer committed since this store read
//! the head (unless the head found is this writer's own, from a commit whose answer was lost):
//! this store then fails every later write and flush, naming what happened, so the two writers'
//! states never mix.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

use super::objects::{ObjectStore, Put, ReadInto};
use super::{check_len, BlockBuf, BlockId, Capabilities, Storage};
use crate::{lock, Error, ExportName, Result};

pub mod format;
pub mod gc;
mod map;
pub mod ops;
pub mod stream;
pub mod usage;

use format::{
    chunk_key, head_key, page_key, Delta, Hash, Head, Page, Root, MAX_DELTA_ENTRIES, MAX_PAGE_BYTES, MAX_RECORD_BYTES,
};
use map::{Step, WorkingMap};

/// Limits of a [`CasStorage`]'s memory.
#[derive(Clone, Copy, Debug)]
pub struct CasConfig {
    /// Clean map pages kept decoded (each at most ~36 KiB, most far smaller).
    pub cached_pages: usize,
    /// Changed pages kept before they are frozen and stored ahead of the next FLUSH.
    pub max_dirty_pages: usize,
    /// Blocks changed since the last fold kept in the overlay (and committed as the head's
    /// delta, about 82 bytes each) before they are folded into the tree's pages; at most
    /// [`MAX_DELTA_ENTRIES`] / 2. With 0, every write goes to the tree, as in format version 1.
    /// Writes racing a fold may take the overlay, and so the delta a FLUSH racing them commits,
    /// up to twice this (at least 2): then writes of further blocks wait for the fold.
    pub delta_entries: usize,
    /// Open for writing even where the store cannot make conditional writes, so that a second
    /// writer would not be fenced (the operator's opt-in).
    pub allow_unconditional: bool,
    /// How old uncommitted uploads may get before this writer uploads them again, so that a GC
    /// never finds one older than its grace period ([`gc::WRITER_REFRESH_AFTER`]).
    pub refresh_uncommitted_after: Duration,
}

impl Default for CasConfig {
    fn default() -> Self {
        CasConfig {
            cached_pages: 2048,
            max_dirty_pages: 256,
            delta_entries: DEFAULT_DELTA_ENTRIES,
            allow_unconditional: false,
            refresh_uncommitted_after: gc::WRITER_REFRESH_AFTER,
        }
    }
}

/// The default [`CasConfig::delta_entries`]. Each FLUSH PUTs the whole delta in its head: 1024
/// entries are a head of about 84 KiB, one request however many bytes, where the tree would have
/// stored up to a leaf page and its ancestors per scattered block. A fold, once per 1024 changed
/// blocks, stores the pages the FLUSHes since did not.
pub const DEFAULT_DELTA_ENTRIES: usize = 1024;

/// Hashes remembered as uploaded since the last commit, at most: past this the set is forgotten
/// and a repeated block is uploaded again, which is only slower.
const MAX_UPLOADED_REMEMBERED: usize = 65536;

/// Map pages stored at once by a flush.
const PARALLEL_PAGE_PUTS: usize = 8;

/// What this store last committed, or found at open.
#[derive(Clone, Debug)]
struct Committed {
    root: Root,
    generation: u64,
    /// The head's version, for `If-Match`; `None` when the export has no head yet.
    version: Option<String>,
}

/// A frozen page not yet known to be stored.
#[derive(Debug)]
struct PendingPage {
    hash: Hash,
    page: Arc<Page>,
    bytes: Arc<Vec<u8>>,
}

/// Everything behind the store's one lock.
#[derive(Debug)]
struct State {
    /// The tree: its frozen base and the pages changed since.
    map: WorkingMap,
    /// Blocks changed since the last fold, over `map`: what the next commit's delta holds.
    overlay: BTreeMap<u64, Option<Hash>>,
    /// Clean pages by hash.
    cache: LruCache<Hash, Arc<Page>>,
    /// Frozen pages not yet known to be stored; never evicted.
    pending: Vec<PendingPage>,
    committed: Committed,
    /// Chunks uploaded since the last commit (see docs/CAS-FORMAT.md, "Skipping uploads").
    uploaded: HashSet<Hash>,
    /// Why this store may no longer write, once another writer has committed over it.
    fenced: Option<String>,
    /// No chunk or page this store still needs uncommitted was uploaded before this instant
    /// (see [`CasStorage::refresh_if_due`]); `None` while there is none.
    uncommitted_since: Option<Instant>,
}

/// Whether the store serves the live export or one of its snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Head,
    Snapshot(ExportName),
}

/// An export's blocks in the `cas` layout on an [`ObjectStore`].
pub struct CasStorage {
    store: Arc<dyn ObjectStore>,
    export: ExportName,
    source: Source,
    block_size: usize,
    config: CasConfig,
    /// Unique per open: goes into every head this store writes.
    writer: String,
    state: Mutex<State>,
    /// Held by a flush, a fold or a spill of changed pages from start to end, so they never
    /// overlap.
    flushing: Mutex<()>,
    /// Permits for uploads, which wait while a GC deletes (docs/CAS-FORMAT.md, "Garbage
    /// collection").
    uploads: gc::UploadGate,
}

impl fmt::Debug for CasStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CasStorage").field("export", &self.export).field("store", &self.store.to_string()).finish()
    }
}

impl fmt::Display for CasStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Head => write!(f, "CasStorage({}, {})", self.export, self.store),
            Source::Snapshot(snap) => write!(f, "CasStorage({}@{snap}, {})", self.export, self.store),
        }
    }
}

/// A name for this open that no other process or open shares.
fn writer_identity() -> String {
    static OPENS: AtomicU64 = AtomicU64::new(0);
    format!("{}-{:x}-{}", std::process::id(), crate::unix_nanos(), OPENS.fetch_add(1, Ordering::Relaxed))
}

/// Reads and checks the page named `hash` at `level`.
pub(crate) fn fetch_page(store: &dyn ObjectStore, hash: &Hash, level: u8) -> Result<Page> {
    let key = page_key(hash);
    let object = store
        .get(&key, MAX_PAGE_BYTES)?
        .ok_or_else(|| Error::backend(store, format!("map page {key} is missing (the map names it)")))?;
    Page::decode(store, &key, &object.bytes, hash, level)
}

/// Reads an export's head, with its version.
pub(crate) fn read_head(store: &dyn ObjectStore, export: &ExportName) -> Result<Option<(Head, String)>> {
    let key = head_key(export);
    match store.get(&key, MAX_RECORD_BYTES)? {
        None => Ok(None),
        Some(object) => Ok(Some((Head::decode(store, &key, &object.bytes)?, object.version))),
    }
}

/// Why cas export `export` may not be written on `store`, or `None` where it may: a store that
/// ignores conditional writes could neither fence a second writer nor make FLUSH atomic.
/// Reading needs neither, so read-only opens skip this.
///
/// # Errors
/// Store failures while finding out what the store honours.
pub fn unfenced_writes(store: &dyn ObjectStore, export: &ExportName) -> Result<Option<String>> {
    Ok((!store.conditional_writes()?).then(|| {
        format!(
            "{store} does not honour conditional writes, so a second writer of cas export {export} could not be fenced and FLUSH would not be atomic; serve it from a server that honours If-Match and If-None-Match, open it read-only (nbdkit -r), or accept that risk with nbdkit's cas-unconditional=true"
        )
    }))
}

impl CasStorage {
    /// Opens the live export `export` for reading and writing: one GET of its head (none yet is
    /// an all-zero device), and a conditional-writes check unless `config` opts out.
    ///
    /// # Errors
    /// Store failures; a head that fails its checks or records another block size; a store
    /// without conditional writes, unless `config.allow_unconditional`.
    pub fn open(
        store: Arc<dyn ObjectStore>,
        export: &ExportName,
        block_size: usize,
        config: CasConfig,
    ) -> Result<Self> {
        if !config.allow_unconditional {
            if let Some(why) = unfenced_writes(&*store, export)? {
                return Err(Error::config("layout", why));
            }
        }
        let committed = match read_head(&*store, export)? {
            None => Committed { root: Root::EMPTY, generation: 0, version: None },
            Some((head, version)) => {
                if head.block_size != block_size {
                    return Err(Error::backend(
                        &store,
                        format!(
                            "{}: block size {} where the export's record says {block_size}",
                            head_key(export),
                            head.block_size
                        ),
                    ));
                }
                Committed { root: head.root, generation: head.generation, version: Some(version) }
            }
        };
        Ok(Self::with_root(store, export, Source::Head, block_size, config, committed))
    }

    /// Opens snapshot `snap` of `export`, read-only: one GET of its record.
    ///
    /// # Errors
    /// Store failures, a missing snapshot, a record that fails its checks or has another block
    /// size.
    pub fn open_snapshot(
        store: Arc<dyn ObjectStore>,
        export: &ExportName,
        snap: &ExportName,
        block_size: usize,
    ) -> Result<Self> {
        let record = ops::read_snapshot(&*store, export, snap)?;
        if record.block_size != block_size {
            return Err(Error::backend(
                &store,
                format!("snapshot {export}@{snap} has block size {}, not {block_size}", record.block_size),
            ));
        }
        let committed = Committed { root: record.root.clone(), generation: record.generation, version: None };
        Ok(Self::with_root(store, export, Source::Snapshot(snap.clone()), block_size, CasConfig::default(), committed))
    }

    fn with_root(
        store: Arc<dyn ObjectStore>,
        export: &ExportName,
        source: Source,
        block_size: usize,
        mut config: CasConfig,
        committed: Committed,
    ) -> Self {
        config.delta_entries = config.delta_entries.min(MAX_DELTA_ENTRIES / 2);
        let cache_size = std::num::NonZeroUsize::new(config.cached_pages.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        let state = State {
            map: WorkingMap::new(&committed.root),
            overlay: committed.root.delta.entries().collect(),
            cache: LruCache::new(cache_size),
            pending: Vec::new(),
            committed,
            uploaded: HashSet::new(),
            fenced: None,
            uncommitted_since: None,
        };
        CasStorage {
            store,
            export: export.clone(),
            source,
            block_size,
            config,
            writer: writer_identity(),
            state: Mutex::new(state),
            flushing: Mutex::new(()),
            uploads: gc::UploadGate::default(),
        }
    }

    /// The map this store last committed (or opened).
    pub fn committed_root(&self) -> Root {
        lock(&self.state).committed.root.clone()
    }

    /// Runs `step` on the working map until it needs no page it does not have, loading the
    /// pages it asks for without holding the lock. The pages loaded are kept for the whole
    /// operation too, so a cache smaller than the map's depth still makes progress.
    fn with_pages<T>(
        &self,
        mut step: impl FnMut(&mut WorkingMap, &mut dyn FnMut(&Hash) -> Option<Arc<Page>>) -> Step<T>,
    ) -> Result<T> {
        let mut loaded: Vec<(Hash, Arc<Page>)> = Vec::new();
        loop {
            // Bound first, so the lock is released before a page is loaded.
            let next = {
                let mut st = lock(&self.state);
                let State { map, cache, pending, .. } = &mut *st;
                step(map, &mut |h| {
                    clean(cache, pending, h).or_else(|| loaded.iter().find(|(l, _)| l == h).map(|(_, p)| p.clone()))
                })
            };
            match next {
                Step::Done(t) => return Ok(t),
                Step::Need(hash, level) => {
                    let page = Arc::new(fetch_page(&*self.store, &hash, level)?);
                    lock(&self.state).cache.put(hash, page.clone());
                    loaded.push((hash, page));
                }
            }
        }
    }

    /// The chunk of block `id` in the working map: the overlay's entry, else the tree's.
    /// A fold writes an entry into the tree before it leaves the overlay, so a block missing
    /// from the overlay is in the tree.
    fn find(&self, id: BlockId) -> Result<Option<Hash>> {
        if let Some(&chunk) = lock(&self.state).overlay.get(&id.0) {
            return Ok(chunk);
        }
        self.with_pages(|map, clean| map.find(id, clean))
    }

    /// Makes block `id` point at `chunk` (or a hole) in the overlay, folding it into the tree
    /// once it holds more than `delta_entries` blocks. Only the write that finds no fold or
    /// flush under way folds; the others go on, so a fold's page uploads stall no write, until
    /// the overlay holds twice its limit: a write of a block not in it then waits for the fold
    /// and folds itself if need be. So the overlay, and with it a FLUSH's delta, stays within
    /// [`MAX_DELTA_ENTRIES`] and memory stays bounded even while folds keep failing.
    fn set(&self, id: BlockId, chunk: Option<Hash>) -> Result<()> {
        let cap = 2 * self.config.delta_entries.max(1);
        loop {
            let len = {
                let mut st = lock(&self.state);
                (st.overlay.len() < cap || st.overlay.contains_key(&id.0)).then(|| {
                    st.overlay.insert(id.0, chunk);
                    st.overlay.len()
                })
            };
            match len {
                Some(len) if len <= self.config.delta_entries => return Ok(()),
                Some(_) => {
                    let _flushing = match self.flushing.try_lock() {
                        Ok(held) => held,
                        Err(std::sync::TryLockError::Poisoned(held)) => held.into_inner(),
                        Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
                    };
                    return self.fold_if_full();
                }
                None => {
                    let _flushing = lock(&self.flushing);
                    self.fold_if_full()?;
                }
            }
        }
    }

    /// With `flushing` held: folds the overlay into the tree if it holds more than
    /// `delta_entries` blocks (a fold by another thread may have emptied it meanwhile). Its
    /// entries stay in the overlay until the tree has them and its pages are stored, so a
    /// read or a FLUSH meanwhile sees the same blocks; an entry written again meanwhile stays.
    fn fold_if_full(&self) -> Result<()> {
        let entries = {
            let st = lock(&self.state);
            if st.overlay.len() <= self.config.delta_entries {
                return Ok(());
            }
            st.overlay.clone()
        };
        log::debug!("{self}: folding {} changed blocks into the map's pages", entries.len());
        for (&id, &chunk) in &entries {
            self.with_pages(|map, clean| map.set(BlockId(id), chunk, clean))?;
            if lock(&self.state).map.dirty_pages() > self.config.max_dirty_pages {
                self.store_changed_pages()?;
            }
        }
        // Stored now, so the next FLUSH need not; with no delta (a fold at every write), they wait
        // for the FLUSH as the tree's pages always did.
        if self.config.delta_entries > 0 {
            self.store_changed_pages()?;
        }
        let mut st = lock(&self.state);
        for (id, chunk) in entries {
            if st.overlay.get(&id) == Some(&chunk) {
                st.overlay.remove(&id);
            }
        }
        Ok(())
    }

    /// Refuses writes to snapshots and by a store another writer has fenced.
    fn check_writable(&self) -> Result<()> {
        if let Source::Snapshot(snap) = &self.source {
            return Err(Error::backend(
                self,
                format!("snapshot {}@{snap} is read-only; clone it to write", self.export),
            ));
        }
        match &lock(&self.state).fenced {
            Some(why) => Err(Error::backend(self, why)),
            None => Ok(()),
        }
    }

    /// Freezes the changed pages and stores every pending page; returns the frozen tree with the
    /// overlay as of the freeze as its delta.
    fn store_changed_pages(&self) -> Result<Root> {
        let (root, pending) = {
            let mut st = lock(&self.state);
            for (hash, page, bytes) in st.map.freeze() {
                st.pending.push(PendingPage { hash, page, bytes: Arc::new(bytes) });
            }
            if !st.pending.is_empty() {
                st.uncommitted_since.get_or_insert_with(Instant::now);
            }
            let root = Root { delta: Delta::new(st.overlay.clone()), ..st.map.base.clone() };
            (root, st.pending.iter().map(|p| (p.hash, p.bytes.clone())).collect::<Vec<_>>())
        };
        let stored = self.put_pages(&pending);
        let mut st = lock(&self.state);
        let State { pending, cache, .. } = &mut *st;
        pending.retain(|p| {
            let done = stored.contains(&p.hash);
            if done {
                cache.put(p.hash, p.page.clone());
            }
            !done
        });
        if pending.is_empty() {
            Ok(root)
        } else {
            Err(Error::backend(self, format!("{} map pages could not be stored; FLUSH again to retry", pending.len())))
        }
    }

    /// PUTs pages a few at a time, each under an upload permit (see [`gc`]); returns the ones
    /// stored. A worker thread that cannot start (or dies) only leaves its pages unstored, for the
    /// next FLUSH to retry.
    fn put_pages(&self, pages: &[(Hash, Arc<Vec<u8>>)]) -> Vec<Hash> {
        let put = |part: &[(Hash, Arc<Vec<u8>>)]| -> Vec<Hash> {
            let permit = || self.upload_permit();
            let stored = part.iter().filter(|(hash, bytes)| {
                match self.store.put(&page_key(hash), bytes, Put::Always, Some(&permit)) {
                    Ok(_) => true,
                    Err(e) => {
                        log::warn!("{self}: storing map page {}: {e}", page_key(hash));
                        false
                    }
                }
            });
            stored.map(|(hash, _)| *hash).collect()
        };
        if pages.len() <= 1 {
            return put(pages);
        }
        let per_thread = pages.len().div_ceil(PARALLEL_PAGE_PUTS);
        std::thread::scope(|s| {
            let workers: Vec<_> = pages
                .chunks(per_thread)
                .filter_map(|part| {
                    std::thread::Builder::new().name("nbds3-cas-pages".into()).spawn_scoped(s, move || put(part)).ok()
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
        })
    }

    /// Uploads again what this writer stored since its last commit once the oldest of it is
    /// `refresh_uncommitted_after` old, so a GC, which frees only objects older than its grace
    /// period, never frees an upload this writer will still commit (docs/CAS-FORMAT.md, "Garbage
    /// collection"). Called before each chunk upload and at FLUSH; a writer that neither writes
    /// nor flushes for a whole grace period is not protected.
    fn refresh_if_due(&self) -> Result<()> {
        if !self.refresh_due() {
            return Ok(());
        }
        let _flushing = lock(&self.flushing);
        let root = self.store_changed_pages()?;
        self.refresh_locked(root)
    }

    fn upload_permit(&self) -> Result<std::time::Instant> {
        self.uploads.permit(&*self.store)
    }

    fn refresh_due(&self) -> bool {
        lock(&self.state)
            .uncommitted_since
            .is_some_and(|since| since.elapsed() >= self.config.refresh_uncommitted_after)
    }

    /// [`refresh_if_due`](Self::refresh_if_due) with `flushing` held and the changed pages frozen
    /// into `root`.
    fn refresh_locked(&self, root: Root) -> Result<()> {
        if !self.refresh_due() {
            return Ok(());
        }
        let started = Instant::now();
        let committed = lock(&self.state).committed.root.clone();
        let refreshed =
            gc::refresh_uncommitted(&*self.store, &committed, &root, self.block_size, &|| self.upload_permit())
                .map_err(|e| Error::backend(self, format!("refreshing uncommitted uploads: {e}")))?;
        log::debug!("{self}: uploaded {refreshed} uncommitted objects again so a GC keeps them");
        let mut st = lock(&self.state);
        st.uncommitted_since = Some(started);
        // Its chunks may no longer be in the map, so they were not refreshed: upload them again.
        st.uploaded.clear();
        Ok(())
    }

    /// Commits `root` by replacing the head it was read at; refuses and fences this store when
    /// another writer got there first.
    fn commit(&self, root: Root) -> Result<()> {
        if root.delta.len() > MAX_DELTA_ENTRIES {
            return Err(Error::backend(
                self,
                format!(
                    "not committing a delta of {} entries, more than the {MAX_DELTA_ENTRIES} readers accept; FLUSH again once the overlay is folded",
                    root.delta.len()
                ),
            ));
        }
        loop {
            let committed = lock(&self.state).committed.clone();
            if root == committed.root {
                return Ok(());
            }
            let head = Head {
                generation: committed.generation + 1,
                writer: self.writer.clone(),
                block_size: self.block_size,
                root: root.clone(),
            };
            let bytes = head.encode();
            let key = head_key(&self.export);
            let condition = match &committed.version {
                Some(v) => Put::IfVersion(v),
                None => Put::IfAbsent,
            };
            let landed = match self.store.put(&key, &bytes, condition, None) {
                Ok(landed) => landed,
                // No answer: the head may or may not have been written. Reading it back tells.
                Err(e) => match self.store.get(&key, MAX_RECORD_BYTES) {
                    Ok(Some(found)) if found.bytes == bytes => Some(found.version),
                    _ => return Err(e),
                },
            };
            if let Some(version) = landed {
                let mut st = lock(&self.state);
                st.committed = Committed { root, generation: head.generation, version: Some(version) };
                st.uploaded.clear();
                return Ok(());
            }
            // Refused. If the head is a later commit of this very writer (one whose answer was
            // lost and whose read-back failed too), no other writer came in between: go on from it.
            let found = read_head(&*self.store, &self.export)?;
            if let Some((mine, version)) =
                found.filter(|(h, _)| h.writer == self.writer && h.generation > committed.generation)
            {
                let mut st = lock(&self.state);
                st.committed = Committed { root: mine.root, generation: mine.generation, version: Some(version) };
                st.uploaded.clear();
                continue;
            }
            let why = format!(
                "another writer committed export {} since this one read its head at generation {} ({key} changed), so this writer stops: its writes since the last FLUSH are not in the export",
                self.export, committed.generation
            );
            log::error!("{self}: {why}");
            lock(&self.state).fenced = Some(why.clone());
            return Err(Error::backend(self, why));
        }
    }
}

fn clean(cache: &mut LruCache<Hash, Arc<Page>>, pending: &[PendingPage], hash: &Hash) -> Option<Arc<Page>> {
    if let Some(page) = cache.get(hash) {
        return Some(page.clone());
    }
    pending.iter().find(|p| p.hash == *hash).map(|p| p.page.clone())
}

impl Storage for CasStorage {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn read_block(&self, id: BlockId, buf: &mut BlockBuf) -> Result<bool> {
        check_len(self, self.block_size, buf.len())?;
        let Some(hash) = self.find(id)? else {
            buf.fill(0);
            return Ok(false);
        };
        let key = chunk_key(&hash);
        // Error::backend rather than CorruptBlock, whose fields are changing on another branch.
        let corrupt = |what: String| Error::backend(self, format!("block {id} is corrupt: {what}"));
        match self.store.read_into(&key, None, buf)? {
            ReadInto::Filled if Hash::of(buf) == hash => Ok(true),
            ReadInto::Filled => Err(corrupt(format!("chunk {key} does not hash to its name"))),
            ReadInto::Missing => Err(corrupt(format!("chunk {key} named by the map is missing"))),
            ReadInto::WrongSize(n) => Err(corrupt(format!("chunk {key} is {n} bytes, not {}", self.block_size))),
        }
    }

    fn write_block(&self, id: BlockId, data: &[u8]) -> Result<()> {
        check_len(self, self.block_size, data.len())?;
        self.check_writable()?;
        let hash = Hash::of(data);
        if self.find(id)? == Some(hash) {
            return Ok(());
        }
        self.refresh_if_due()?;
        if !lock(&self.state).uploaded.contains(&hash) {
            let uploading = Instant::now();
            self.store.put(&chunk_key(&hash), data, Put::Always, Some(&|| self.upload_permit()))?;
            let mut st = lock(&self.state);
            st.uncommitted_since.get_or_insert(uploading);
            if st.uploaded.len() >= MAX_UPLOADED_REMEMBERED {
                st.uploaded.clear();
            }
            st.uploaded.insert(hash);
        }
        self.set(id, Some(hash))
    }

    fn delete_block(&self, id: BlockId) -> Result<()> {
        self.check_writable()?;
        if self.find(id)?.is_none() {
            return Ok(());
        }
        self.set(id, None)
    }

    fn list_blocks(&self) -> Result<Vec<BlockId>> {
        self.list_blocks_in(0..u64::MAX)
    }

    fn list_blocks_in(&self, range: std::ops::Range<u64>) -> Result<Vec<BlockId>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        // A copy of the working map (its changed pages and overlay are bounded), so no lock is
        // held while pages are read.
        let (map, overlay) = {
            let st = lock(&self.state);
            (st.map.clone(), st.overlay.range(range.clone()).map(|(&id, &c)| (id, c)).collect::<Vec<_>>())
        };
        let mut found = Vec::new();
        let mut load = |hash: &Hash, level: u8| {
            let cached = {
                let mut st = lock(&self.state);
                let State { cache, pending, .. } = &mut *st;
                clean(cache, pending, hash)
            };
            match cached {
                Some(page) => Ok(page),
                None => {
                    let page = Arc::new(fetch_page(&*self.store, hash, level)?);
                    lock(&self.state).cache.put(*hash, page.clone());
                    Ok(page)
                }
            }
        };
        map.walk(&range, &mut load, &mut |id| {
            if overlay.binary_search_by_key(&id.0, |&(o, _)| o).is_err() {
                found.push(id);
            }
        })?;
        found.extend(overlay.iter().filter(|(_, chunk)| chunk.is_some()).map(|&(id, _)| BlockId(id)));
        found.sort_unstable();
        Ok(found)
    }

    fn flush(&self) -> Result<()> {
        self.check_writable()?;
        let _flushing = lock(&self.flushing);
        self.fold_if_full()?;
        let frozen_at = Instant::now();
        let root = self.store_changed_pages()?;
        self.refresh_locked(root.clone())?;
        self.store.sync()?;
        self.commit(root)?;
        // What was uploaded before the freeze is committed now; later uploads are not.
        let mut st = lock(&self.state);
        st.uncommitted_since = st.uncommitted_since.map(|since| since.max(frozen_at));
        drop(st);
        self.store.sync()
    }

    fn retries(&self) -> u64 {
        self.store.retries()
    }

    fn capabilities(&self) -> Capabilities {
        // Requests go to a remote store; the map is listed in one walk, not in key-range slices;
        // a flush commits the whole map.
        Capabilities { slow_requests: true, sliced_listing: false, atomic_flush: true }
    }
}

#[cfg(test)]
mod tests;
