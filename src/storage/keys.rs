//! The layout of a bucket (or directory): where an export's blocks, geometry record and lease
//! are stored. Every backend builds its keys here, so the layout has one owner; it is the stored
//! format described in docs/ (`blocks/{export}/{offset}`, `exports/{export}`, `leases/{export}`).

use super::BlockId;
use crate::export_name::ExportName;

/// The prefix of every export's geometry record, beside `blocks/`.
pub const RECORD_PREFIX: &str = "exports/";

/// The prefix of every export's lease (see [`Lease`](crate::lease::Lease)).
pub const LEASE_PREFIX: &str = "leases/";

impl ExportName {
    /// The prefix under which this export's blocks are stored: `blocks/{export}/`.
    pub fn block_prefix(&self) -> String {
        format!("blocks/{}/", self.as_str())
    }

    /// The key of this export's geometry record: `exports/{export}`.
    pub fn record_key(&self) -> String {
        format!("{RECORD_PREFIX}{}", self.as_str())
    }

    /// The key of this export's lease, naming its one writer: `leases/{export}`.
    pub fn lease_key(&self) -> String {
        format!("{LEASE_PREFIX}{}", self.as_str())
    }

    /// The key of block `id`: `blocks/{export}/{byte offset as 16 lowercase hex digits}`.
    pub fn block_key(&self, id: BlockId, block_size: usize) -> String {
        format!("{}{}", self.block_prefix(), block_leaf(id, block_size))
    }
}

/// The last component of a block's key: its byte offset in 16 lowercase hex digits.
pub(crate) fn block_leaf(id: BlockId, block_size: usize) -> String {
    format!("{:016x}", id.0.saturating_mul(block_size as u64))
}

/// Parses the last component of a block key back into a block index.
///
/// Returns `None` for anything that is not 16 lowercase hex digits of a block-aligned offset,
/// so strays (temporary files, someone else's objects) are never mistaken for blocks.
pub(crate) fn parse_block_leaf(leaf: &str, block_size: usize) -> Option<BlockId> {
    if leaf.len() != 16 || !leaf.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let offset = u64::from_str_radix(leaf, 16).ok()?;
    let bs = block_size as u64;
    (offset % bs == 0).then_some(BlockId(offset / bs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        let dev = ExportName::new("dev").unwrap();
        assert_eq!(dev.block_key(BlockId(1), 4096), "blocks/dev/0000000000001000");
        assert_eq!(dev.block_key(BlockId(3), 1 << 20), "blocks/dev/0000000000300000");
        assert_eq!(parse_block_leaf("0000000000001000", 4096), Some(BlockId(1)));
        assert_eq!(parse_block_leaf("0000000000001001", 4096), None);
        assert_eq!(parse_block_leaf("000000000000100A", 4096), None);
        assert_eq!(parse_block_leaf(".0000000000001000.tmp", 4096), None);
    }
}
