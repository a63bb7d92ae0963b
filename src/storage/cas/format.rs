//! The `cas` layout's stored format (docs/CAS-FORMAT.md): object keys, map pages (version 1),
//! heads and snapshot records (version 2, which adds the delta; version 1 still read), encoded and
//! checked here and nowhere else.
//!
//! Every object is checked when it is read: chunks and pages against the BLAKE3 hash that names
//! them, heads and snapshot records against the hash on their last line. An object that is
//! truncated, of a newer version, or fails its check is an error naming its key, never a panic
//! and never data.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::storage::BlockId;
use crate::{Error, ExportName, Result};

/// The version of the map pages this binary reads and writes.
pub const PAGE_VERSION: u32 = 1;

/// The version of the heads and snapshot records this binary writes: 2 carries a delta. It reads
/// [`RECORD_VERSION_NO_DELTA`] too; older binaries refuse version 2, which they would otherwise
/// serve without its delta (stale blocks).
pub const RECORD_VERSION: u32 = 2;

/// The head and snapshot record version before the delta, still read.
pub const RECORD_VERSION_NO_DELTA: u32 = 1;

/// The most entries a stored delta may have: the reader's limit, above any writer's
/// `delta_entries` (which a writer exceeds only by the writes that race with its fold).
pub const MAX_DELTA_ENTRIES: usize = 16384;

/// Bytes of one delta entry in a record: `{16 hex}:{64 hex}` and a separator.
const DELTA_ENTRY_BYTES: usize = 16 + 1 + 64 + 1;

/// Bits of a block index each map level resolves: a page has up to 1024 entries.
pub const FANOUT_BITS: u32 = 10;

/// Entries per page.
pub const FANOUT: usize = 1 << FANOUT_BITS;

/// The most levels a map needs: enough for every `u64` block index.
pub const MAX_DEPTH: u8 = 64_u32.div_ceil(FANOUT_BITS) as u8;

/// The first bytes of every map page.
const PAGE_MAGIC: &[u8; 4] = b"NBMP";

/// Bytes before a page's entries: magic, version, level, entry count.
const PAGE_HEADER: usize = 4 + 1 + 1 + 2;

/// The largest page there can be: every slot of the widest entry kind.
pub const MAX_PAGE_BYTES: usize = PAGE_HEADER + FANOUT * (2 + 1 + 32 + 8 + 4);

/// The largest head or snapshot record read: a few hundred bytes and the delta, at most
/// [`MAX_DELTA_ENTRIES`] entries.
pub const MAX_RECORD_BYTES: usize = 4096 + MAX_DELTA_ENTRIES * DELTA_ENTRY_BYTES;

/// The prefix of every `cas` object.
pub const CAS_PREFIX: &str = "cas/";

/// A BLAKE3 hash: the name of a chunk or a page.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Parses 64 lowercase hex digits.
    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Hash(out))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// The key of the chunk whose bytes hash to `hash`: `cas/chunks/{first two hex digits}/{hash}`.
pub fn chunk_key(hash: &Hash) -> String {
    let hex = hash.to_string();
    format!("{CAS_PREFIX}chunks/{}/{hex}", &hex[..2])
}

/// The key of the page whose bytes hash to `hash`: `cas/pages/{first two hex digits}/{hash}`.
pub fn page_key(hash: &Hash) -> String {
    let hex = hash.to_string();
    format!("{CAS_PREFIX}pages/{}/{hex}", &hex[..2])
}

/// The key of an export's head: `cas/heads/{export}`.
pub fn head_key(export: &ExportName) -> String {
    format!("{CAS_PREFIX}heads/{export}")
}

/// The prefix of an export's snapshot records: `cas/snapshots/{export}/`.
pub fn snapshot_prefix(export: &ExportName) -> String {
    format!("{CAS_PREFIX}snapshots/{export}/")
}

/// The key of snapshot `snap` of `export`: `cas/snapshots/{export}/{snap}`.
pub fn snapshot_key(export: &ExportName, snap: &ExportName) -> String {
    format!("{}{snap}", snapshot_prefix(export))
}

/// One slot of a map page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Leaf: the block's bytes are the chunk object named by this hash.
    Chunk(Hash),
    /// Interior: the subtree is the page named by this hash.
    Page(Hash),
}

/// Entry kind bytes. Kind 2 is reserved for "a range of a larger object" (packs); version 1
/// readers refuse it, as every kind they do not know.
const KIND_CHUNK: u8 = 1;
const KIND_PAGE: u8 = 3;

/// A decoded map page: the non-empty slots of one node of the radix tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// 0 for leaves (entries are chunks), higher for interior pages (entries are pages).
    pub level: u8,
    /// Slot (0..FANOUT) to entry; absent slots are holes.
    pub entries: BTreeMap<u16, Entry>,
}

impl Page {
    /// An empty page at `level`.
    pub fn empty(level: u8) -> Self {
        Page { level, entries: BTreeMap::new() }
    }

    /// The page's bytes; its name is their hash.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PAGE_HEADER + self.entries.len() * 35);
        out.extend_from_slice(PAGE_MAGIC);
        out.push(PAGE_VERSION as u8);
        out.push(self.level);
        out.extend_from_slice(&(self.entries.len() as u16).to_le_bytes());
        for (slot, entry) in &self.entries {
            out.extend_from_slice(&slot.to_le_bytes());
            let (kind, hash) = match entry {
                Entry::Chunk(h) => (KIND_CHUNK, h),
                Entry::Page(h) => (KIND_PAGE, h),
            };
            out.push(kind);
            out.extend_from_slice(&hash.0);
        }
        out
    }

    /// Decodes and checks the page stored at `key`, which must be named by `expected` and sit at
    /// `level` of its tree.
    ///
    /// # Errors
    /// [`Error::Backend`] naming `key` for bytes that fail their hash, are truncated, are of a
    /// newer version, or do not follow the format.
    pub fn decode(store: &dyn fmt::Display, key: &str, bytes: &[u8], expected: &Hash, level: u8) -> Result<Self> {
        let bad = |what: String| Error::backend(store, format!("map page {key}: {what}"));
        let actual = Hash::of(bytes);
        if actual != *expected {
            return Err(bad(format!(
                "its {} bytes hash to {actual}, not to its name (truncated or corrupt)",
                bytes.len()
            )));
        }
        if bytes.len() < PAGE_HEADER || &bytes[..4] != PAGE_MAGIC {
            return Err(bad("not a map page (no NBMP header)".into()));
        }
        let version = u32::from(bytes[4]);
        if version != PAGE_VERSION {
            return Err(bad(format!(
                "format version {version}, but this nbds3 ({}) reads version {PAGE_VERSION}: upgrade nbds3",
                env!("CARGO_PKG_VERSION")
            )));
        }
        if bytes[5] != level {
            return Err(bad(format!("a page of level {} where the map needs level {level}", bytes[5])));
        }
        let count = usize::from(u16::from_le_bytes([bytes[6], bytes[7]]));
        let mut page = Page::empty(level);
        let mut rest = &bytes[PAGE_HEADER..];
        for i in 0..count {
            let (head, tail) = rest.split_at_checked(3).ok_or_else(|| bad(format!("truncated at entry {i}")))?;
            let slot = u16::from_le_bytes([head[0], head[1]]);
            let kind = head[2];
            let want = if level == 0 { KIND_CHUNK } else { KIND_PAGE };
            if kind != want {
                return Err(bad(format!(
                    "entry {i} has kind {kind}, which a level-{level} page of format {PAGE_VERSION} cannot hold (a newer nbds3 may have written it)"
                )));
            }
            let (hash, tail) = tail.split_at_checked(32).ok_or_else(|| bad(format!("truncated at entry {i}")))?;
            let hash = Hash(hash.try_into().unwrap_or([0; 32]));
            if usize::from(slot) >= FANOUT || page.entries.last_key_value().is_some_and(|(&last, _)| last >= slot) {
                return Err(bad(format!("entry {i} has slot {slot}, out of order or out of range")));
            }
            page.entries.insert(slot, if level == 0 { Entry::Chunk(hash) } else { Entry::Page(hash) });
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the last entry", rest.len())));
        }
        Ok(page)
    }
}

/// The blocks changed since the tree was last updated (the last fold), carried inline in a head
/// or snapshot record: block index to its chunk, or `None` for a hole over the tree. Sorted by
/// index; empty is stored as nothing (cheap to clone, an `Arc`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta(Option<Arc<BTreeMap<u64, Option<Hash>>>>);

impl Delta {
    /// No changes over the tree.
    pub const NONE: Delta = Delta(None);

    /// The delta holding `entries`.
    pub fn new(entries: BTreeMap<u64, Option<Hash>>) -> Self {
        Delta((!entries.is_empty()).then(|| Arc::new(entries)))
    }

    /// What the delta says of block `id`: `Some(Some(chunk))`, `Some(None)` for a hole, `None`
    /// when the tree decides.
    pub fn get(&self, id: u64) -> Option<Option<Hash>> {
        self.0.as_ref().and_then(|m| m.get(&id).copied())
    }

    /// Its entries, in order of block index.
    pub fn entries(&self) -> impl Iterator<Item = (u64, Option<Hash>)> + '_ {
        self.0.iter().flat_map(|m| m.iter().map(|(&id, &chunk)| (id, chunk)))
    }

    /// How many entries it has.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// `{index as 16 hex}:{chunk as 64 hex, or zero}` per entry, separated by spaces.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(self.len() * DELTA_ENTRY_BYTES);
        for (id, chunk) in self.entries() {
            if !out.is_empty() {
                out.push(' ');
            }
            match chunk {
                Some(hash) => out.push_str(&format!("{id:016x}:{hash}")),
                None => out.push_str(&format!("{id:016x}:zero")),
            }
        }
        out
    }

    /// Parses [`encode`](Self::encode)'s text, refusing entries out of order, repeated,
    /// malformed, or more than [`MAX_DELTA_ENTRIES`]; the error says which. Entries may name any
    /// block, even past a snapshot's `device-size`: a snapshot taken while the export grows may
    /// copy a head with writes past the size it read, and reads never go past that size.
    pub fn decode(text: &str) -> std::result::Result<Self, String> {
        let mut entries = BTreeMap::new();
        for (i, item) in text.split(' ').filter(|t| !t.is_empty()).enumerate() {
            if i >= MAX_DELTA_ENTRIES {
                return Err(format!("more than {MAX_DELTA_ENTRIES} entries"));
            }
            let parsed = item.split_once(':').and_then(|(id, chunk)| {
                let id = (id.len() == 16 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
                    .then(|| u64::from_str_radix(id, 16).ok())??;
                let chunk = match chunk {
                    "zero" => None,
                    hex => Some(Hash::parse_hex(hex)?),
                };
                Some((id, chunk))
            });
            let (id, chunk) = parsed.ok_or_else(|| format!("entry {i} ({item:.90}) is malformed"))?;
            if entries.last_key_value().is_some_and(|(&last, _)| last >= id) {
                return Err(format!("entry {i} (block {id}) is out of order or repeated"));
            }
            entries.insert(id, chunk);
        }
        Ok(Delta::new(entries))
    }
}

/// An export's map: a radix tree of pages (its top page, or none for all holes, and its number
/// of levels) with a [`Delta`] over it. A block's chunk is the delta's entry if it has one, else
/// the tree's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    /// The top page, at level `depth - 1`; `None` when every block of the tree is a hole.
    pub page: Option<Hash>,
    /// Levels of the tree, 1..=MAX_DEPTH: it covers block indexes below `FANOUT^depth`.
    pub depth: u8,
    /// The blocks changed over the tree.
    pub delta: Delta,
}

impl Root {
    /// The map of a device that is all holes.
    pub const EMPTY: Root = Root { page: None, depth: 1, delta: Delta::NONE };

    /// The map that is the tree under `page` of `depth` levels, with no delta.
    pub const fn tree(page: Option<Hash>, depth: u8) -> Self {
        Root { page, depth, delta: Delta::NONE }
    }

    /// This map's tree alone, without its delta.
    pub fn tree_only(&self) -> Root {
        Root::tree(self.page, self.depth)
    }

    /// Levels a tree needs to hold this map's tree and every block of its delta.
    pub fn full_depth(&self) -> u8 {
        let last = self.delta.entries().last().map_or(0, |(id, _)| id);
        (self.depth..MAX_DEPTH).find(|&d| covers(d, BlockId(last))).unwrap_or(MAX_DEPTH)
    }
}

/// An export's head, `cas/heads/{export}`: its last committed map. It is replaced with
/// `If-Match` at each FLUSH, and its bytes are unique per write (generation and writer), so that
/// a store whose versions are hashes of the bytes (S3 ETags) still tells two commits apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Counts commits to this export, from 1.
    pub generation: u64,
    /// Who wrote this commit: unique per process and open.
    pub writer: String,
    /// The export's block size, which every chunk of the map has.
    pub block_size: usize,
    /// The committed map.
    pub root: Root,
}

/// A snapshot record, `cas/snapshots/{export}/{snap}`: an export's map as of a commit, with the
/// geometry a clone needs. Written once, with `If-None-Match`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The head generation it was taken from.
    pub generation: u64,
    /// The device size then, in bytes.
    pub device_size: u64,
    /// The export's block size.
    pub block_size: usize,
    /// The map.
    pub root: Root,
}

/// The first line of a head.
const HEAD_MAGIC: &str = "nbds3-cas-head";
/// The first line of a snapshot record.
const SNAPSHOT_MAGIC: &str = "nbds3-cas-snapshot";

/// Writes `magic version`, `fields` and a `check=` line holding the hash of everything before it.
fn encode_checked(magic: &str, fields: &[(&str, String)]) -> Vec<u8> {
    let mut text = format!("{magic} {RECORD_VERSION}\n");
    for (key, value) in fields {
        text.push_str(&format!("{key}={value}\n"));
    }
    let check = Hash::of(text.as_bytes());
    text.push_str(&format!("check={check}\n"));
    text.into_bytes()
}

/// Checks and splits a text record into its version and fields.
fn decode_checked<'a>(
    store: &dyn fmt::Display,
    key: &str,
    magic: &str,
    bytes: &'a [u8],
) -> Result<(u32, BTreeMap<&'a str, &'a str>)> {
    let bad = |what: String| Error::backend(store, format!("{key}: {what}"));
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not text (corrupt)".into()))?;
    let first = text.lines().next().unwrap_or("");
    let version = first
        .strip_prefix(magic)
        .and_then(|v| v.strip_prefix(' '))
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| bad(format!("does not start with \"{magic} VERSION\" (corrupt, or not a {magic})")))?;
    if version != RECORD_VERSION && version != RECORD_VERSION_NO_DELTA {
        return Err(bad(format!(
            "format version {version}, but this nbds3 ({}) reads versions {RECORD_VERSION_NO_DELTA} and {RECORD_VERSION}: upgrade nbds3",
            env!("CARGO_PKG_VERSION")
        )));
    }
    let body_end = text.rfind("check=").ok_or_else(|| bad("has no check= line (truncated)".into()))?;
    let (body, check) = text.split_at(body_end);
    let check = check.strip_prefix("check=").and_then(|c| c.strip_suffix('\n')).and_then(Hash::parse_hex);
    if check != Some(Hash::of(body.as_bytes())) {
        return Err(bad("fails its check= hash (truncated or corrupt)".into()));
    }
    Ok((version, body.lines().skip(1).filter_map(|l| l.split_once('=')).collect()))
}

/// Reads the map fields shared by heads and snapshot records: a version 2 record must have a
/// `delta=` line (empty for none).
fn decode_root(
    store: &dyn fmt::Display,
    key: &str,
    (version, fields): &(u32, BTreeMap<&str, &str>),
) -> Result<(usize, Root)> {
    let bad = missing_field(store, key);
    let block_size = field(fields, "block-size", &bad)?;
    let depth = fields.get("depth").and_then(|v| v.parse::<u8>().ok()).filter(|d| (1..=MAX_DEPTH).contains(d));
    let depth = depth.ok_or_else(|| bad("depth"))?;
    let page = match fields.get("root").copied() {
        Some("none") => None,
        Some(hex) => Some(Hash::parse_hex(hex).ok_or_else(|| bad("root"))?),
        None => return Err(bad("root")),
    };
    let delta = if *version == RECORD_VERSION_NO_DELTA {
        Delta::NONE
    } else {
        let text = fields.get("delta").ok_or_else(|| bad("delta"))?;
        Delta::decode(text).map_err(|e| Error::backend(store, format!("{key}: its delta: {e}")))?
    };
    Ok((block_size, Root { page, depth, delta }))
}

fn root_fields(block_size: usize, root: &Root) -> [(&'static str, String); 4] {
    [
        ("block-size", block_size.to_string()),
        ("depth", root.depth.to_string()),
        ("root", root.page.map_or_else(|| "none".to_string(), |h| h.to_string())),
        ("delta", root.delta.encode()),
    ]
}

/// Field `name`, parsed.
fn field<T: std::str::FromStr>(fields: &BTreeMap<&str, &str>, name: &str, bad: &dyn Fn(&str) -> Error) -> Result<T> {
    fields.get(name).and_then(|v| v.parse().ok()).ok_or_else(|| bad(name))
}

fn missing_field(store: &dyn fmt::Display, key: &str) -> impl Fn(&str) -> Error {
    let (store, key) = (store.to_string(), key.to_string());
    move |field| Error::backend(&store, format!("{key}: field {field} is missing or malformed"))
}

impl Head {
    /// The head's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut fields = vec![("generation", self.generation.to_string()), ("writer", self.writer.clone())];
        fields.extend(root_fields(self.block_size, &self.root));
        encode_checked(HEAD_MAGIC, &fields)
    }

    /// Decodes and checks the head stored at `key`.
    ///
    /// # Errors
    /// [`Error::Backend`] naming `key` for a truncated, corrupt or newer head, or a bad delta.
    pub fn decode(store: &dyn fmt::Display, key: &str, bytes: &[u8]) -> Result<Self> {
        let fields = decode_checked(store, key, HEAD_MAGIC, bytes)?;
        let bad = missing_field(store, key);
        let (block_size, root) = decode_root(store, key, &fields)?;
        Ok(Head {
            generation: field(&fields.1, "generation", &bad)?,
            writer: field(&fields.1, "writer", &bad)?,
            block_size,
            root,
        })
    }
}

impl SnapshotRecord {
    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut fields =
            vec![("generation", self.generation.to_string()), ("device-size", self.device_size.to_string())];
        fields.extend(root_fields(self.block_size, &self.root));
        encode_checked(SNAPSHOT_MAGIC, &fields)
    }

    /// Decodes and checks the snapshot record stored at `key`.
    ///
    /// # Errors
    /// [`Error::Backend`] naming `key` for a truncated, corrupt or newer record, or a bad delta.
    pub fn decode(store: &dyn fmt::Display, key: &str, bytes: &[u8]) -> Result<Self> {
        let fields = decode_checked(store, key, SNAPSHOT_MAGIC, bytes)?;
        let bad = missing_field(store, key);
        let (generation, device_size): (u64, u64) =
            (field(&fields.1, "generation", &bad)?, field(&fields.1, "device-size", &bad)?);
        let (block_size, root) = decode_root(store, key, &fields)?;
        Ok(SnapshotRecord { generation, device_size, block_size, root })
    }
}

/// Where block `id` sits at `level`: the index of its page among that level's pages, and its
/// slot in that page.
pub fn position(id: BlockId, level: u8) -> (u64, u16) {
    let shift = FANOUT_BITS * u32::from(level);
    let below = id.0.checked_shr(shift).unwrap_or(0);
    (below.checked_shr(FANOUT_BITS).unwrap_or(0), (below & (FANOUT as u64 - 1)) as u16)
}

/// Whether a map of `depth` levels covers block `id`.
pub fn covers(depth: u8, id: BlockId) -> bool {
    let bits = FANOUT_BITS * u32::from(depth);
    bits >= 64 || id.0 < (1u64 << bits)
}

/// The first block of page `index` at `level`, and how many blocks each of its slots covers.
pub fn page_span(level: u8, index: u64) -> (u64, u64) {
    let slot_blocks = 1u64.checked_shl(FANOUT_BITS * u32::from(level)).unwrap_or(0);
    let first = index.checked_shl(FANOUT_BITS * (u32::from(level) + 1)).unwrap_or(0);
    (first, slot_blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf() -> Page {
        let mut page = Page::empty(0);
        page.entries.insert(3, Entry::Chunk(Hash::of(b"a")));
        page.entries.insert(1023, Entry::Chunk(Hash::of(b"b")));
        page
    }

    #[test]
    fn pages_round_trip_and_are_checked() {
        let page = leaf();
        let bytes = page.encode();
        let name = Hash::of(&bytes);
        assert_eq!(Page::decode(&"s", "k", &bytes, &name, 0).unwrap(), page);
        let err = |bytes: &[u8], level| {
            Page::decode(&"s", "cas/pages/xx/k", bytes, &Hash::of(bytes), level).unwrap_err().to_string()
        };
        assert!(
            err(&bytes[..bytes.len() - 1], 0).contains("truncated at entry 1"),
            "{}",
            err(&bytes[..bytes.len() - 1], 0)
        );
        assert!(err(&bytes, 1).contains("level 0 where the map needs level 1"));
        let mut newer = bytes.clone();
        newer[4] = 2;
        assert!(err(&newer, 0).contains("format version 2"), "{}", err(&newer, 0));
        let mut packed = bytes.clone();
        packed[PAGE_HEADER + 2] = 2;
        assert!(err(&packed, 0).contains("kind 2"), "{}", err(&packed, 0));
        let e = Page::decode(&"s", "cas/pages/xx/k", &bytes[..10], &name, 0).unwrap_err().to_string();
        assert!(e.contains("cas/pages/xx/k") && e.contains("not to its name"), "{e}");
        assert!(err(b"", 0).contains("no NBMP header"));
    }

    fn delta(entries: &[(u64, Option<&[u8]>)]) -> Delta {
        Delta::new(entries.iter().map(|&(id, c)| (id, c.map(Hash::of))).collect())
    }

    /// A record of `magic` with `fields`, written as version `version` with a valid check.
    fn record(magic: &str, version: u32, fields: &[(&str, String)]) -> Vec<u8> {
        let text = String::from_utf8(encode_checked(magic, fields)).unwrap();
        let body = text[..text.rfind("check=").unwrap()].replacen(
            &format!(" {RECORD_VERSION}\n"),
            &format!(" {version}\n"),
            1,
        );
        format!("{body}check={}\n", Hash::of(body.as_bytes())).into_bytes()
    }

    #[test]
    fn heads_round_trip_and_are_checked() {
        let head = Head {
            generation: 7,
            writer: "w-1".into(),
            block_size: 4096,
            root: Root { page: Some(Hash::of(b"r")), depth: 3, delta: delta(&[(5, Some(b"x")), (1 << 40, None)]) },
        };
        let bytes = head.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("nbds3-cas-head 2\n"), "{text}");
        assert!(text.contains(&format!("delta=0000000000000005:{} 0000010000000000:zero\n", Hash::of(b"x"))), "{text}");
        assert_eq!(Head::decode(&"s", "cas/heads/e", &bytes).unwrap(), head);
        let err = |bytes: &[u8]| Head::decode(&"s", "cas/heads/e", bytes).unwrap_err().to_string();
        assert!(err(&bytes[..bytes.len() - 2]).contains("check= hash"), "{}", err(&bytes[..bytes.len() - 2]));
        assert!(err(&bytes[..40]).contains("no check= line"));
        let newer = text.replace("head 2", "head 3");
        assert!(err(newer.as_bytes()).contains("format version 3"));
        let tampered = String::from_utf8(bytes).unwrap().replace("generation=7", "generation=8");
        assert!(err(tampered.as_bytes()).starts_with("s: cas/heads/e: fails its check"));
        assert!(err(b"\xff").contains("not text"));
        let snap = SnapshotRecord { generation: 1, device_size: 1 << 20, block_size: 512, root: Root::EMPTY };
        assert_eq!(SnapshotRecord::decode(&"s", "k", &snap.encode()).unwrap(), snap);
        assert!(Head::decode(&"s", "k", &snap.encode()).unwrap_err().to_string().contains("not a nbds3-cas-head"));
    }

    #[test]
    fn version_1_records_read_without_a_delta() {
        let hash = Hash::of(b"r");
        let v1 = |magic, extra: &[(&str, String)]| {
            let mut fields = extra.to_vec();
            fields.extend([("block-size", "4096".to_string()), ("depth", "2".to_string()), ("root", hash.to_string())]);
            record(magic, 1, &fields)
        };
        let head = v1(HEAD_MAGIC, &[("generation", "3".into()), ("writer", "old".into())]);
        assert!(String::from_utf8_lossy(&head).starts_with("nbds3-cas-head 1\n"));
        let expected = Head { generation: 3, writer: "old".into(), block_size: 4096, root: Root::tree(Some(hash), 2) };
        assert_eq!(Head::decode(&"s", "cas/heads/e", &head).unwrap(), expected);
        let snap = v1(SNAPSHOT_MAGIC, &[("generation", "3".into()), ("device-size", "8192".into())]);
        let expected =
            SnapshotRecord { generation: 3, device_size: 8192, block_size: 4096, root: Root::tree(Some(hash), 2) };
        assert_eq!(SnapshotRecord::decode(&"s", "cas/snapshots/e/s", &snap).unwrap(), expected);
    }

    #[test]
    fn bad_deltas_are_refused_naming_the_record() {
        let chunk = Hash::of(b"c");
        let with_delta = |magic, delta: String| {
            record(
                magic,
                RECORD_VERSION,
                &[
                    ("generation", "1".into()),
                    ("writer", "w".into()),
                    ("device-size", (16 * 4096).to_string()),
                    ("block-size", "4096".into()),
                    ("depth", "1".into()),
                    ("root", "none".into()),
                    ("delta", delta),
                ],
            )
        };
        let head_err =
            |delta: String| Head::decode(&"s", "cas/heads/e", &with_delta(HEAD_MAGIC, delta)).unwrap_err().to_string();
        let cases = [
            (format!("0000000000000002:{chunk} 0000000000000001:zero"), "entry 1 (block 1) is out of order"),
            (
                format!("0000000000000002:{chunk} 0000000000000002:zero"),
                "entry 1 (block 2) is out of order or repeated",
            ),
            ("000000000000000g:zero".to_string(), "entry 0 (000000000000000g:zero) is malformed"),
            ("0000000000000001:abc".to_string(), "entry 0 (0000000000000001:abc) is malformed"),
            (format!("0000000000000001:{}", &chunk.to_string()[..63]), "is malformed"),
            ("1:zero".to_string(), "entry 0 (1:zero) is malformed"),
            ("0000000000000001".to_string(), "is malformed"),
            (
                (0..=MAX_DELTA_ENTRIES as u64).map(|i| format!("{i:016x}:zero")).collect::<Vec<_>>().join(" "),
                "more than 16384 entries",
            ),
        ];
        for (delta, why) in cases {
            let e = head_err(delta);
            assert!(e.starts_with("s: cas/heads/e: its delta: ") && e.contains(why), "{e}, wanted {why}");
        }
        let snap_err = |delta: String| {
            SnapshotRecord::decode(&"s", "cas/snapshots/e/a", &with_delta(SNAPSHOT_MAGIC, delta))
                .unwrap_err()
                .to_string()
        };
        let e = snap_err("1:zero".into());
        assert!(e.contains("cas/snapshots/e/a: its delta: entry 0 (1:zero) is malformed"), "{e}");
        // Past the device's 16 blocks: a hole as a shrink leaves, a chunk as a grow racing the
        // snapshot leaves.
        let past = with_delta(SNAPSHOT_MAGIC, format!("0000000000000010:zero 0000000000000011:{chunk}"));
        let past = SnapshotRecord::decode(&"s", "k", &past).unwrap();
        assert_eq!((past.root.delta.get(16), past.root.delta.get(17)), (Some(None), Some(Some(chunk))));
        let missing = record(
            HEAD_MAGIC,
            RECORD_VERSION,
            &[
                ("generation", "1".into()),
                ("writer", "w".into()),
                ("block-size", "4096".into()),
                ("depth", "1".into()),
                ("root", "none".into()),
            ],
        );
        let e = Head::decode(&"s", "cas/heads/e", &missing).unwrap_err().to_string();
        assert!(e.contains("cas/heads/e: field delta is missing"), "{e}");
    }

    #[test]
    fn positions_split_block_indexes_by_level() {
        assert_eq!(position(BlockId(0x12345), 0), (0x48, 0x345));
        assert_eq!(position(BlockId(0x12345), 1), (0, 0x48));
        assert_eq!(position(BlockId(u64::MAX), 6), (0, 0xf));
        assert!(covers(1, BlockId(1023)) && !covers(1, BlockId(1024)) && covers(7, BlockId(u64::MAX)));
        assert_eq!(page_span(1, 2), (2 << 20, 1024));
        assert_eq!(MAX_DEPTH, 7);
    }
}
