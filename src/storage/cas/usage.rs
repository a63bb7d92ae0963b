//! Space accounting of `cas` maps, for `nbds3ctl info`: how many blocks a map holds, how many
//! distinct chunks and pages a set of maps references, and what the bucket stores under `cas/`.
//!
//! Why a walk of its own: the GC's marking skips a page it has seen, which is right for "what is
//! referenced" but would undercount the blocks of a map in which one page appears twice (two
//! identical runs of 1024 blocks share a leaf). Here each distinct page is read once and the
//! blocks under it remembered, so a page seen again costs no request and still counts.
//!
//! A map's delta counts over its tree: a block the delta names counts as the delta says, and the
//! tree's chunk it shadows is not counted (unless mapped elsewhere). The pages on the paths of
//! the delta's blocks are read once more for that, beside the walk of the rest.
//!
//! Costs: one GET per distinct page of the maps walked, and per page on a delta's paths; memory, per distinct page its hash and
//! block count, 50 to 100 bytes (a page maps up to 1024 blocks, so a densely written map pays
//! little; one whose blocks lie one to a leaf pays it per block), and, when distinct chunks are
//! counted, the first 128 bits of each distinct chunk's hash in a hash set: about 20 to 40 bytes
//! a distinct chunk (a TiB of distinct 4 KiB blocks, 268 million chunks, about 5 to 10 GiB; at
//! 64 KiB blocks 0.3 to 0.6 GiB). 128 bits of a cryptographic hash make a false match between two
//! different chunks of one bucket unlikely beyond any practical concern (under 10^-20 at 2^32
//! chunks).

use std::collections::{HashMap, HashSet};

use super::fetch_page;
use super::format::{page_span, Entry, Hash, Page, Root, CAS_PREFIX, FANOUT_BITS};
use super::ops::{delta_within, slot_of, DeltaEntries, Node, Slot};
use crate::storage::objects::ObjectStore;
use crate::{Error, Result};

/// Walks maps, counting the blocks of each and the distinct chunks and pages of all of them.
#[derive(Debug, Default)]
pub struct MapWalk {
    /// Distinct chunks seen, by the first 128 bits of their hash; `None` when not counted.
    chunks: Option<HashSet<u128>>,
    /// Blocks mapped under each distinct page whose whole subtree was walked.
    pages: HashMap<Hash, u64>,
    /// Distinct pages seen.
    seen: HashSet<Hash>,
    /// Encoded bytes of the distinct pages seen: what they take in the bucket.
    page_bytes: u64,
}

impl MapWalk {
    /// A walk that counts blocks and pages only: memory per page, none per chunk.
    pub fn blocks_only() -> Self {
        MapWalk::default()
    }

    /// A walk that also counts distinct chunks, at the memory cost the module doc gives.
    pub fn with_chunks() -> Self {
        MapWalk { chunks: Some(HashSet::new()), ..MapWalk::default() }
    }

    /// Walks the map under `root`, reading the pages no earlier walk of this one read; returns
    /// how many blocks it maps (its non-hole blocks).
    ///
    /// # Errors
    /// Store failures; a page that is missing or fails its checks, named.
    pub fn add(&mut self, store: &dyn ObjectStore, root: &Root) -> Result<u64> {
        let delta: Vec<_> = root.delta.entries().collect();
        self.blocks_with_delta(store, Node::top(root), root.full_depth() - 1, 0, &delta)
    }

    /// Blocks mapped under `node` seen as page `index` at `level`, with the entries of a delta
    /// there over it; at most `MAX_DEPTH` levels of recursion.
    fn blocks_with_delta(
        &mut self,
        store: &dyn ObjectStore,
        node: Node,
        level: u8,
        index: u64,
        delta: &DeltaEntries,
    ) -> Result<u64> {
        if delta.is_empty() {
            return match node.page {
                None => Ok(0),
                Some(hash) => self.blocks_under(store, hash, node.level),
            };
        }
        let slots = node.slots_at_reading(store, level, &mut |hash, page| self.count_page(hash, page))?;
        let (first, slot_blocks) = page_span(level, index);
        let mut keys: Vec<u16> =
            slots.keys().copied().chain(delta.iter().map(|&(id, _)| slot_of(level, index, id))).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut blocks = 0;
        for slot in keys {
            let start = first.saturating_add(u64::from(slot).saturating_mul(slot_blocks));
            let here = delta_within(delta, start, slot_blocks);
            let entry = slots.get(&slot).copied();
            if level == 0 {
                let chunk = match (here.first(), entry) {
                    (Some(&(_, chunk)), _) => chunk,
                    (None, Some(Slot::Chunk(chunk))) => Some(chunk),
                    _ => None,
                };
                if let Some(chunk) = chunk {
                    self.count_chunk(&chunk);
                    blocks += 1;
                }
                continue;
            }
            let child = match entry {
                Some(Slot::Subtree(child)) => child,
                None => Node::empty_below(level),
                Some(Slot::Chunk(_)) => {
                    return Err(Error::backend(store, format!("a map holds a chunk at level {level}")))
                }
            };
            blocks +=
                self.blocks_with_delta(store, child, level - 1, (index << FANOUT_BITS) | u64::from(slot), here)?;
        }
        Ok(blocks)
    }

    fn count_chunk(&mut self, chunk: &Hash) {
        if let Some(chunks) = &mut self.chunks {
            let mut first = [0; 16];
            first.copy_from_slice(&chunk.0[..16]);
            chunks.insert(u128::from_le_bytes(first));
        }
    }

    fn count_page(&mut self, hash: &Hash, page: &Page) {
        if self.seen.insert(*hash) {
            self.page_bytes += page.encode().len() as u64;
        }
    }

    /// Blocks mapped under page `hash` at `level`; at most `MAX_DEPTH` levels of recursion.
    fn blocks_under(&mut self, store: &dyn ObjectStore, hash: Hash, level: u8) -> Result<u64> {
        if let Some(&blocks) = self.pages.get(&hash) {
            return Ok(blocks);
        }
        let page = fetch_page(store, &hash, level)?;
        let mut blocks = 0;
        for entry in page.entries.values() {
            blocks += match entry {
                Entry::Chunk(chunk) => {
                    self.count_chunk(chunk);
                    1
                }
                Entry::Page(child) => self.blocks_under(store, *child, level.saturating_sub(1))?,
            };
        }
        self.count_page(&hash, &page);
        self.pages.insert(hash, blocks);
        Ok(blocks)
    }

    /// Distinct chunks of the maps walked so far (0 for a [`blocks_only`](Self::blocks_only) walk).
    pub fn distinct_chunks(&self) -> u64 {
        self.chunks.as_ref().map_or(0, |c| c.len() as u64)
    }

    /// Distinct pages of the maps walked so far.
    pub fn pages(&self) -> u64 {
        self.seen.len() as u64
    }

    /// Their bytes.
    pub fn page_bytes(&self) -> u64 {
        self.page_bytes
    }
}

/// The chunk and page objects a bucket stores, as listed: every export's, snapshot's and clone's
/// (shared ones once), and garbage no GC has freed yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredObjects {
    /// Objects under `cas/chunks/`.
    pub chunks: u64,
    /// Their bytes.
    pub chunk_bytes: u64,
    /// Objects under `cas/pages/`.
    pub pages: u64,
    /// Their bytes.
    pub page_bytes: u64,
}

impl StoredObjects {
    /// Lists `cas/chunks/` and `cas/pages/` of `store`: one request per 1000 objects on S3.
    ///
    /// # Errors
    /// Store failures.
    pub fn list(store: &dyn ObjectStore) -> Result<Self> {
        let mut stored = StoredObjects::default();
        for (kind, objects, bytes) in [
            ("chunks/", &mut stored.chunks, &mut stored.chunk_bytes),
            ("pages/", &mut stored.pages, &mut stored.page_bytes),
        ] {
            store.list(&format!("{CAS_PREFIX}{kind}"), None, &mut |listed| {
                *objects += 1;
                *bytes += listed.size;
                true
            })?;
        }
        Ok(stored)
    }

    /// Bytes of chunks and pages together.
    pub fn bytes(&self) -> u64 {
        self.chunk_bytes + self.page_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::cas::{CasConfig, CasStorage};
    use crate::storage::objects::MemoryObjects;
    use crate::storage::{BlockId, Storage};
    use crate::ExportName;
    use std::sync::Arc;

    #[test]
    fn a_page_seen_twice_counts_its_blocks_twice_and_its_chunks_once() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryObjects::default());
        let name = ExportName::new("dev").unwrap();
        let storage = CasStorage::open(store.clone(), &name, 512, CasConfig::default()).unwrap();
        // Two identical runs of 1024 blocks (one leaf page, mapped twice), and a lone block.
        for id in 0..2048 {
            storage.write_block(BlockId(id), &[(id % 1024 % 3) as u8 + 1; 512]).unwrap();
        }
        storage.write_block(BlockId(5000), &[9; 512]).unwrap();
        storage.flush().unwrap();
        let root = storage.committed_root();
        let mut walk = MapWalk::with_chunks();
        assert_eq!(walk.add(&*store, &root).unwrap(), 2049);
        assert_eq!(
            (walk.distinct_chunks(), walk.pages()),
            (4, 3),
            "chunks 1, 2, 3, 9; the top, the shared leaf, one more"
        );
        assert_eq!(walk.add(&*store, &root).unwrap(), 2049, "again, from what it remembers");
        let mut blocks_only = MapWalk::blocks_only();
        assert_eq!((blocks_only.add(&*store, &root).unwrap(), blocks_only.distinct_chunks()), (2049, 0));
        let stored = StoredObjects::list(&*store).unwrap();
        assert_eq!((stored.chunks, stored.chunk_bytes, stored.pages), (4, 4 * 512, 3));
        assert_eq!(stored.page_bytes, walk.page_bytes());
    }
}
