//! Export names and the object keys derived from them.
//!
//! An export name becomes part of an S3 key and of a directory path, so it is validated once,
//! here, into an [`ExportName`]; nothing else ever builds a key or a path from a raw string.

use std::fmt;

use crate::storage::BlockId;
use crate::{Error, Result};

/// The prefix of every export's geometry record, beside `blocks/`.
pub const RECORD_PREFIX: &str = "exports/";

/// The prefix of every export's lease (see [`Lease`](crate::lease::Lease)).
pub const LEASE_PREFIX: &str = "leases/";

/// The longest export name accepted, in bytes.
pub const MAX_EXPORT_NAME: usize = 128;

/// A validated export name: 1 to 128 bytes of ASCII letters, digits, `.`, `_` and `-`, and
/// neither `.` nor `..`. It can never escape its key prefix or directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExportName(String);

impl ExportName {
    /// Validates `name`.
    ///
    /// # Errors
    /// [`Error::Config`] for parameter `export`, naming what is wrong.
    pub fn new(name: &str) -> Result<Self> {
        let problem = if name.is_empty() {
            Some("the name is empty".to_string())
        } else if name.len() > MAX_EXPORT_NAME {
            Some(format!("the name is {} bytes long, the limit is {MAX_EXPORT_NAME}", name.len()))
        } else if name == "." || name == ".." {
            Some(format!("{name:?} is not allowed"))
        } else {
            name.chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
                .map(|c| format!("character {c:?} is not allowed"))
        };
        match problem {
            None => Ok(ExportName(name.to_string())),
            Some(p) => Err(Error::config(
                "export",
                format!(
                    "invalid export name {:?}: {p} (use letters, digits, '.', '_' and '-', at most {MAX_EXPORT_NAME} bytes)",
                    name.escape_debug().to_string()
                ),
            )),
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix under which this export's blocks are stored: `blocks/{export}/`.
    pub fn block_prefix(&self) -> String {
        format!("blocks/{}/", self.0)
    }

    /// The key of this export's geometry record: `exports/{export}`.
    pub fn record_key(&self) -> String {
        format!("{RECORD_PREFIX}{}", self.0)
    }

    /// The key of this export's lease, naming its one writer: `leases/{export}`.
    pub fn lease_key(&self) -> String {
        format!("{LEASE_PREFIX}{}", self.0)
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

impl fmt::Display for ExportName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for n in ["dev", "a", "my_device-1.img", &"x".repeat(128)] {
            assert_eq!(ExportName::new(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn hostile_names_are_refused_with_the_reason() {
        let cases = [
            ("", "empty"),
            (".", "not allowed"),
            ("..", "not allowed"),
            ("a/b", "'/'"),
            ("../etc", "'/'"),
            ("a\0b", "'\\0'"),
            ("tab\there", "'\\t'"),
            ("é", "'é'"),
            (&"x".repeat(129), "129 bytes"),
            (&"x".repeat(1000), "1000 bytes"),
        ];
        for (name, why) in cases {
            let e = ExportName::new(name).unwrap_err().to_string();
            assert!(e.starts_with("export: invalid export name"), "{e}");
            assert!(e.contains(why), "{name:?}: {e}");
        }
    }

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
