//! The working block map of a `cas` store: the last frozen tree plus the pages changed since,
//! and the two operations on it that need no I/O (find and set, given the pages they ask for)
//! and freezing the changes into new immutable pages.
//!
//! Changed pages are kept by position (level, index), not by hash: a page changed twice is
//! encoded once, when it is frozen. Invariant: every ancestor of a changed page is changed too,
//! so freezing bottom-up always finds the parent to record a child's new hash in, and a lookup
//! that meets a changed page ignores its (stale) parent entry.

use std::collections::{hash_map, HashMap};
use std::sync::Arc;

use super::format::{covers, page_span, position, Entry, Hash, Page, Root, FANOUT, FANOUT_BITS};
use crate::storage::BlockId;
use crate::Result;

/// What a lookup or an update found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step<T> {
    /// Done.
    Done(T),
    /// The clean page with this hash, at this level, must be loaded first; then try again.
    Need(Hash, u8),
}

/// The frozen base tree and the changes on top of it.
#[derive(Clone, Debug)]
pub(crate) struct WorkingMap {
    /// The last frozen tree (no delta: the store keeps its own); its pages are stored, or pending
    /// in the store's own list.
    pub(crate) base: Root,
    /// Levels of the working tree, at least `base.depth` (a write past the end adds levels).
    depth: u8,
    /// Changed pages by (level, index at that level).
    dirty: HashMap<(u8, u64), Page>,
}

impl WorkingMap {
    /// A map whose base is the tree of `root`, with no changes.
    pub(crate) fn new(root: &Root) -> Self {
        WorkingMap { base: root.tree_only(), depth: root.depth, dirty: HashMap::new() }
    }

    /// How many pages have changed since the last freeze.
    pub(crate) fn dirty_pages(&self) -> usize {
        self.dirty.len()
    }

    /// The top page's hash when it is clean.
    fn clean_top(&self) -> Option<Hash> {
        if self.base.depth == self.depth {
            self.base.page
        } else {
            None
        }
    }

    /// The chunk of block `id`, or `None` for a hole; `clean` gives the clean pages it has.
    pub(crate) fn find(&self, id: BlockId, clean: &mut dyn FnMut(&Hash) -> Option<Arc<Page>>) -> Step<Option<Hash>> {
        if !covers(self.depth, id) {
            return Step::Done(None);
        }
        let mut hash = self.clean_top();
        for level in (0..self.depth).rev() {
            let (index, slot) = position(id, level);
            let loaded;
            let page = match (self.dirty.get(&(level, index)), hash) {
                (Some(page), _) => page,
                (None, None) => return Step::Done(None),
                (None, Some(h)) => match clean(&h) {
                    Some(page) => {
                        loaded = page;
                        &loaded
                    }
                    None => return Step::Need(h, level),
                },
            };
            match page.entries.get(&slot) {
                Some(Entry::Chunk(c)) => return Step::Done(Some(*c)),
                Some(Entry::Page(h)) => hash = Some(*h),
                None => hash = None,
            }
        }
        Step::Done(None)
    }

    /// Makes block `id` point at `chunk` (or a hole), changing every page on its path.
    pub(crate) fn set(
        &mut self,
        id: BlockId,
        chunk: Option<Hash>,
        clean: &mut dyn FnMut(&Hash) -> Option<Arc<Page>>,
    ) -> Step<()> {
        if !covers(self.depth, id) {
            if chunk.is_none() {
                return Step::Done(());
            }
            while !covers(self.depth, id) {
                let mut top = Page::empty(self.depth);
                if let Some(old) = self.clean_top() {
                    top.entries.insert(0, Entry::Page(old));
                }
                self.dirty.insert((self.depth, 0), top);
                self.depth += 1;
            }
        }
        let mut hash = self.clean_top();
        for level in (0..self.depth).rev() {
            let (index, slot) = position(id, level);
            let page = match self.dirty.entry((level, index)) {
                hash_map::Entry::Occupied(changed) => changed.into_mut(),
                hash_map::Entry::Vacant(slot) => slot.insert(match hash {
                    None => Page::empty(level),
                    Some(h) => match clean(&h) {
                        Some(page) => Page::clone(&page),
                        None => return Step::Need(h, level),
                    },
                }),
            };
            if level == 0 {
                match chunk {
                    Some(c) => page.entries.insert(slot, Entry::Chunk(c)),
                    None => page.entries.remove(&slot),
                };
                return Step::Done(());
            }
            hash = match page.entries.get(&slot) {
                Some(Entry::Page(h)) => Some(*h),
                _ => None,
            };
        }
        Step::Done(())
    }

    /// Calls `visit` with every mapped block in `range`, in order; `load` reads clean pages.
    pub(crate) fn walk(
        &self,
        range: &std::ops::Range<u64>,
        load: &mut dyn FnMut(&Hash, u8) -> Result<Arc<Page>>,
        visit: &mut dyn FnMut(BlockId),
    ) -> Result<()> {
        self.walk_page(self.depth - 1, 0, self.clean_top(), range, load, visit)
    }

    fn walk_page(
        &self,
        level: u8,
        index: u64,
        hash: Option<Hash>,
        range: &std::ops::Range<u64>,
        load: &mut dyn FnMut(&Hash, u8) -> Result<Arc<Page>>,
        visit: &mut dyn FnMut(BlockId),
    ) -> Result<()> {
        let page = match (self.dirty.get(&(level, index)), hash) {
            (Some(page), _) => Arc::new(page.clone()),
            (None, Some(h)) => load(&h, level)?,
            (None, None) => return Ok(()),
        };
        let (first, slot_blocks) = page_span(level, index);
        let overlaps = |slot: u16| {
            let start = first.saturating_add(u64::from(slot).saturating_mul(slot_blocks));
            start < range.end && start.saturating_add(slot_blocks) > range.start
        };
        if level == 0 {
            for (&slot, _) in page.entries.iter().filter(|(&slot, _)| overlaps(slot)) {
                visit(BlockId(first + u64::from(slot)));
            }
            return Ok(());
        }
        // A changed child may have no entry in its (changed) parent yet: look at every slot.
        for slot in (0..FANOUT as u16).filter(|&slot| overlaps(slot)) {
            let child = (index << FANOUT_BITS) | u64::from(slot);
            let hash = match page.entries.get(&slot) {
                Some(Entry::Page(h)) => Some(*h),
                _ => None,
            };
            if hash.is_some() || self.dirty.contains_key(&(level - 1, child)) {
                self.walk_page(level - 1, child, hash, range, load, visit)?;
            }
        }
        Ok(())
    }

    /// Encodes every changed page bottom-up into new immutable pages, makes the result the new
    /// base, and returns the pages that must be stored before a head may name that base.
    pub(crate) fn freeze(&mut self) -> Vec<(Hash, Arc<Page>, Vec<u8>)> {
        let mut new_pages = Vec::new();
        if self.dirty.is_empty() {
            return new_pages;
        }
        let mut root = None;
        for level in 0..self.depth {
            let mut here: Vec<(u64, Page)> = Vec::new();
            self.dirty.retain(|&(l, index), page| {
                if l == level {
                    here.push((index, std::mem::take(page)));
                }
                l != level
            });
            here.sort_by_key(|(index, _)| *index);
            for (index, mut page) in here {
                page.level = level;
                let hash = (!page.entries.is_empty()).then(|| {
                    let bytes = page.encode();
                    let hash = Hash::of(&bytes);
                    new_pages.push((hash, Arc::new(page), bytes));
                    hash
                });
                if level + 1 == self.depth {
                    root = hash;
                } else if let Some(parent) = self.dirty.get_mut(&(level + 1, index >> FANOUT_BITS)) {
                    let slot = (index & ((1 << FANOUT_BITS) - 1)) as u16;
                    match hash {
                        Some(h) => parent.entries.insert(slot, Entry::Page(h)),
                        None => parent.entries.remove(&slot),
                    };
                }
            }
        }
        self.base = Root::tree(root, self.depth);
        new_pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map over an in-RAM page set, freezing into it.
    struct Model {
        map: WorkingMap,
        pages: HashMap<Hash, Arc<Page>>,
    }

    impl Model {
        fn get(&self, id: u64) -> Option<Hash> {
            let pages = &self.pages;
            match self.map.find(BlockId(id), &mut |h| pages.get(h).cloned()) {
                Step::Done(found) => found,
                Step::Need(h, _) => panic!("page {h} missing"),
            }
        }
        fn set(&mut self, id: u64, chunk: Option<Hash>) {
            let pages = &self.pages;
            assert_eq!(self.map.set(BlockId(id), chunk, &mut |h| pages.get(h).cloned()), Step::Done(()));
        }
        fn freeze(&mut self) {
            for (h, page, _) in self.map.freeze() {
                self.pages.insert(h, page);
            }
        }
    }

    #[test]
    fn set_find_freeze_grow_and_share_pages() {
        let mut m = Model { map: WorkingMap::new(&Root::EMPTY), pages: HashMap::new() };
        let a = Hash::of(b"a");
        let b = Hash::of(b"b");
        m.set(5, Some(a));
        assert_eq!(m.get(5), Some(a));
        m.freeze();
        let one_level = m.map.base.clone();
        assert_eq!(one_level.depth, 1);
        m.set(1 << 25, Some(b));
        assert_eq!((m.get(5), m.get(1 << 25), m.get(6)), (Some(a), Some(b), None));
        m.freeze();
        assert_eq!(m.map.base.depth, 3);
        assert_eq!((m.get(5), m.get(1 << 25), m.get((1 << 25) + 1)), (Some(a), Some(b), None));
        m.set(1 << 25, None);
        m.freeze();
        assert_eq!(m.get(1 << 25), None);
        // Block 5's leaf is the very page frozen before the map grew: unchanged subtrees share pages.
        let Some(Entry::Page(mid)) = m.pages[&m.map.base.page.unwrap()].entries.get(&0).copied() else { panic!() };
        assert_eq!(m.pages[&mid].entries.get(&0), Some(&Entry::Page(one_level.page.unwrap())));
        m.set(5, None);
        m.freeze();
        assert_eq!(m.map.base.page, None, "an all-hole map has no pages");
        assert_eq!(m.map.freeze().len(), 0, "nothing changed, nothing to store");
    }

    #[test]
    fn missing_pages_are_asked_for() {
        let mut m = Model { map: WorkingMap::new(&Root::EMPTY), pages: HashMap::new() };
        m.set(3, Some(Hash::of(b"x")));
        m.freeze();
        let root = m.map.base.page.unwrap();
        let map = WorkingMap::new(&m.map.base);
        assert_eq!(map.find(BlockId(3), &mut |_| None), Step::Need(root, 0));
    }
}
