//! The pure block math: a device's size and block size, and how a byte range splits into blocks.

use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Release};

use crate::storage::BlockId;
use crate::{Error, Result};

/// The smallest block size accepted.
pub const MIN_BLOCK_SIZE: usize = 512;
/// The largest block size accepted.
pub const MAX_BLOCK_SIZE: usize = 4 << 20;
/// The default block size.
pub const DEFAULT_BLOCK_SIZE: usize = 4096;

/// A device's size and block size, both validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    block_size: usize,
}

/// The part of one block that a byte range covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The block.
    pub block: BlockId,
    /// Where the range starts inside the block.
    pub offset_in_block: usize,
    /// How many bytes of the block the range covers.
    pub len: usize,
    /// Where this piece starts in the caller's buffer.
    pub buf_offset: usize,
}

impl Geometry {
    /// Validates a device of `size` bytes in blocks of `block_size` bytes.
    ///
    /// # Errors
    /// [`Error::Config`] naming `block-size` or `size` when a value is not allowed.
    pub fn new(size: u64, block_size: usize) -> Result<Self> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(Error::config(
                "block-size",
                format!("{block_size} is not allowed: use a power of two from 512 to 4M (default 4096)"),
            ));
        }
        if size == 0 || size % block_size as u64 != 0 || size > i64::MAX as u64 {
            return Err(Error::config(
                "size",
                format!("{size} is not allowed: use a positive multiple of the block size ({block_size})"),
            ));
        }
        Ok(Geometry { size, block_size })
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The number of blocks.
    pub fn blocks(&self) -> u64 {
        self.size / self.block_size as u64
    }

    /// The same block size at `size` bytes (an export resized).
    ///
    /// # Errors
    /// [`Error::Config`] naming `size` when it is not a positive multiple of the block size.
    pub fn with_size(&self, size: u64) -> Result<Self> {
        Geometry::new(size, self.block_size)
    }

    /// The blocks that `len` bytes at `offset` cover entirely (an empty range if none).
    pub fn whole_blocks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let bs = self.block_size as u64;
        let first = offset.div_ceil(bs);
        let end = offset.saturating_add(len) / bs;
        first..end.max(first)
    }

    /// The pieces of `len` bytes at `offset` that cover only part of their block: at most one at
    /// each end, found without walking the whole blocks between them.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] if the range reaches past the end of the device.
    pub fn partial_pieces(&self, offset: u64, len: u64) -> Result<Vec<Piece>> {
        let all = self.pieces(offset, len)?;
        let bs = self.block_size as u64;
        let whole = self.whole_blocks(offset, len);
        if whole.is_empty() {
            return Ok(all.filter(|p| p.len < self.block_size).collect());
        }
        let (head_end, tail_start, end) = (whole.start * bs, whole.end * bs, offset + len);
        let head = self.pieces(offset, head_end - offset)?;
        let tail = self
            .pieces(tail_start, end - tail_start)?
            .map(|p| Piece { buf_offset: p.buf_offset + (tail_start - offset) as usize, ..p });
        Ok(head.chain(tail).collect())
    }

    /// Splits `len` bytes at `offset` into per-block pieces, in order.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] if the range reaches past the end of the device.
    pub fn pieces(&self, offset: u64, len: u64) -> Result<Pieces> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {
                Ok(Pieces { offset, end, block_size: self.block_size as u64, start: offset })
            }
            _ => Err(Error::OutOfRange { offset, len, size: self.size }),
        }
    }
}

/// A device's geometry whose size grows (never shrinks) while requests use it. Every request
/// reads it, on every connection: a lock here, even a read lock, had every request of every core
/// write to one cache line, twice.
#[derive(Debug)]
pub(crate) struct GrowingGeometry {
    size: AtomicU64,
    block_size: usize,
}

impl GrowingGeometry {
    pub(crate) fn new(geometry: Geometry) -> Self {
        GrowingGeometry { size: AtomicU64::new(geometry.size), block_size: geometry.block_size }
    }

    /// The geometry of the moment.
    pub(crate) fn get(&self) -> Geometry {
        // Acquire: a request that sees the new size sees what was done before it was set (the
        // new range's stored blocks listed).
        Geometry { size: self.size.load(Acquire), block_size: self.block_size }
    }

    /// Grows to `grown`'s size, a geometry of the same block size ([`Geometry::with_size`]).
    pub(crate) fn grow(&self, grown: Geometry) {
        self.size.fetch_max(grown.size, Release);
    }
}

/// The iterator [`Geometry::pieces`] returns.
#[derive(Debug, Clone)]
pub struct Pieces {
    offset: u64,
    end: u64,
    block_size: u64,
    start: u64,
}

impl Iterator for Pieces {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.offset >= self.end {
            return None;
        }
        let block = self.offset / self.block_size;
        let offset_in_block = self.offset % self.block_size;
        let len = (self.block_size - offset_in_block).min(self.end - self.offset);
        let piece = Piece {
            block: BlockId(block),
            offset_in_block: offset_in_block as usize,
            len: len as usize,
            buf_offset: (self.offset - self.start) as usize,
        };
        self.offset += len;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(offset: u64, len: u64) -> Vec<(u64, usize, usize, usize)> {
        Geometry::new(4 * 4096, 4096)
            .unwrap()
            .pieces(offset, len)
            .unwrap()
            .map(|p| (p.block.0, p.offset_in_block, p.len, p.buf_offset))
            .collect()
    }

    #[test]
    fn inside_one_block() {
        assert_eq!(split(4096 + 10, 100), vec![(1, 10, 100, 0)]);
        assert_eq!(split(0, 4096), vec![(0, 0, 4096, 0)]);
    }

    #[test]
    fn spanning_many_blocks_unaligned_at_both_ends() {
        assert_eq!(
            split(4000, 4096 * 2 + 200),
            vec![(0, 4000, 96, 0), (1, 0, 4096, 96), (2, 0, 4096, 4192), (3, 0, 104, 8288)]
        );
    }

    #[test]
    fn touching_the_last_block() {
        assert_eq!(split(4 * 4096 - 1, 1), vec![(3, 4095, 1, 0)]);
        assert_eq!(split(3 * 4096, 4096), vec![(3, 0, 4096, 0)]);
    }

    #[test]
    fn whole_blocks_of_a_range() {
        let g = Geometry::new(4 * 4096, 4096).unwrap();
        assert_eq!(g.whole_blocks(0, 4 * 4096), 0..4);
        assert_eq!(g.whole_blocks(1, 4 * 4096 - 2), 1..3);
        assert_eq!(g.whole_blocks(10, 100), 1..1);
        assert!(g.whole_blocks(4096, 4095).is_empty());
    }

    #[test]
    fn partial_pieces_are_the_edges() {
        let g = Geometry::new(1 << 40, 4096).unwrap();
        let edges = |o, l| {
            g.partial_pieces(o, l)
                .unwrap()
                .iter()
                .map(|p| (p.block.0, p.offset_in_block, p.len, p.buf_offset))
                .collect::<Vec<_>>()
        };
        assert_eq!(edges(0, 1 << 40), vec![]);
        assert_eq!(
            edges(100, (1 << 40) - 200),
            vec![(0, 100, 3996, 0), ((1 << 40) / 4096 - 1, 0, 3996, (1 << 40) - 200 - 3996)]
        );
        assert_eq!(edges(4096 + 5, 10), vec![(1, 5, 10, 0)]);
        assert_eq!(edges(4000, 200), vec![(0, 4000, 96, 0), (1, 0, 104, 96)]);
        assert_eq!(edges(4096, 4096), vec![]);
    }

    #[test]
    fn zero_length_is_no_pieces() {
        assert!(split(100, 0).is_empty());
        assert!(split(4 * 4096, 0).is_empty());
    }

    #[test]
    fn past_the_end_is_out_of_range() {
        let g = Geometry::new(4 * 4096, 4096).unwrap();
        assert!(matches!(g.pieces(4 * 4096 - 1, 2), Err(Error::OutOfRange { .. })));
        assert!(matches!(g.pieces(u64::MAX, 2), Err(Error::OutOfRange { .. })));
    }

    #[test]
    fn bad_geometry_names_the_parameter() {
        for bs in [0, 1000, 256, 8 << 20] {
            let e = Geometry::new(1 << 30, bs).unwrap_err().to_string();
            assert!(e.starts_with("block-size: "), "{e}");
        }
        for size in [0, 4097] {
            let e = Geometry::new(size, 4096).unwrap_err().to_string();
            assert!(e.starts_with("size: "), "{e}");
        }
        assert_eq!(Geometry::new(1 << 20, 512).unwrap().blocks(), 2048);
    }
}
