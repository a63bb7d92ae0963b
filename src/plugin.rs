//! The nbdkit glue, and nothing else: parameters into a [`Config`], callbacks into [`Volume`]
//! calls, every [`Error`] into an errno plus a message, and every panic caught before it can
//! unwind into C (which would abort nbdkit and drop every connection).

use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

use nbdkit::{CacheFlags, ExtentHandle, ExtentType, Flags, FuaFlags, Server, ThreadModel};

use crate::background::panic_message;
use crate::config::{ConfigKey, StorageKind};
use crate::exports::{Exports, OpenExport};
use crate::logger::sanitize;
use crate::{lock, storage, Config, Error, Result};

/// Parameters while nbdkit is still passing them.
static CONFIG: Mutex<Option<Config>> = Mutex::new(None);
/// The exports, once the configuration is complete.
static EXPORTS: OnceLock<Exports> = OnceLock::new();

extern "C" {
    fn nbdkit_read_password(value: *const c_char, password: *mut *mut c_char) -> c_int;
    fn nbdkit_export_name() -> *const c_char;
}

/// One client connection: the shared volume of the export it asked for.
struct Connection {
    export: OpenExport,
    readonly: bool,
}

/// Runs a callback body, turning errors into errno + message and panics into EIO.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> nbdkit::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(nbdkit::Error::new(e.errno(), sanitize(&e.to_string()))),
        Err(panic) => {
            let why = panic_message(&*panic);
            Err(nbdkit::Error::new(libc::EIO, sanitize(&format!("internal error in {what}: {why}"))))
        }
    }
}

/// The exports of this process, once the configuration is complete.
fn exports() -> Option<&'static Exports> {
    EXPORTS.get()
}

fn configured() -> Result<&'static Exports> {
    exports().ok_or_else(|| Error::config("config", "the configuration is not complete"))
}

/// Reads a password the way nbdkit's own plugins do: `-` prompts, `+FILE` reads a file, `-FD`
/// reads a file descriptor, anything else is the password itself.
fn read_password(value: &str) -> Result<String> {
    let c_value = CString::new(value).map_err(|_| Error::config("secret-key", "contains a NUL byte"))?;
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: nbdkit fills `out` with a malloc'd NUL-terminated string that we free.
    let rc = unsafe { nbdkit_read_password(c_value.as_ptr(), &mut out) };
    if rc == -1 || out.is_null() {
        return Err(Error::config("secret-key", "could not read the secret (see the message above)"));
    }
    // SAFETY: `out` is a valid C string from nbdkit, freed right after copying.
    let secret = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
    unsafe { libc::free(out.cast()) };
    Ok(secret)
}

/// Warns when the secret key is on nbdkit's command line itself (not `-`, `-FD` or `+FILE`, which
/// [`read_password`] reads from elsewhere): there `ps` shows it to every user of the host, and
/// nbdkit's `-v` log prints it with every other `key=value`. The warning never shows the value.
fn warn_if_inline(key: &str, value: &str) {
    if !value.is_empty() && !value.starts_with(['-', '+']) {
        log::warn!(
            "{key}= was given on the command line, where `ps` and nbdkit's -v debug log show it; give \
             {key}=+FILE (a file only nbdkit's user can read) instead, or leave access-key= and {key}= out \
             and let the AWS credential chain find the key (AWS_SECRET_ACCESS_KEY in the environment, \
             ~/.aws/credentials, an instance role)"
        );
    }
}

/// The export name the client asked for, inside `open`: `""` when it named none. Read here
/// rather than with `nbdkit::export_name()`, whose error for a name that is not UTF-8 would be
/// indistinguishable from no name, and would quietly serve the default export.
fn requested_export() -> Result<String> {
    // SAFETY: during `open` nbdkit returns NULL or a NUL-terminated string it keeps alive.
    let name = unsafe { nbdkit_export_name() };
    if name.is_null() {
        return Ok(String::new());
    }
    let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        let shown = String::from_utf8_lossy(bytes).escape_debug().to_string();
        Error::config("export", format!("invalid export name \"{shown}\": it is not UTF-8"))
    })
}

impl Server for Connection {
    fn name() -> &'static str {
        "nbds3"
    }

    fn version() -> Option<&'static str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    fn description() -> Option<&'static str> {
        Some("Serve an S3 bucket (or a directory, or RAM) as a network block device")
    }

    fn config_help() -> Option<&'static str> {
        static HELP: OnceLock<String> = OnceLock::new();
        Some(HELP.get_or_init(ConfigKey::help))
    }

    fn load() {
        crate::logger::install();
    }

    fn unload() {
        if let Some(exports) = EXPORTS.get() {
            // A panic here would abort nbdkit on its way out; the log already says what failed.
            let _ = catch_unwind(AssertUnwindSafe(|| exports.flush_all()));
        }
    }

    fn dump_plugin() {
        println!("nbds3_storage_backends=memory,file,s3");
        println!("nbds3_default_block_size={}", crate::volume::DEFAULT_BLOCK_SIZE);
    }

    fn thread_model() -> nbdkit::Result<ThreadModel> {
        Ok(ThreadModel::Parallel)
    }

    fn config(key: &str, value: &str) -> nbdkit::Result<()> {
        guard("config", || {
            let value = match key.parse::<ConfigKey>() {
                Ok(ConfigKey::SecretKey) => {
                    warn_if_inline(key, value);
                    read_password(value)?
                }
                _ => value.to_string(),
            };
            lock(&CONFIG).get_or_insert_with(Config::default).set(key, &value)
        })
    }

    fn config_complete() -> nbdkit::Result<()> {
        guard("config_complete", || {
            let mut config = lock(&CONFIG).take().unwrap_or_default();
            config.finish()?;
            if let Some(id) = &config.host_id {
                crate::lease::set_host_id(id);
            }
            if config.storage_kind() == StorageKind::S3 {
                // Fail now, before nbdkit forks and reports success, on a typo or bad credentials.
                storage::s3::check_bucket(&config.s3)?;
                if config.lease_config().is_some() && !storage::s3::probe_conditional_writes(&config.s3)? {
                    crate::lease::warn_without_conditional_writes(&config.s3.describe());
                }
            }
            EXPORTS.set(Exports::new(config)).map_err(|_| Error::config("config", "configured twice"))
        })
    }

    fn open(readonly: bool) -> nbdkit::Result<Box<dyn Server>> {
        guard("open", || {
            let requested = requested_export()?;
            let export = configured()?.open(&requested, readonly)?;
            // A snapshot is read-only: can_write false makes nbdkit refuse writes (EPERM/EROFS).
            let readonly = readonly || export.read_only;
            Ok(Box::new(Connection { export, readonly }) as Box<dyn Server>)
        })
    }

    fn get_size(&self) -> nbdkit::Result<i64> {
        guard("get_size", || Ok(i64::try_from(self.export.volume.geometry().size()).unwrap_or(i64::MAX)))
    }

    fn can_write(&self) -> nbdkit::Result<bool> {
        Ok(!self.readonly)
    }

    fn can_flush(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_fua(&self) -> nbdkit::Result<FuaFlags> {
        Ok(FuaFlags::Native)
    }

    fn can_multi_conn(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_trim(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_zero(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_fast_zero(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_cache(&self) -> nbdkit::Result<CacheFlags> {
        Ok(CacheFlags::Native)
    }

    fn can_extents(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn cache(&self, count: u32, offset: u64) -> nbdkit::Result<()> {
        guard("cache", || self.export.volume.prefetch(count.into(), offset))
    }

    fn extents(&self, count: u32, offset: u64, flags: Flags, handle: &mut ExtentHandle) -> nbdkit::Result<()> {
        guard("extents", || {
            for (offset, len, data) in self.export.volume.extents(count.into(), offset)? {
                let kind = if data { ExtentType::Allocated } else { ExtentType::HoleZero };
                handle.add(offset, len, kind).map_err(|e| Error::backend("nbdkit", e))?;
                if flags.contains(Flags::REQ_ONE) {
                    break;
                }
            }
            Ok(())
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> nbdkit::Result<()> {
        guard("pread", || self.export.volume.read_sequentially(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: Flags) -> nbdkit::Result<()> {
        guard("pwrite", || {
            self.export.check_writable()?;
            self.export.volume.write_sequentially(buf, offset, flags.contains(Flags::FUA))
        })
    }

    fn flush(&self) -> nbdkit::Result<()> {
        guard("flush", || {
            self.export.check_writable()?;
            self.export.volume.flush()
        })
    }

    fn trim(&self, count: u32, offset: u64, flags: Flags) -> nbdkit::Result<()> {
        guard("trim", || {
            self.export.check_writable()?;
            self.export.volume.zero(count.into(), offset, flags.contains(Flags::FUA), false)
        })
    }

    fn zero(&self, count: u32, offset: u64, flags: Flags) -> nbdkit::Result<()> {
        guard("zero", || {
            self.export.check_writable()?;
            self.export.volume.zero(count.into(), offset, flags.contains(Flags::FUA), flags.contains(Flags::FAST_ZERO))
        })
    }
}

nbdkit::plugin!(Connection {
    thread_model,
    config,
    config_complete,
    config_help,
    dump_plugin,
    load,
    unload,
    can_write,
    can_flush,
    can_fua,
    can_multi_conn,
    can_trim,
    can_zero,
    can_fast_zero,
    can_cache,
    can_extents,
    cache,
    extents,
    write_at,
    flush,
    trim,
    zero
});
