//! The plugin's parameters: their names, help text, parsing and validation, with no nbdkit in sight.
//!
//! Every parameter is one [`ConfigKey`]; `--help`, docs/PARAMETERS.md's table and the man page's
//! PARAMETERS ([`param_docs`](crate::param_docs)) are generated from [`ConfigKey::ALL`], so the
//! documentation cannot drift from what is parsed.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::export_name::ExportName;
use crate::export_record::Layout;
use crate::lease::LeaseConfig;
use crate::stats_file::StatsFormat;
use crate::storage::cas::format::MAX_DELTA_ENTRIES;
use crate::storage::cas::{CasConfig, DEFAULT_DELTA_ENTRIES};
use crate::storage::{S3Config, Secret};
use crate::volume::{VolumeConfig, DEFAULT_BLOCK_SIZE};
use crate::{Error, Result};

/// Which backend holds the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    /// RAM: lost when nbdkit exits.
    Memory,
    /// A local directory.
    File,
    /// An S3 bucket.
    S3,
}

/// One parameter of the plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ConfigKey {
    Storage,
    Export,
    Size,
    BlockSize,
    Create,
    Layout,
    CasUnconditional,
    CasDeltaEntries,
    CacheSize,
    MaxDirty,
    Dir,
    Bucket,
    Endpoint,
    Region,
    AccessKey,
    SecretKey,
    PathStyle,
    S3Concurrency,
    S3Timeout,
    WritebackDelay,
    StatsFile,
    StatsInterval,
    StatsFormat,
    LeaseTime,
    LeaseTakeover,
    HostId,
}

impl ConfigKey {
    /// Every key, in the order `--help` lists them.
    pub const ALL: [ConfigKey; 26] = [
        ConfigKey::Storage,
        ConfigKey::Export,
        ConfigKey::Size,
        ConfigKey::BlockSize,
        ConfigKey::Create,
        ConfigKey::Layout,
        ConfigKey::CasUnconditional,
        ConfigKey::CasDeltaEntries,
        ConfigKey::CacheSize,
        ConfigKey::MaxDirty,
        ConfigKey::Dir,
        ConfigKey::Bucket,
        ConfigKey::Endpoint,
        ConfigKey::Region,
        ConfigKey::AccessKey,
        ConfigKey::SecretKey,
        ConfigKey::PathStyle,
        ConfigKey::S3Concurrency,
        ConfigKey::S3Timeout,
        ConfigKey::WritebackDelay,
        ConfigKey::StatsFile,
        ConfigKey::StatsInterval,
        ConfigKey::StatsFormat,
        ConfigKey::LeaseTime,
        ConfigKey::LeaseTakeover,
        ConfigKey::HostId,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        self.doc().0
    }

    /// `(name, value placeholder, one-line description)`.
    pub fn doc(self) -> (&'static str, &'static str, &'static str) {
        match self {
            ConfigKey::Storage => (
                "storage",
                "memory|file|s3",
                "Where blocks live (default: s3 if bucket= is given, file if dir= is given).",
            ),
            ConfigKey::Export => {
                ("export", "NAME", "Export served to clients that ask for the default export \"\" (default: dev).")
            }
            ConfigKey::Size => (
                "size",
                "SIZE",
                "Size of new exports (K/M/G/T suffixes); existing exports keep their recorded size (see nbds3ctl resize).",
            ),
            ConfigKey::BlockSize => (
                "block-size",
                "SIZE",
                "Block (object) size of new exports: a power of two from 512 to 4M (default 4096).",
            ),
            ConfigKey::Create => (
                "create",
                "default|any|none",
                "Which exports a client's first open may create (given size=): default, only the one export= names; any; none, only nbds3ctl create makes exports.",
            ),
            ConfigKey::Layout => (
                "layout",
                "plain|cas",
                "Layout of new exports: plain, one object per block; cas, content-addressed with snapshots and clones (see nbds3ctl snapshot). Existing exports keep their recorded layout.",
            ),
            ConfigKey::CasUnconditional => (
                "cas-unconditional",
                "BOOL",
                "Write cas exports even on a server that ignores conditional writes (Garage): a second writer is then not fenced and can silently undo the other's commits (default false).",
            ),
            ConfigKey::CasDeltaEntries => (
                "cas-delta-entries",
                "N",
                "Blocks a cas writer keeps in its head's delta before folding them into the map's pages: more makes FLUSHes of scattered writes cost fewer requests and each head 82 bytes a block larger (default 1024, at most 8192; 0 puts every write in the map's pages).",
            ),
            ConfigKey::CacheSize => ("cache-size", "SIZE", "Memory for clean cached blocks per export (default 256M)."),
            ConfigKey::MaxDirty => (
                "max-dirty",
                "SIZE",
                "Unflushed data per export before the oldest is written back early (default 64M).",
            ),
            ConfigKey::Dir => ("dir", "PATH", "Directory of the file backend; blocks go to PATH/blocks/EXPORT/."),
            ConfigKey::Bucket => ("bucket", "NAME", "S3 bucket; created at start-up if missing and allowed."),
            ConfigKey::Endpoint => {
                ("endpoint", "URL", "S3 endpoint, e.g. http://localhost:9000 for MinIO (default: AWS).")
            }
            ConfigKey::Region => ("region", "REGION", "S3 signing region (default us-east-1)."),
            ConfigKey::AccessKey => ("access-key", "ID", "S3 access key id (default: the AWS credential chain)."),
            ConfigKey::SecretKey => {
                ("secret-key", "SECRET", "S3 secret key; '-' reads it from the terminal, '+FILE' from a file.")
            }
            ConfigKey::PathStyle => (
                "path-style",
                "BOOL",
                "Path-style S3 URLs, needed by MinIO and Garage (default: true if endpoint= is set).",
            ),
            ConfigKey::S3Concurrency => {
                ("s3-concurrency", "N", "Block uploads and deletes in flight per export, for write-back and FLUSH together; also the blocks one read fetches at once (default 16).")
            }
            ConfigKey::S3Timeout => {
                ("s3-timeout", "SECONDS", "Give up on an S3 request, retries included, after this long (default 30).")
            }
            ConfigKey::WritebackDelay => ("writeback-delay", "SECONDS", "Write back blocks dirty for this long, bounding what a crash loses (default: only on FLUSH and memory pressure)."),
            ConfigKey::StatsFile => ("stats-file", "PATH", "Write each export's counters to PATH every stats-interval, replacing it atomically."),
            ConfigKey::StatsInterval => ("stats-interval", "SECONDS", "How often stats-file is rewritten (default 10)."),
            ConfigKey::StatsFormat => ("stats-format", "text|prometheus", "Format of stats-file: key=value lines, or Prometheus' text format for node_exporter's textfile collector (default text)."),
            ConfigKey::LeaseTime => ("lease-time", "SECONDS", "A writer's lease on its export lasts this long unless renewed; at least twice s3-timeout; 0 turns leases off (default 60)."),
            ConfigKey::LeaseTakeover => ("lease-takeover", "BOOL", "Take the export's lease even from a live writer, which then stops writing (default false)."),
            ConfigKey::HostId => ("host-id", "NAME", "This host as export leases name it, unique per machine or container (default: $NBDS3_HOST_ID, else the hostname)."),
        }
    }

    /// The `--help` text: one line per parameter.
    pub fn help() -> String {
        ConfigKey::ALL
            .iter()
            .map(|k| {
                let (name, value, doc) = k.doc();
                format!("{:<28} {doc}", format!("{name}={value}"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl FromStr for ConfigKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let canonical = s.to_ascii_lowercase().replace('_', "-");
        let alias = match canonical.as_str() {
            "blocksize" => "block-size",
            "cachesize" => "cache-size",
            "directory" => "dir",
            "url" => "endpoint",
            other => other,
        };
        ConfigKey::ALL.into_iter().find(|k| k.name() == alias).ok_or_else(|| {
            let names: Vec<_> = ConfigKey::ALL.iter().map(|k| k.name()).collect();
            Error::config(s, format!("unknown parameter; the parameters are {}", names.join(", ")))
        })
    }
}

/// Which exports a client's first open may create, so that a mistyped export name is refused
/// rather than silently made into a new, empty device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreatePolicy {
    /// Only the export named by `export=`.
    DefaultExport,
    /// Any valid name.
    AnyExport,
    /// None: every export is made with `nbds3ctl create` first.
    NoExport,
}

/// Everything the command line configures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The backend.
    pub storage: Option<StorageKind>,
    /// The export served for the default name "".
    pub export: ExportName,
    /// The device size of new exports.
    pub size: Option<u64>,
    /// The block size of new exports (default 4096); must match existing ones.
    pub block_size: Option<usize>,
    /// Which exports an open may create.
    pub create: CreatePolicy,
    /// The layout of new exports; `None` (not given) means plain.
    pub layout: Option<Layout>,
    /// Write `cas` exports on a store without conditional writes.
    pub cas_unconditional: bool,
    /// Blocks a `cas` writer keeps in its delta before folding them into the map.
    pub cas_delta_entries: usize,
    /// Bytes of clean cache per export.
    pub cache_size: u64,
    /// Bytes of dirty data per export before early write-back.
    pub max_dirty: u64,
    /// The file backend's directory.
    pub dir: Option<PathBuf>,
    /// The S3 backend's settings.
    pub s3: S3Config,
    /// Background write-back of blocks dirty this long.
    pub writeback_delay: Option<Duration>,
    /// Where to write counters periodically.
    pub stats_file: Option<PathBuf>,
    /// How often to write them.
    pub stats_interval: Duration,
    /// In which format.
    pub stats_format: StatsFormat,
    /// How long a writer's lease lasts; `None` turns leases off.
    pub lease_time: Option<Duration>,
    /// Take the lease from a live holder.
    pub lease_takeover: bool,
    /// This host in leases (`host-id=`, else `$NBDS3_HOST_ID`); `None`: the hostname.
    pub host_id: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            storage: None,
            export: ExportName::new("dev").unwrap_or_else(|_| unreachable!("a valid literal")),
            size: None,
            block_size: None,
            create: CreatePolicy::DefaultExport,
            layout: None,
            cas_unconditional: false,
            cas_delta_entries: DEFAULT_DELTA_ENTRIES,
            cache_size: 256 << 20,
            max_dirty: 64 << 20,
            dir: None,
            s3: S3Config::default(),
            writeback_delay: None,
            stats_file: None,
            stats_interval: Duration::from_secs(10),
            stats_format: StatsFormat::Text,
            lease_time: Some(Duration::from_secs(60)),
            lease_takeover: false,
            host_id: None,
        }
    }
}

impl Config {
    /// Applies one `key=value` parameter.
    ///
    /// # Errors
    /// [`Error::Config`] naming the parameter and what it allows.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let k: ConfigKey = key.parse()?;
        let name = k.name();
        match k {
            ConfigKey::Storage => {
                self.storage = Some(match value {
                    "memory" => StorageKind::Memory,
                    "file" => StorageKind::File,
                    "s3" => StorageKind::S3,
                    _ => {
                        return Err(Error::config(name, format!("{value:?} is not a backend: use memory, file or s3")))
                    }
                })
            }
            ConfigKey::Export => self.export = ExportName::new(value)?,
            ConfigKey::Size => self.size = Some(parse_size(name, value)?),
            ConfigKey::BlockSize => {
                self.block_size = Some(
                    usize::try_from(parse_size(name, value)?)
                        .map_err(|_| Error::config(name, format!("{value} is too large")))?,
                )
            }
            ConfigKey::Create => {
                self.create = match value {
                    "default" => CreatePolicy::DefaultExport,
                    "any" => CreatePolicy::AnyExport,
                    "none" => CreatePolicy::NoExport,
                    _ => {
                        return Err(Error::config(name, format!("{value:?} is not allowed: use default, any or none")))
                    }
                }
            }
            ConfigKey::Layout => self.layout = Some(Layout::parse(value)?),
            ConfigKey::CasUnconditional => self.cas_unconditional = parse_bool(name, value)?,
            ConfigKey::CasDeltaEntries => {
                self.cas_delta_entries =
                    value.parse().ok().filter(|&n| n <= MAX_DELTA_ENTRIES / 2).ok_or_else(|| {
                        Error::config(
                            name,
                            format!("{value:?} is not a number of blocks from 0 to {}", MAX_DELTA_ENTRIES / 2),
                        )
                    })?
            }
            ConfigKey::CacheSize => self.cache_size = parse_size(name, value)?,
            ConfigKey::MaxDirty => self.max_dirty = parse_size(name, value)?,
            ConfigKey::Dir => self.dir = Some(non_empty(name, value)?.into()),
            ConfigKey::Bucket => self.s3.bucket = non_empty(name, value)?.to_string(),
            ConfigKey::Endpoint => self.s3.endpoint = Some(non_empty(name, value)?.to_string()),
            ConfigKey::Region => self.s3.region = non_empty(name, value)?.to_string(),
            ConfigKey::AccessKey => self.s3.access_key = Some(non_empty(name, value)?.to_string()),
            ConfigKey::SecretKey => self.s3.secret_key = Some(Secret(value.to_string())),
            ConfigKey::PathStyle => self.s3.path_style = Some(parse_bool(name, value)?),
            ConfigKey::S3Concurrency => {
                self.s3.concurrency = match value.parse::<usize>() {
                    Ok(n) if (1..=1024).contains(&n) => n,
                    _ => {
                        return Err(Error::config(
                            name,
                            format!("{value:?} is not allowed: use a whole number from 1 to 1024"),
                        ))
                    }
                }
            }
            ConfigKey::S3Timeout => self.s3.timeout = parse_seconds(name, value)?,
            ConfigKey::WritebackDelay => self.writeback_delay = Some(parse_seconds(name, value)?),
            ConfigKey::StatsFile => self.stats_file = Some(non_empty(name, value)?.into()),
            ConfigKey::StatsInterval => self.stats_interval = parse_seconds(name, value)?,
            ConfigKey::StatsFormat => {
                self.stats_format = match value {
                    "text" => StatsFormat::Text,
                    "prometheus" => StatsFormat::Prometheus,
                    _ => return Err(Error::config(name, format!("{value:?} is not a format: use text or prometheus"))),
                }
            }
            ConfigKey::LeaseTime => {
                self.lease_time = if value == "0" { None } else { Some(parse_seconds(name, value)?) }
            }
            ConfigKey::LeaseTakeover => self.lease_takeover = parse_bool(name, value)?,
            ConfigKey::HostId => self.host_id = Some(parse_host_id(name, value)?),
        }
        Ok(())
    }

    /// Checks the parameters as a whole and fills in defaults that depend on others.
    ///
    /// # Errors
    /// [`Error::Config`] for a missing or contradictory parameter.
    pub fn finish(&mut self) -> Result<()> {
        let storage = match self.storage {
            Some(kind) => kind,
            None if !self.s3.bucket.is_empty() => StorageKind::S3,
            None if self.dir.is_some() => StorageKind::File,
            None => {
                return Err(Error::config(
                    "storage",
                    "no backend chosen: give bucket=NAME for S3, dir=PATH for a directory, or storage=memory",
                ))
            }
        };
        self.storage = Some(storage);
        match storage {
            StorageKind::File if self.dir.is_none() => {
                return Err(Error::config("dir", "storage=file needs dir=PATH, the directory that holds the blocks"))
            }
            StorageKind::S3 if self.s3.bucket.is_empty() => {
                return Err(Error::config("bucket", "storage=s3 needs bucket=NAME"))
            }
            StorageKind::Memory if self.size.is_none() => {
                return Err(Error::config("size", "storage=memory needs size=SIZE, e.g. size=1G"))
            }
            _ => {}
        }
        if self.s3.path_style.is_none() {
            self.s3.path_style = Some(self.s3.endpoint.is_some());
        }
        if self.s3.access_key.is_some() != self.s3.secret_key.is_some() {
            return Err(Error::config("secret-key", "access-key= and secret-key= go together: give both or neither"));
        }
        if let Some(time) = self.lease_time.filter(|&t| t < 2 * self.s3.timeout) {
            return Err(Error::config(
                "lease-time",
                format!(
                    "{} s is less than twice s3-timeout ({} s): a writer must be able to renew its lease in time",
                    time.as_secs_f64(),
                    self.s3.timeout.as_secs_f64()
                ),
            ));
        }
        if self.host_id.is_none() {
            self.host_id = host_id_from_env(std::env::var_os(HOST_ID_VAR))?;
        }
        let block_size = self.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        crate::volume::Geometry::new(self.size.unwrap_or(block_size as u64), block_size)?;
        Ok(())
    }

    /// The backend, once [`finish`](Self::finish) has chosen it.
    pub fn storage_kind(&self) -> StorageKind {
        self.storage.unwrap_or(StorageKind::Memory)
    }

    /// How writers take their export's lease; `None` for RAM, which no other process can see,
    /// and with `lease-time=0`.
    pub fn lease_config(&self) -> Option<LeaseConfig> {
        let time = self.lease_time.filter(|_| self.storage_kind() != StorageKind::Memory)?;
        Some(LeaseConfig { time, takeover: self.lease_takeover, request_timeout: self.s3.timeout })
    }

    /// How `cas` exports are written; `allow_unconditional` where the store's missing conditional
    /// writes are accepted.
    pub fn cas_config(&self, allow_unconditional: bool) -> CasConfig {
        CasConfig { allow_unconditional, delta_entries: self.cas_delta_entries, ..CasConfig::default() }
    }

    /// How the volumes cache and write back.
    pub fn volume_config(&self) -> VolumeConfig {
        VolumeConfig {
            cache_bytes: self.cache_size,
            max_dirty_bytes: self.max_dirty,
            concurrency: match self.storage_kind() {
                StorageKind::S3 => self.s3.concurrency,
                StorageKind::File => 4,
                StorageKind::Memory => 1,
            },
            writeback_delay: self.writeback_delay,
        }
    }
}

fn non_empty<'a>(key: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        Err(Error::config(key, "an empty value is not allowed"))
    } else {
        Ok(value)
    }
}

/// Parses a size like nbdkit does: a whole number with an optional K, M, G, T, P or E suffix
/// (powers of 1024; `KB` and `KiB` spellings too).
///
/// # Errors
/// [`Error::Config`] for parameter `key`.
pub fn parse_size(key: &str, value: &str) -> Result<u64> {
    let bad = || {
        Error::config(key, format!("{value:?} is not a size: use a number with an optional K, M, G, T, P or E suffix"))
    };
    let digits = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, suffix) = value.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let suffix = suffix.to_ascii_uppercase();
    let suffix = suffix.strip_suffix("IB").or_else(|| suffix.strip_suffix('B')).unwrap_or(&suffix);
    let shift = match suffix {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        "E" => 60,
        _ => return Err(bad()),
    };
    number
        .checked_mul(1 << shift)
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| Error::config(key, format!("{value:?} is too large")))
}

fn parse_seconds(key: &str, value: &str) -> Result<Duration> {
    match value.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86400.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(Error::config(key, format!("{value:?} is not allowed: use seconds, more than 0 and at most 86400"))),
    }
}

/// The environment variable that names this host in leases when `host-id=` is not given.
pub const HOST_ID_VAR: &str = "NBDS3_HOST_ID";

/// A host id goes into the lease object's `key=value` lines, so it is kept to what hostnames
/// and container or node names use.
fn parse_host_id(key: &str, value: &str) -> Result<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    if (1..=253).contains(&value.len()) && value.chars().all(allowed) {
        Ok(value.to_string())
    } else {
        Err(Error::config(
            key,
            format!("{value:?} is not a host id: use 1 to 253 letters, digits, '.', '_', ':' and '-'"),
        ))
    }
}

/// The host id in `$NBDS3_HOST_ID` (`value`), if set: containers set their host's identity this
/// way more easily than with a parameter.
fn host_id_from_env(value: Option<std::ffi::OsString>) -> Result<Option<String>> {
    value.map(|id| parse_host_id(HOST_ID_VAR, &id.to_string_lossy())).transpose()
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(key, format!("{value:?} is not a boolean: use true or false"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configure(pairs: &[(&str, &str)]) -> Result<Config> {
        let mut c = Config::default();
        for (k, v) in pairs {
            c.set(k, v)?;
        }
        c.finish()?;
        Ok(c)
    }

    #[test]
    fn sizes_parse_like_nbdkit() {
        assert_eq!(parse_size("size", "4096").unwrap(), 4096);
        assert_eq!(parse_size("size", "1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("size", "10g").unwrap(), 10 << 30);
        assert_eq!(parse_size("size", "4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("size", "2KiB").unwrap(), 2048);
        assert_eq!(parse_size("size", "1TB").unwrap(), 1 << 40);
        for bad in ["", "G", "1.5G", "1X", "-1", "abc", "99999999999E"] {
            assert!(parse_size("size", bad).unwrap_err().to_string().starts_with("size: "), "{bad}");
        }
    }

    #[test]
    fn the_examples_from_the_readme_configure() {
        let c = configure(&[("storage", "memory"), ("size", "1G")]).unwrap();
        assert_eq!(c.storage_kind(), StorageKind::Memory);
        let c = configure(&[("storage", "file"), ("dir", "/tmp/x"), ("export", "dev"), ("size", "10G")]).unwrap();
        assert_eq!(c.storage_kind(), StorageKind::File);
        let c = configure(&[("bucket", "nbd-storage"), ("export", "dev"), ("size", "1G")]).unwrap();
        assert_eq!(c.storage_kind(), StorageKind::S3);
        assert_eq!(c.s3.path_style, Some(false));
        let c = configure(&[("bucket", "b"), ("endpoint", "http://localhost:9000")]).unwrap();
        assert_eq!(c.s3.path_style, Some(true));
    }

    #[test]
    fn cas_writers_take_their_delta_size() {
        let c = configure(&[("bucket", "b")]).unwrap();
        assert_eq!(c.cas_config(false).delta_entries, 1024);
        let c = configure(&[("bucket", "b"), ("cas-delta-entries", "8")]).unwrap();
        assert_eq!((c.cas_config(true).delta_entries, c.cas_config(true).allow_unconditional), (8, true));
    }

    #[test]
    fn leases_guard_shared_storage_only() {
        let c = configure(&[("bucket", "b")]).unwrap();
        assert_eq!(c.lease_config().map(|l| l.time), Some(Duration::from_secs(60)));
        let c = configure(&[("bucket", "b"), ("lease-time", "10"), ("s3-timeout", "5"), ("lease-takeover", "yes")]);
        let l = c.unwrap().lease_config().unwrap();
        assert_eq!((l.time, l.request_timeout, l.takeover), (Duration::from_secs(10), Duration::from_secs(5), true));
        assert_eq!(configure(&[("bucket", "b"), ("lease-time", "0")]).unwrap().lease_config(), None);
        assert_eq!(configure(&[("storage", "memory"), ("size", "1M")]).unwrap().lease_config(), None);
        let c = configure(&[("bucket", "b"), ("host-id", "node-7.rack_2:a")]).unwrap();
        assert_eq!(c.host_id.as_deref(), Some("node-7.rack_2:a"));
    }

    #[test]
    fn bad_values_name_the_parameter() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("storage", "memory"), ("size", "1G"), ("block-size", "1000")], "block-size: 1000 is not allowed"),
            (&[("storage", "memory"), ("size", "4097")], "size: 4097 is not allowed"),
            (&[("storage", "memory"), ("size", "lots")], "size: \"lots\" is not a size"),
            (&[("storage", "memory")], "size: storage=memory needs size="),
            (&[("storage", "file"), ("size", "1G")], "dir: storage=file needs dir="),
            (&[("storage", "s3")], "bucket: storage=s3 needs bucket="),
            (&[("storage", "tape")], "storage: \"tape\" is not a backend"),
            (&[("colour", "blue")], "colour: unknown parameter; the parameters are storage, export"),
            (&[("export", "../etc")], "export: invalid export name"),
            (&[("bucket", "b"), ("access-key", "a")], "secret-key: access-key= and secret-key= go together"),
            (&[("bucket", "b"), ("path-style", "maybe")], "path-style: \"maybe\" is not a boolean"),
            (&[("bucket", "b"), ("s3-concurrency", "0")], "s3-concurrency: \"0\" is not allowed"),
            (&[("bucket", "b"), ("s3-timeout", "soon")], "s3-timeout: \"soon\" is not allowed"),
            (&[("bucket", "b"), ("writeback-delay", "0")], "writeback-delay: \"0\" is not allowed"),
            (&[("bucket", "")], "bucket: an empty value is not allowed"),
            (&[("bucket", "b"), ("lease-time", "-1")], "lease-time: \"-1\" is not allowed"),
            (&[("bucket", "b"), ("lease-time", "59")], "lease-time: 59 s is less than twice s3-timeout (30 s)"),
            (&[("bucket", "b"), ("lease-takeover", "please")], "lease-takeover: \"please\" is not a boolean"),
            (
                &[("bucket", "b"), ("cas-delta-entries", "8193")],
                "cas-delta-entries: \"8193\" is not a number of blocks from 0 to 8192",
            ),
            (
                &[("bucket", "b"), ("stats-format", "json")],
                "stats-format: \"json\" is not a format: use text or prometheus",
            ),
            (&[("bucket", "b"), ("create", "all")], "create: \"all\" is not allowed: use default, any or none"),
            (&[("bucket", "b"), ("host-id", "")], "host-id: \"\" is not a host id"),
            (&[("bucket", "b"), ("host-id", "a\nexpires=0")], "host-id: \"a\\nexpires=0\" is not a host id"),
            (&[], "storage: no backend chosen"),
        ];
        for (pairs, expected) in cases {
            let e = configure(pairs).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn the_host_id_comes_from_the_environment_unless_given() {
        assert_eq!(host_id_from_env(None).unwrap(), None);
        assert_eq!(host_id_from_env(Some("node-1".into())).unwrap().as_deref(), Some("node-1"));
        let e = host_id_from_env(Some("two words".into())).unwrap_err().to_string();
        assert!(e.starts_with("NBDS3_HOST_ID: \"two words\" is not a host id"), "{e}");
        // The only test that sets the variable; the others do not look at the host id, or give it.
        std::env::set_var(HOST_ID_VAR, "from-env");
        let from_env = configure(&[("bucket", "b")]).map(|c| c.host_id);
        let given = configure(&[("bucket", "b"), ("host-id", "given")]).map(|c| c.host_id);
        std::env::remove_var(HOST_ID_VAR);
        assert_eq!(from_env.unwrap().as_deref(), Some("from-env"));
        assert_eq!(given.unwrap().as_deref(), Some("given"));
    }

    #[test]
    fn keys_accept_aliases_and_help_lists_every_key() {
        assert_eq!("blocksize".parse::<ConfigKey>().unwrap(), ConfigKey::BlockSize);
        assert_eq!("block_size".parse::<ConfigKey>().unwrap(), ConfigKey::BlockSize);
        let help = ConfigKey::help();
        for k in ConfigKey::ALL {
            assert!(help.contains(&format!("{}=", k.name())), "{}", k.name());
        }
        assert_eq!(help.lines().count(), ConfigKey::ALL.len());
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let c = configure(&[("bucket", "b"), ("access-key", "AKID"), ("secret-key", "hunter2")]).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
