//! An export's record: the short text at `exports/{export}` that says how to read the export's
//! blocks: its geometry and its layout.
//!
//! The record is a promise to every nbds3 that opens the bucket, older ones included, so its
//! format is versioned (docs/ARCHITECTURE.md, "What is stored in the bucket"):
//! * **Format 1** (no `format=` line) is a `plain` export: `size=` and `block-size=`. Plain
//!   exports are still written in format 1, so every nbds3 release can serve them.
//! * **Format 2** (`format=2`) adds `layout=` and spells the geometry `device-size=` and
//!   `device-block-size=`. Format-1 readers ignore keys they do not know, so a format-2 record
//!   that kept `size=` would be read by them as a plain export, and its blocks misread; without
//!   those keys they refuse it as malformed instead.
//!
//! A record of a newer format, or a layout this binary does not know, is refused with a message
//! that says so, never read as something else.

use std::fmt;

use std::sync::Arc;

use crate::storage::cas::format::head_key;
use crate::storage::cas::{read_head, CasConfig, CasStorage};
use crate::storage::{Backend, Storage};
use crate::volume::Geometry;
use crate::{Error, ExportName, Result};

/// The newest record format this binary reads and writes.
pub const RECORD_FORMAT: u32 = 2;

/// The most characters of a malformed record that its error shows.
const MAX_RECORD_SHOWN: usize = 200;

/// How an export's blocks are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// One object per non-zero block, at `blocks/{export}/{offset:016x}`.
    #[default]
    Plain,
    /// Content-addressed chunks under a block map, committed at each FLUSH.
    Cas,
}

impl Layout {
    /// The layout named `name` (as in `layout=` and the record).
    ///
    /// # Errors
    /// [`Error::Config`] naming `layout` for a name this binary does not know.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "plain" => Ok(Layout::Plain),
            "cas" => Ok(Layout::Cas),
            other => Err(Error::config(
                "layout",
                format!(
                    "{:?} is not a layout this nbds3 ({}) knows: use plain or cas",
                    shown(other),
                    env!("CARGO_PKG_VERSION")
                ),
            )),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Plain => "plain",
            Layout::Cas => "cas",
        })
    }
}

/// What an export's record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportRecord {
    /// The device's size and block size.
    pub geometry: Geometry,
    /// How its blocks are stored.
    pub layout: Layout,
}

impl ExportRecord {
    /// A `plain` export of `geometry`.
    pub fn plain(geometry: Geometry) -> Self {
        ExportRecord { geometry, layout: Layout::Plain }
    }

    /// The record's text: format 1 for `plain` exports, format 2 for the others.
    pub fn to_text(&self) -> String {
        let (size, block_size) = (self.geometry.size(), self.geometry.block_size());
        match self.layout {
            Layout::Plain => format!(
                "# nbds3 export geometry; the block size never changes, the size only with nbds3ctl resize\nsize={size}\nblock-size={block_size}\n"
            ),
            layout => format!(
                "# nbds3 export record; the layout and block size never change, the size only with nbds3ctl resize\nformat={RECORD_FORMAT}\nlayout={layout}\ndevice-size={size}\ndevice-block-size={block_size}\n"
            ),
        }
    }

    /// Parses a record of format 1 or 2.
    ///
    /// # Errors
    /// [`Error::Config`] naming `export` for a malformed record, one of a newer format or an
    /// unknown layout, or values that are not allowed.
    pub fn parse(text: &str) -> Result<Self> {
        Self::parse_text(text).map_err(|refusal| match refusal {
            Refusal::Malformed(message) => Error::config("export", message),
            Refusal::Unreadable(e) => e,
        })
    }

    fn parse_text(text: &str) -> Result<Self, Refusal> {
        let mut fields = std::collections::HashMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if let Some((key, value)) = line.split_once('=') {
                fields.entry(key).or_insert(value);
            }
        }
        let malformed = || {
            // The record comes from the store, and may be anything of any size.
            let cut = if text.chars().count() > MAX_RECORD_SHOWN { "..." } else { "" };
            Refusal::Malformed(format!("malformed export record {:?}{cut}", shown(text)))
        };
        let number = |key: &str| fields.get(key).and_then(|v| v.parse::<u64>().ok());
        let (layout, size_key, block_size_key) = match fields.get("format") {
            None => (Layout::Plain, "size", "block-size"),
            Some(f) => match f.parse::<u32>() {
                Ok(2) => {
                    let layout = fields.get("layout").ok_or_else(malformed)?;
                    let layout = Layout::parse(layout).map_err(|_| {
                        Refusal::Unreadable(Error::config(
                            "export",
                            format!(
                                "the export's layout is {:?}, which this nbds3 ({}) does not know: upgrade nbds3 to serve it",
                                shown(layout),
                                env!("CARGO_PKG_VERSION")
                            ),
                        ))
                    })?;
                    (layout, "device-size", "device-block-size")
                }
                Ok(newer) if newer > RECORD_FORMAT => {
                    return Err(Refusal::Unreadable(Error::config(
                        "export",
                        format!(
                            "the export's record is format {newer}, written by a newer nbds3; this one ({}) reads formats 1 to {RECORD_FORMAT}: upgrade nbds3 to serve it",
                            env!("CARGO_PKG_VERSION")
                        ),
                    )))
                }
                _ => return Err(malformed()),
            },
        };
        match (number(size_key), number(block_size_key)) {
            (Some(size), Some(block_size)) => {
                let block_size = usize::try_from(block_size).map_err(|_| malformed())?;
                let geometry = Geometry::new(size, block_size).map_err(|e| Refusal::Malformed(e.to_string()))?;
                Ok(ExportRecord { geometry, layout })
            }
            _ => Err(malformed()),
        }
    }

    /// The record of `export` in `backend`; `None` if it has none.
    ///
    /// # Errors
    /// Backend failures, [`Error::CorruptRecord`] for a record that is not one nbds3 wrote, and
    /// [`Error::Config`] for one this binary cannot read (a newer format, an unknown layout).
    pub fn read(backend: &dyn Backend, export: &ExportName) -> Result<Option<Self>> {
        let Some(text) = backend.read_record(export)? else { return Ok(None) };
        Self::parse_text(&text).map(Some).map_err(|refusal| match refusal {
            Refusal::Malformed(message) => {
                Error::CorruptRecord { store: backend.to_string(), key: export.record_key(), message }
            }
            Refusal::Unreadable(e) => e,
        })
    }

    /// The blocks of `export`, stored as this record's layout says: the one place a layout
    /// chooses the store under the cache. `cas` says how a `cas` export is written (on a server
    /// that ignores conditional writes with nbdkit's `cas-unconditional=`).
    ///
    /// # Errors
    /// Backend failures, and a `cas` export refused for writing on such a server.
    pub fn open_storage(&self, backend: &dyn Backend, export: &ExportName, cas: CasConfig) -> Result<Arc<dyn Storage>> {
        let block_size = self.geometry.block_size();
        match self.layout {
            Layout::Plain => backend.open(export, block_size),
            Layout::Cas => Ok(Arc::new(CasStorage::open(backend.objects(), export, block_size, cas)?)),
        }
    }

    /// Writes this as the record of `export` in `backend`.
    ///
    /// # Errors
    /// Backend failures.
    pub fn write(&self, backend: &dyn Backend, export: &ExportName) -> Result<()> {
        backend.write_record(export, &self.to_text())
    }

    /// Writes this as the record of a new export `export`, which has none. A `cas` head already
    /// at that name, left by a clone or delete that was interrupted, is refused: a `cas` export
    /// made there would serve that head's blocks.
    ///
    /// # Errors
    /// A head at the name, naming it and how to free the name; backend failures.
    pub fn create(&self, backend: &dyn Backend, export: &ExportName) -> Result<()> {
        if read_head(&*backend.objects(), export)?.is_some() {
            return Err(Error::config(
                "export",
                format!(
                    "export {export} has no record but a cas head ({}), left by an interrupted clone or delete: `nbds3ctl delete {export}` frees the name",
                    head_key(export)
                ),
            ));
        }
        self.write(backend, export)
    }
}

/// Why a record's text was refused.
enum Refusal {
    /// It is not a record nbds3 wrote (or its values are not allowed): the message says how.
    Malformed(String),
    /// It may be one a newer nbds3 wrote, which this one cannot read.
    Unreadable(Error),
}

/// The start of `text`, for messages: what the store gave may be anything of any size.
fn shown(text: &str) -> String {
    text.chars().take(MAX_RECORD_SHOWN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        Geometry::new(1 << 30, 65536).unwrap()
    }

    #[test]
    fn records_round_trip_in_both_formats() {
        for layout in [Layout::Plain, Layout::Cas] {
            let record = ExportRecord { geometry: geometry(), layout };
            assert_eq!(ExportRecord::parse(&record.to_text()).unwrap(), record);
        }
        assert!(!ExportRecord::plain(geometry()).to_text().contains("format="), "plain stays format 1");
    }

    #[test]
    fn a_format_2_record_is_malformed_to_a_format_1_reader() {
        // What a format-1 reader needs: both `size=` and `block-size=` lines.
        let text = ExportRecord { geometry: geometry(), layout: Layout::Cas }.to_text();
        let keys: Vec<&str> = text.lines().filter_map(|l| l.split_once('=')).map(|(k, _)| k).collect();
        assert!(!keys.contains(&"size") && !keys.contains(&"block-size"), "{text}");
    }

    #[test]
    fn newer_formats_unknown_layouts_and_malformed_records_are_refused() {
        let cases = [
            ("format=3\nlayout=cas\ndevice-size=4096\ndevice-block-size=4096", "format 3, written by a newer nbds3"),
            ("format=2\nlayout=packed\ndevice-size=4096\ndevice-block-size=4096", "layout is \"packed\""),
            ("format=2\ndevice-size=4096\ndevice-block-size=4096", "malformed"),
            ("format=2\nlayout=cas\nsize=4096\nblock-size=4096", "malformed"),
            ("format=x\nsize=4096\nblock-size=4096", "malformed"),
            ("", "malformed"),
            ("size=1024", "malformed"),
            ("size=x\nblock-size=4096", "malformed"),
            ("size=4097\nblock-size=4096", "size: 4097 is not allowed"),
            ("size=4096\nblock-size=18446744073709551615", "block-size: "),
        ];
        for (text, why) in cases {
            let e = ExportRecord::parse(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_malformed_stored_record_is_a_corrupt_record_named_by_its_key() {
        let backend = crate::storage::MemoryBackend::default();
        let export = ExportName::new("dev").unwrap();
        backend.write_record(&export, "size=x").unwrap();
        let e = ExportRecord::read(&backend, &export).unwrap_err();
        assert!(matches!(&e, Error::CorruptRecord { key, .. } if key == "exports/dev"), "{e:?}");
        assert!(e.to_string().contains("malformed export record"), "{e}");
    }

    #[test]
    fn layouts_parse_by_name() {
        assert_eq!(Layout::parse("cas").unwrap(), Layout::Cas);
        assert!(Layout::parse("CAS").unwrap_err().to_string().starts_with("layout: \"CAS\" is not a layout"));
    }
}
