//! Export-level operations of the `cas` layout on committed maps: snapshots (records naming a
//! head's root), clones (a new head naming a snapshot's root), walks and diffs of maps.
//!
//! Each costs a few requests whatever the device size: a snapshot or clone copies one root hash
//! and the delta, and a diff reads only the pages where the two trees differ, since equal hashes
//! mean equal subtrees, and the pages on the paths of the blocks the two deltas do not share.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use super::format::{
    head_key, page_span, snapshot_key, snapshot_prefix, Entry, Hash, Head, Page, Root, SnapshotRecord, FANOUT_BITS,
    MAX_RECORD_BYTES,
};
use super::gc::UploadGate;
use super::map::{Step, WorkingMap};
use super::{fetch_page, read_head};
use crate::storage::objects::{ObjectStore, Put};
use crate::storage::BlockId;
use crate::{Error, ExportName, Result};

/// Reads snapshot `snap` of `export`.
///
/// # Errors
/// [`Error::NotFound`] for a snapshot that does not exist; store failures; a record that fails
/// its checks.
pub fn read_snapshot(store: &dyn ObjectStore, export: &ExportName, snap: &ExportName) -> Result<SnapshotRecord> {
    let key = snapshot_key(export, snap);
    let object = store.get(&key, MAX_RECORD_BYTES)?.ok_or_else(|| Error::NotFound {
        store: store.to_string(),
        message: format!("export {export} has no snapshot {snap} (list them with `nbds3ctl snapshots {export}`)"),
    })?;
    SnapshotRecord::decode(store, &key, &object.bytes)
}

/// Records the last committed state of `export` (a `cas` export of `device_size` bytes in
/// blocks of `block_size`) as snapshot `snap`: a GET of the head and one `If-None-Match` PUT.
///
/// # Errors
/// [`Error::Config`] when the snapshot already exists or the head has another block size;
/// store failures.
pub fn take_snapshot(
    store: &dyn ObjectStore,
    export: &ExportName,
    snap: &ExportName,
    device_size: u64,
    block_size: usize,
) -> Result<SnapshotRecord> {
    // Under one upload permit from reading the head to writing the record, so a GC deleting
    // meanwhile has seen the record or waits for it (docs/CAS-FORMAT.md, "Garbage collection").
    let permit = UploadGate::default().permit(store)?;
    let (generation, root) = match read_head(store, export)? {
        Some((head, _)) => (head.generation, head.root),
        None => (0, Root::EMPTY),
    };
    let record = SnapshotRecord { generation, device_size, block_size, root };
    let key = snapshot_key(export, snap);
    match store.put(&key, &record.encode(), Put::IfAbsent, Some(&|| UploadGate::check(store, permit)))? {
        Some(_) => Ok(record),
        None => Err(Error::config("snapshot", format!("export {export} already has a snapshot {snap} ({key})"))),
    }
}

/// The names of the snapshots of `export`, in order.
///
/// # Errors
/// Store failures.
pub fn list_snapshots(store: &dyn ObjectStore, export: &ExportName) -> Result<Vec<ExportName>> {
    let prefix = snapshot_prefix(export);
    let mut names = Vec::new();
    store.list(&prefix, None, &mut |listed| {
        // Keys under the prefix that are not valid names were not written by nbds3: skipped.
        if let Some(name) = listed.key.strip_prefix(&prefix).and_then(|n| ExportName::new(n).ok()) {
            names.push(name);
        }
        true
    })?;
    Ok(names)
}

/// Deletes snapshot `snap` of `export`. Its chunks and pages stay until a GC finds them
/// unreferenced.
///
/// # Errors
/// [`Error::NotFound`] for a snapshot that does not exist; store failures.
pub fn delete_snapshot(store: &dyn ObjectStore, export: &ExportName, snap: &ExportName) -> Result<()> {
    read_snapshot(store, export, snap)?;
    store.delete(&[snapshot_key(export, snap)], None)
}

/// Gives the new export `clone` the map of snapshot `snap` of `export`, as its first head
/// (written with `If-None-Match`). The caller writes the clone's export record, with the
/// returned record's geometry, after this succeeds.
///
/// # Errors
/// [`Error::NotFound`] for a missing snapshot; [`Error::Config`] when `clone` already has a head;
/// store failures.
pub fn clone_snapshot(
    store: &dyn ObjectStore,
    export: &ExportName,
    snap: &ExportName,
    clone: &ExportName,
) -> Result<SnapshotRecord> {
    // Under one upload permit, as a snapshot.
    let permit = UploadGate::default().permit(store)?;
    let record = read_snapshot(store, export, snap)?;
    let head = Head {
        generation: 1,
        writer: clone_writer(export, snap),
        block_size: record.block_size,
        root: record.root.clone(),
    };
    match store.put(&head_key(clone), &head.encode(), Put::IfAbsent, Some(&|| UploadGate::check(store, permit)))? {
        Some(_) => Ok(record),
        None => Err(Error::config(
            "clone",
            format!("export {clone} already has a cas head ({}): clone onto a new name", head_key(clone)),
        )),
    }
}

/// The `writer` of the first head of a clone of snapshot `snap` of `export`.
pub fn clone_writer(export: &ExportName, snap: &ExportName) -> String {
    format!("clone of {export}@{snap}")
}

/// The map of `export` as last committed (all holes when it has no head yet).
///
/// # Errors
/// Store failures; a head that fails its checks.
pub fn head_root(store: &dyn ObjectStore, export: &ExportName) -> Result<Root> {
    Ok(read_head(store, export)?.map_or(Root::EMPTY, |(head, _)| head.root))
}

/// The tree `root` would be with its delta folded in, without its delta: what names a map whatever
/// share of it sits in its delta (a diff stream's sides, checked against an import's target).
/// Reads the pages on the delta's paths and stores nothing; memory, those pages changed (at most
/// a leaf and its ancestors per delta entry, 36 KiB a page at worst).
///
/// # Errors
/// Store failures; pages that fail their checks.
pub fn folded(store: &dyn ObjectStore, root: &Root) -> Result<Root> {
    let mut map = WorkingMap::new(root);
    let mut clean: HashMap<Hash, Arc<Page>> = HashMap::new();
    for (id, chunk) in root.delta.entries() {
        while let Step::Need(hash, level) = map.set(BlockId(id), chunk, &mut |h| clean.get(h).cloned()) {
            clean.insert(hash, Arc::new(fetch_page(store, &hash, level)?));
        }
        // The pages a set needs are copied into the changed ones: only the upper levels are
        // needed again.
        clean.retain(|_, page| page.level > 0);
    }
    map.freeze();
    Ok(map.base)
}

/// A subtree of a map: a page at a level, or nothing (all holes). A map shallower than the
/// level asked for is its own slot 0 there, so maps of different depths compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) page: Option<Hash>,
    pub(crate) level: u8,
}

/// One slot of a subtree seen as a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Chunk(Hash),
    Subtree(Node),
}

/// Entries of a delta, in order of block index.
pub(crate) type DeltaEntries = [(u64, Option<Hash>)];

/// The entries of `delta` for blocks `start..start + blocks`.
pub(crate) fn delta_within(delta: &DeltaEntries, start: u64, blocks: u64) -> &DeltaEntries {
    let low = delta.partition_point(|&(id, _)| id < start);
    let high = match start.checked_add(blocks) {
        Some(end) => delta.partition_point(|&(id, _)| id < end),
        None => delta.len(),
    };
    &delta[low..high.max(low)]
}

/// The entries of `delta` that `other` does not hold with the same chunk.
fn unshared(delta: &DeltaEntries, other: &DeltaEntries) -> Vec<(u64, Option<Hash>)> {
    let shared =
        |entry: &(u64, Option<Hash>)| other.binary_search_by_key(&entry.0, |o| o.0).is_ok_and(|i| other[i] == *entry);
    delta.iter().filter(|entry| !shared(entry)).copied().collect()
}

/// The slot of page `index` at `level` that block `id` falls in.
pub(crate) fn slot_of(level: u8, index: u64, id: u64) -> u16 {
    let (first, slot_blocks) = page_span(level, index);
    ((id - first) / slot_blocks.max(1)) as u16
}

impl Node {
    pub(crate) fn top(root: &Root) -> Self {
        Node { page: root.page, level: root.depth - 1 }
    }

    /// An empty subtree below `level`.
    pub(crate) fn empty_below(level: u8) -> Self {
        Node { page: None, level: level.saturating_sub(1) }
    }

    /// The slots of this subtree seen as a page at `level` (at least its own).
    pub(crate) fn slots_at(&self, store: &dyn ObjectStore, level: u8) -> Result<BTreeMap<u16, Slot>> {
        self.slots_at_reading(store, level, &mut |_, _| {})
    }

    /// [`slots_at`](Self::slots_at), showing `read` the page it reads, if any.
    pub(crate) fn slots_at_reading(
        &self,
        store: &dyn ObjectStore,
        level: u8,
        read: &mut dyn FnMut(&Hash, &Page),
    ) -> Result<BTreeMap<u16, Slot>> {
        let Some(hash) = self.page else { return Ok(BTreeMap::new()) };
        if self.level < level {
            return Ok(BTreeMap::from([(0, Slot::Subtree(*self))]));
        }
        let page = fetch_page(store, &hash, level)?;
        read(&hash, &page);
        Ok(page
            .entries
            .into_iter()
            .map(|(slot, entry)| match entry {
                Entry::Chunk(h) => (slot, Slot::Chunk(h)),
                Entry::Page(h) => (slot, Slot::Subtree(Node { page: Some(h), level: level.saturating_sub(1) })),
            })
            .collect())
    }
}

/// What a diff found for a run of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The blocks now hold data (new or changed).
    Data,
    /// The blocks are now holes (they read as zeros).
    Zero,
}

/// A run of blocks that differ between two maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangedRange {
    /// The first block.
    pub first: u64,
    /// How many blocks.
    pub blocks: u64,
    /// What they hold in the later map.
    pub change: Change,
}

/// The runs of blocks whose content differs from `from` to `to`, in order, adjacent runs of one
/// kind merged. Reads only the pages under subtrees whose hashes differ, and those on the paths
/// of the blocks the two deltas do not hold alike.
///
/// # Errors
/// Store failures; pages that fail their checks.
pub fn diff(store: &dyn ObjectStore, from: &Root, to: &Root) -> Result<Vec<ChangedRange>> {
    let depth = from.full_depth().max(to.full_depth());
    let (from_delta, to_delta): (Vec<_>, Vec<_>) = (from.delta.entries().collect(), to.delta.entries().collect());
    let mut runs: Vec<ChangedRange> = Vec::new();
    let sides = [(Node::top(from), &from_delta[..]), (Node::top(to), &to_delta[..])];
    diff_nodes(store, sides, depth - 1, 0, &(0..u64::MAX), &mut |id, _, now| {
        let change = if now.is_some() { Change::Data } else { Change::Zero };
        match runs.last_mut() {
            Some(last) if last.change == change && last.first + last.blocks == id.0 => last.blocks += 1,
            _ => runs.push(ChangedRange { first: id.0, blocks: 1, change }),
        }
    })?;
    Ok(runs)
}

/// Compares two maps' subtrees seen at `level`, page `index`, each with its delta's entries
/// there, visiting each block in `range` whose chunk differs, with its chunk in each.
fn diff_nodes(
    store: &dyn ObjectStore,
    [(a, da), (b, db)]: [(Node, &DeltaEntries); 2],
    level: u8,
    index: u64,
    range: &Range<u64>,
    visit: &mut dyn FnMut(BlockId, Option<Hash>, Option<Hash>),
) -> Result<()> {
    // Over equal subtrees, an entry both deltas hold alike changes nothing: dropping those keeps
    // the walk to what changed when two commits share most of a delta.
    let (kept_a, kept_b);
    let (da, db) = if a.page == b.page && (a.page.is_none() || a.level == b.level) {
        (kept_a, kept_b) = (unshared(da, db), unshared(db, da));
        if kept_a.is_empty() && kept_b.is_empty() {
            return Ok(());
        }
        (&kept_a[..], &kept_b[..])
    } else {
        (da, db)
    };
    let (first, slot_blocks) = page_span(level, index);
    let (sa, sb) = (a.slots_at(store, level)?, b.slots_at(store, level)?);
    let in_deltas = da.iter().chain(db).map(|&(id, _)| slot_of(level, index, id));
    let mut slots: Vec<u16> = sa.keys().chain(sb.keys()).copied().chain(in_deltas).collect();
    slots.sort_unstable();
    slots.dedup();
    for slot in slots {
        let start = first.saturating_add(u64::from(slot).saturating_mul(slot_blocks));
        if start.saturating_add(slot_blocks) <= range.start || start >= range.end {
            continue;
        }
        let (ea, eb) = (sa.get(&slot).copied(), sb.get(&slot).copied());
        let (da, db) = (delta_within(da, start, slot_blocks), delta_within(db, start, slot_blocks));
        if ea == eb && da.is_empty() && db.is_empty() {
            continue;
        }
        if level == 0 {
            let chunk = |delta: &DeltaEntries, e: Option<Slot>| match (delta.first(), e) {
                (Some(&(_, chunk)), _) => Ok(chunk),
                (None, Some(Slot::Chunk(h))) => Ok(Some(h)),
                (None, None) => Ok(None),
                (None, Some(Slot::Subtree(_))) => Err(Error::backend(store, "a map holds a page at level 0")),
            };
            let (was, now) = (chunk(da, ea)?, chunk(db, eb)?);
            if was != now {
                visit(BlockId(start), was, now);
            }
            continue;
        }
        let node = |e: Option<Slot>| match e {
            Some(Slot::Subtree(n)) => Ok(n),
            None => Ok(Node::empty_below(level)),
            Some(Slot::Chunk(_)) => {
                Err(Error::backend(store, format!("a map holds a chunk and a page at level {level}")))
            }
        };
        let index = (index << FANOUT_BITS) | u64::from(slot);
        diff_nodes(store, [(node(ea)?, da), (node(eb)?, db)], level - 1, index, range, visit)?;
    }
    Ok(())
}
