//! Diff streams, version 1 (docs/DIFF-STREAM.md): the blocks that changed
//! between two maps of the `cas` layout, with their bytes, as one byte stream that another export
//! (in this bucket or another) applies atomically.
//!
//! Why one stream: an incremental backup is then `export-diff … | import-diff - …`, through a
//! pipe, a file or ssh, with nothing to stage. Why a checksum at the end and not per record: the
//! importer writes as it reads (its memory stays one batch of blocks whatever the stream's
//! size) and commits only after the end record's BLAKE3 of every byte before it matches, so a
//! stream cut short or altered anywhere changes nothing the target's readers see. That needs a target that commits at
//! FLUSH: a `cas` export, whose head moves only then.
//!
//! | importer state | on the next input | what the target's readers see |
//! |---|---|---|
//! | header read | base checked (root `from`), block size checked | the old state |
//! | records | each data block written, each zero run deleted, uncommitted | the old state |
//! | end record | checksum compared, nothing may follow | the old state |
//! | committed | one FLUSH | the new state |
//!
//! Any error before the commit (a bad checksum, end of input, a record out of order) leaves the
//! store unflushed: a `cas` target keeps its committed head, and what was uploaded is garbage for
//! a GC.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;

use super::format::{Hash, Root, MAX_DEPTH};
use super::ops::{self, Change};
use super::{CasConfig, CasStorage};
use crate::parallel::parallel;
use crate::storage::objects::ObjectStore;
use crate::storage::{BlockBuf, BlockId, Storage};
use crate::{Error, ExportName, Result};

/// The diff stream version this binary writes and reads.
pub const STREAM_VERSION: u32 = 1;

/// The first bytes of every diff stream.
const MAGIC: &[u8; 8] = b"NBDS3DIF";

/// The longest header accepted; real ones are a few hundred bytes.
const MAX_HEADER_BYTES: u32 = 64 * 1024;

/// Record kinds.
const RECORD_DATA: u8 = b'D';
const RECORD_ZERO: u8 = b'Z';
const RECORD_END: u8 = b'E';

/// Blocks deleted per call while applying a zero record (one S3 DeleteObjects on plain stores).
const ZERO_BATCH: u64 = 1000;

/// Blocks read or written at once: one request each, whose time is mostly latency on S3.
const PARALLEL_BLOCKS: usize = 16;

/// The most bytes of blocks held at once (by a batch of [`PARALLEL_BLOCKS`]), so memory stays
/// bounded at 4 MiB blocks too.
const BATCH_BYTES: usize = 16 << 20;

/// Blocks per batch at `block_size`.
fn batch_blocks(block_size: usize) -> usize {
    (BATCH_BYTES / block_size).clamp(1, PARALLEL_BLOCKS * 4)
}

/// One end of a diff: what the user called it, and the map it names. In a stream's header, the
/// map is named by its tree with its delta folded in ([`ops::folded`]), so that two maps holding
/// the same blocks match however much of them sits in a delta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// `EXPORT@SNAP`, `EXPORT`, or `-` for the empty device a full export starts from; for the
    /// reader's messages only.
    pub name: String,
    /// The map.
    pub root: Root,
}

impl Side {
    /// The empty device: a diff from it is a full export.
    pub fn empty() -> Self {
        Side { name: "-".into(), root: Root::EMPTY }
    }

    /// Whether `root` holds the same content as this side's map, both folded (equal top pages
    /// are equal trees; a page's hash covers its level, so the depth follows).
    pub fn matches(&self, root: &Root) -> bool {
        self.root.page == root.page
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.root.page {
            Some(page) => write!(f, "{} (map {page})", self.name),
            None => write!(f, "{} (an empty map)", self.name),
        }
    }
}

/// What a diff stream says about itself before its records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// The block size of both sides; every record is in whole blocks.
    pub block_size: usize,
    /// The device size of the `to` side, in bytes; every record lies below it.
    pub device_size: u64,
    /// The state the stream applies to.
    pub from: Side,
    /// The state it produces.
    pub to: Side,
    /// Blocks its records carry, data and zero: for progress, and checked at the end.
    pub blocks: u64,
}

/// What writing or applying a stream did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSummary {
    /// Blocks carried with their bytes.
    pub data_blocks: u64,
    /// Blocks carried as zero runs.
    pub zero_blocks: u64,
    /// Bytes of the whole stream.
    pub stream_bytes: u64,
}

/// A stream error: `what`, at byte `at` of the stream.
fn bad(at: u64, what: impl fmt::Display) -> Error {
    Error::config("diff stream", format!("at byte {at}: {what}"))
}

/// Writes the diff stream from `from` to `to` into `out`: the runs of blocks whose content
/// differs (found in `store`'s map pages, so the cost follows what changed) below `device_size`,
/// with the bytes of each changed block read from `reader`, which must serve `to.root`. Calls
/// `progress(done, total)` in blocks.
///
/// # Errors
/// Store failures, pages or chunks that fail their checks, and write errors of `out`.
pub fn write_stream(
    store: &dyn ObjectStore,
    from: Side,
    to: Side,
    device_size: u64,
    reader: &dyn Storage,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<StreamSummary> {
    let bs = reader.block_size() as u64;
    let device_blocks = device_size / bs;
    let runs: Vec<_> = ops::diff(store, &from.root, &to.root)?
        .into_iter()
        .filter(|r| r.first < device_blocks)
        .map(|mut r| {
            r.blocks = r.blocks.min(device_blocks - r.first);
            r
        })
        .collect();
    let total = runs.iter().map(|r| r.blocks).sum();
    let (from, to) =
        (Side { root: ops::folded(store, &from.root)?, ..from }, Side { root: ops::folded(store, &to.root)?, ..to });
    let header = StreamHeader { block_size: reader.block_size(), device_size, from, to, blocks: total };
    let mut out = Hashing::new(out);
    let mut summary = StreamSummary::default();
    out.put(MAGIC)?;
    out.put(&STREAM_VERSION.to_le_bytes())?;
    let text = header_text(&header);
    out.put(&(text.len() as u32).to_le_bytes())?;
    out.put(text.as_bytes())?;
    progress(0, total);
    let mut bufs: Vec<BlockBuf> =
        (0..batch_blocks(header.block_size)).map(|_| BlockBuf::zeroed(header.block_size)).collect();
    for run in runs {
        let kind = if run.change == Change::Data { RECORD_DATA } else { RECORD_ZERO };
        out.put(&[kind])?;
        out.put(&(run.first * bs).to_le_bytes())?;
        out.put(&(run.blocks * bs).to_le_bytes())?;
        if run.change == Change::Data {
            let end = run.first + run.blocks;
            let per_batch = bufs.len();
            for first in (run.first..end).step_by(per_batch) {
                let batch = &mut bufs[..(end - first).min(per_batch as u64) as usize];
                let reads = batch.iter_mut().zip(first..).collect();
                parallel(reads, PARALLEL_BLOCKS, |(buf, id)| {
                    if !reader.read_block(BlockId(id), buf)? {
                        buf.fill(0);
                    }
                    Ok(())
                })?;
                for buf in batch.iter() {
                    out.put(buf)?;
                }
                summary.data_blocks += batch.len() as u64;
                progress(summary.data_blocks + summary.zero_blocks, total);
            }
        } else {
            summary.zero_blocks += run.blocks;
            progress(summary.data_blocks + summary.zero_blocks, total);
        }
    }
    out.put(&[RECORD_END])?;
    let check = out.hasher.finalize();
    out.put(check.as_bytes())?;
    out.inner.flush().map_err(|e| Error::io("diff stream", "writing", &e))?;
    summary.stream_bytes = out.bytes;
    Ok(summary)
}

/// The header's text: `key=value` lines, unknown keys ignored by readers.
fn header_text(header: &StreamHeader) -> String {
    let root = |r: &Root| r.page.map_or_else(|| "none".to_string(), |h| h.to_string());
    format!(
        "block-size={}\ndevice-size={}\nblocks={}\nfrom={}\nfrom-root={}\nfrom-depth={}\nto={}\nto-root={}\nto-depth={}\n",
        header.block_size,
        header.device_size,
        header.blocks,
        header.from.name,
        root(&header.from.root),
        header.from.root.depth,
        header.to.name,
        root(&header.to.root),
        header.to.root.depth,
    )
}

/// Parses a header's text.
fn parse_header(text: &str, at: u64) -> Result<StreamHeader> {
    let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let field = |key: &str| fields.get(key).copied().ok_or_else(|| bad(at, format!("the header has no {key}=")));
    let number =
        |key: &str| field(key)?.parse::<u64>().map_err(|_| bad(at, format!("the header's {key}= is not a number")));
    let side = |which: &str| -> Result<Side> {
        let page = match field(&format!("{which}-root"))? {
            "none" => None,
            hex => {
                Some(Hash::parse_hex(hex).ok_or_else(|| bad(at, format!("the header's {which}-root= is not a hash")))?)
            }
        };
        let depth = u8::try_from(number(&format!("{which}-depth"))?)
            .ok()
            .filter(|d| (1..=MAX_DEPTH).contains(d))
            .ok_or_else(|| bad(at, format!("the header's {which}-depth= is out of range")))?;
        Ok(Side { name: field(which)?.to_string(), root: Root::tree(page, depth) })
    };
    let block_size = usize::try_from(number("block-size")?)
        .ok()
        .filter(|b| b.is_power_of_two())
        .ok_or_else(|| bad(at, "the header's block-size= is not a power of two"))?;
    let device_size = number("device-size")?;
    if device_size % block_size as u64 != 0 {
        return Err(bad(at, "the header's device-size= is not a multiple of its block size"));
    }
    Ok(StreamHeader { block_size, device_size, from: side("from")?, to: side("to")?, blocks: number("blocks")? })
}

/// Reads a diff stream's header from `input` (which [`apply_stream`] then continues from).
///
/// # Errors
/// [`Error::Config`] naming the byte for input that is not a diff stream, of a newer version, or
/// truncated; read errors.
pub fn read_header(input: &mut StreamReader<'_>) -> Result<StreamHeader> {
    let mut magic = [0; 8];
    input.take(&mut magic, "the header")?;
    if &magic != MAGIC {
        return Err(bad(0, "this is not an nbds3 diff stream (it does not start with NBDS3DIF)"));
    }
    let version = u32::from_le_bytes(input.array("the header")?);
    if version != STREAM_VERSION {
        return Err(bad(
            8,
            format!(
                "diff stream version {version}, but this nbds3 ({}) reads version {STREAM_VERSION}: use a newer nbds3 to import it",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    let len = u32::from_le_bytes(input.array("the header")?);
    if len > MAX_HEADER_BYTES {
        return Err(bad(12, format!("a header of {len} bytes (corrupt)")));
    }
    let mut text = vec![0; len as usize];
    input.take(&mut text, "the header")?;
    let text = String::from_utf8(text).map_err(|_| bad(16, "the header is not text (corrupt)"))?;
    parse_header(&text, 16)
}

/// Applies the records following `header` in `input` to `target`, then, once the end record's
/// checksum matches and nothing follows it, FLUSHes `target` once. Memory: one batch of blocks.
/// The caller checks the base (`header.from` against the target) between [`read_header`] and
/// this.
///
/// Atomic only on a target that commits at FLUSH (a `cas` export): there, an error returned
/// here leaves what its readers see unchanged; the caller drops `target` without flushing it.
///
/// # Errors
/// [`Error::Config`] naming the byte for a truncated or altered stream (the checksum), records out
/// of order, misaligned or past the device's end; target failures.
pub fn apply_stream(
    input: &mut StreamReader<'_>,
    header: &StreamHeader,
    target: &dyn Storage,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<StreamSummary> {
    if target.block_size() != header.block_size {
        return Err(bad(
            16,
            format!(
                "the stream has {}-byte blocks, {target} has {}-byte blocks",
                header.block_size,
                target.block_size()
            ),
        ));
    }
    let bs = header.block_size as u64;
    let mut summary = StreamSummary::default();
    let mut next_free = 0; // records are in increasing order and never overlap
    let mut bufs = vec![vec![0; header.block_size]; batch_blocks(header.block_size)];
    loop {
        let at = input.bytes;
        let [kind] = input.array("a record")?;
        if kind == RECORD_END {
            let check = input.hasher.finalize();
            let stated: [u8; 32] = input.array("the end record")?;
            if stated != *check.as_bytes() {
                return Err(bad(at, "the stream fails its BLAKE3 checksum (corrupt or altered in transit)"));
            }
            if summary.data_blocks + summary.zero_blocks != header.blocks {
                return Err(bad(
                    at,
                    format!(
                        "the records carry {} blocks, the header says {}",
                        summary.data_blocks + summary.zero_blocks,
                        header.blocks
                    ),
                ));
            }
            let mut extra = [0; 1];
            if input.inner.read(&mut extra).map_err(|e| Error::io("diff stream", "reading", &e))? != 0 {
                return Err(bad(input.bytes, "bytes follow the end record (two streams concatenated?)"));
            }
            break;
        }
        if kind != RECORD_DATA && kind != RECORD_ZERO {
            return Err(bad(at, format!("unknown record kind {kind:#04x} (corrupt)")));
        }
        let offset = u64::from_le_bytes(input.array("a record")?);
        let length = u64::from_le_bytes(input.array("a record")?);
        let end = offset.checked_add(length).filter(|&e| e <= header.device_size);
        let Some(end) = end.filter(|_| offset % bs == 0 && length % bs == 0 && length > 0 && offset >= next_free)
        else {
            return Err(bad(
                at,
                format!(
                    "a record of {length} bytes at offset {offset}: misaligned, empty, out of order or past the {}-byte device (corrupt)",
                    header.device_size
                ),
            ));
        };
        next_free = end;
        let blocks = offset / bs..end / bs;
        if kind == RECORD_DATA {
            let per_batch = bufs.len();
            for first in blocks.clone().step_by(per_batch) {
                let batch = &mut bufs[..(blocks.end - first).min(per_batch as u64) as usize];
                for buf in batch.iter_mut() {
                    input.take(buf, "a data record")?;
                }
                let writes = batch.iter().zip(first..).collect();
                parallel(writes, PARALLEL_BLOCKS, |(buf, id)| target.write_block(BlockId(id), buf))?;
                summary.data_blocks += batch.len() as u64;
                progress(summary.data_blocks + summary.zero_blocks, header.blocks);
            }
        } else {
            let mut first = blocks.start;
            while first < blocks.end {
                let last = blocks.end.min(first + ZERO_BATCH);
                target.delete_blocks(&(first..last).map(BlockId).collect::<Vec<_>>())?;
                summary.zero_blocks += last - first;
                progress(summary.data_blocks + summary.zero_blocks, header.blocks);
                first = last;
            }
        }
    }
    target.flush()?;
    summary.stream_bytes = input.bytes;
    Ok(summary)
}

/// Applies the diff stream read from `input` to `cas` export `export` (of `device_size` bytes in
/// blocks of `block_size`), committing it with one FLUSH only once the whole stream has checked
/// out. Unless `force`, the export's committed map must be the stream's `from` map. The caller
/// holds the export's lease. Calls `progress(done, total)` in blocks.
///
/// # Errors
/// [`Error::Config`] for a stream that is not one, of a newer version, truncated or altered, of
/// another block size, larger than the export, or made from another base; store failures, and a
/// second writer that commits meanwhile (the export then stays as that writer left it).
pub fn apply_to_export(
    store: Arc<dyn ObjectStore>,
    export: &ExportName,
    (device_size, block_size): (u64, usize),
    config: CasConfig,
    input: &mut dyn Read,
    force: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<StreamSummary> {
    let target = CasStorage::open(store.clone(), export, block_size, config)?;
    let unchanged = |e| match e {
        Error::Config { key, message } => {
            Error::Config { key, message: format!("{message}; export {export} is unchanged") }
        }
        Error::Backend { store, message, source } => {
            Error::Backend { store, message: format!("{message}; export {export} is unchanged"), source }
        }
        other => other,
    };
    let mut input = StreamReader::new(input);
    let header = read_header(&mut input).map_err(unchanged)?;
    check_base(&*store, &header, export, &target, (block_size, device_size), force).map_err(unchanged)?;
    apply_stream(&mut input, &header, &target, progress).map_err(unchanged)
}

/// Refuses a stream that does not fit `target` (see [`apply_to_export`]).
fn check_base(
    store: &dyn ObjectStore,
    header: &StreamHeader,
    export: &ExportName,
    target: &CasStorage,
    (block_size, device_size): (usize, u64),
    force: bool,
) -> Result<()> {
    let refuse = |what: String| Err(Error::config("import-diff", what));
    if header.block_size != block_size {
        return refuse(format!(
            "the stream has {}-byte blocks and export {export} {block_size}-byte blocks",
            header.block_size
        ));
    }
    if header.device_size > device_size {
        return refuse(format!(
            "the stream is of a {}-byte device and export {export} has {device_size} bytes: grow it first (nbds3ctl resize {export} --size {})",
            header.device_size, header.device_size
        ));
    }
    let current = ops::folded(store, &target.committed_root())?;
    if !force && !header.from.matches(&current) {
        let already = if header.to.matches(&current) { ", it already holds its result" } else { "" };
        return refuse(format!(
            "the stream applies to {} but export {export} holds another state{already} (give --force to apply it anyway)",
            header.from
        ));
    }
    Ok(())
}

/// A writer that hashes and counts what goes through it.
struct Hashing<'a> {
    inner: &'a mut dyn Write,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<'a> Hashing<'a> {
    fn new(inner: &'a mut dyn Write) -> Self {
        Hashing { inner, hasher: blake3::Hasher::new(), bytes: 0 }
    }

    fn put(&mut self, data: &[u8]) -> Result<()> {
        self.inner.write_all(data).map_err(|e| Error::io("diff stream", "writing", &e))?;
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        Ok(())
    }
}

/// A diff stream being read: hashes and counts every byte, and names the byte where input ends
/// too soon.
pub struct StreamReader<'a> {
    inner: &'a mut dyn Read,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl fmt::Debug for StreamReader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamReader").field("bytes", &self.bytes).finish()
    }
}

impl<'a> StreamReader<'a> {
    /// Reads a stream from `inner` (buffer it: records are read in small pieces).
    pub fn new(inner: &'a mut dyn Read) -> Self {
        StreamReader { inner, hasher: blake3::Hasher::new(), bytes: 0 }
    }

    /// Fills `buf`, or says the stream ends inside `what`.
    fn take(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(bad(self.bytes + filled as u64, format!("the stream ends inside {what} (truncated)")))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("diff stream", "reading", &e)),
            }
        }
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0; N];
        self.take(&mut out, what)?;
        Ok(out)
    }
}
