//! Routes the `log` crate to nbdkit: errors and warnings through `nbdkit_error` (always shown),
//! the rest through `nbdkit_debug` (shown with `nbdkit -v`).

use std::ffi::CString;
use std::os::raw::c_char;

extern "C" {
    fn nbdkit_error(fmt: *const c_char, ...);
    fn nbdkit_debug(fmt: *const c_char, ...);
}

/// The logger installed by the plugin's `load`.
#[derive(Debug)]
pub struct NbdkitLogger;

impl log::Log for NbdkitLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) || !record.target().starts_with("nbds3") {
            return;
        }
        let msg = CString::new(sanitize(&record.args().to_string())).unwrap_or_default();
        // SAFETY: "%s" with one NUL-terminated string, as nbdkit's printf-like API expects.
        unsafe {
            if record.level() <= log::Level::Warn {
                nbdkit_error(c"%s".as_ptr(), msg.as_ptr());
            } else {
                nbdkit_debug(c"%s".as_ptr(), msg.as_ptr());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs [`NbdkitLogger`]; `NBDS3_LOG=debug` (or trace, warn, ...) sets the level, default info.
pub fn install() {
    static LOGGER: NbdkitLogger = NbdkitLogger;
    let level = std::env::var("NBDS3_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(log::LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Makes a message safe to pass to C: NUL bytes, which would end it early, become `\0`.
pub fn sanitize(msg: &str) -> String {
    msg.replace('\0', "\\0")
}
