//! The crate's error type: categories a user can act on, and the one table that turns them into errno.

use std::fmt;

/// Everything that can go wrong below the nbdkit glue.
///
/// Backends fold their own failures into these categories; the `Volume` passes them through with
/// their context; only `plugin.rs` turns them into an errno via [`Error::errno`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A parameter is missing or has a value that is not allowed.
    #[error("{key}: {message}")]
    Config {
        /// The parameter, as the user spells it on the command line.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A request reaches past the end of the device.
    #[error("request of {len} bytes at offset {offset} is beyond the end of the {size}-byte device")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// The backend refused the request (S3 403, file permission denied).
    #[error("{store}: permission denied: {message}")]
    PermissionDenied {
        /// The store's short name.
        store: String,
        /// What was refused.
        message: String,
    },
    /// The credentials were not accepted.
    #[error("{store}: credentials rejected: {message}")]
    Unauthenticated {
        /// The store's short name.
        store: String,
        /// The server's reason.
        message: String,
    },
    /// A bucket, directory or export does not exist.
    #[error("{store}: not found: {message}")]
    NotFound {
        /// The store's short name.
        store: String,
        /// What is missing.
        message: String,
    },
    /// An export has no record: it was never created, or it was deleted.
    #[error("{store}: export {export} does not exist; {hint}")]
    ExportNotFound {
        /// The store's short name.
        store: String,
        /// The export.
        export: String,
        /// How to create it, or to find the ones that exist.
        hint: String,
    },
    /// A stored block is not what this volume wrote there (wrong size or checksum).
    #[error("{store}: block {key} is corrupt: {message}")]
    CorruptBlock {
        /// The store's short name.
        store: String,
        /// The block's key, which names it as [`BlockId`](crate::BlockId)'s doc says.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A stored export record or lease (or another small object nbds3 reads whole) is not one
    /// that nbds3 wrote: it does not parse, or it is far too large to be one.
    #[error("{store}: {key} is corrupt: {message}")]
    CorruptRecord {
        /// The store's short name.
        store: String,
        /// The object's key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A zero request with NBD's FAST_ZERO flag that would need slow work.
    #[error("zeroing this range is not fast (it needs a read-modify-write)")]
    FastZeroUnsupported,
    /// The backend did not answer in time, after retries.
    #[error("{store}: timed out: {message}")]
    Timeout {
        /// The store's short name.
        store: String,
        /// The operation that timed out.
        message: String,
    },
    /// Another writer holds the export's lease, or this process lost it (see [`Lease`](crate::lease::Lease)).
    #[error("export {export}: {message}")]
    Lease {
        /// The export.
        export: String,
        /// Who holds the lease, or why this process may not write.
        message: String,
    },
    /// Any other backend failure: I/O, 5xx after retries, a connection refused.
    #[error("{store}: {message}")]
    Backend {
        /// The store's short name.
        store: String,
        /// What failed, with the key or path, and the cause's own words.
        message: String,
        /// The failure beneath, where there is one (an I/O or SDK error), for callers that walk
        /// [`source`](std::error::Error::source) chains; `message` already says what it says.
        #[source]
        source: Option<BoxError>,
    },
}

/// A cause carried by an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A configuration error for parameter `key`.
    pub fn config(key: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Config { key: key.into(), message: message.to_string() }
    }

    /// A backend failure of `store`.
    pub fn backend(store: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::Backend { store: store.to_string(), message: message.to_string(), source: None }
    }

    /// A backend failure of `store` caused by `source`, which `message` describes.
    pub fn backend_caused(store: impl fmt::Display, message: impl fmt::Display, source: impl Into<BoxError>) -> Self {
        Error::Backend { store: store.to_string(), message: message.to_string(), source: Some(source.into()) }
    }

    /// Folds an I/O error of a local file into a category, keeping the path in the message.
    pub fn io(store: impl fmt::Display, what: impl fmt::Display, e: &std::io::Error) -> Self {
        let store = store.to_string();
        let message = format!("{what}: {e}");
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::PermissionDenied { store, message },
            std::io::ErrorKind::NotFound => Error::NotFound { store, message },
            _ => Error::backend_caused(store, message, std::io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// The errno an NBD client receives for this error.
    ///
    /// nbdkit forwards only a few errnos over NBD (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW,
    /// ENOTSUP, ESHUTDOWN) and turns any other into EINVAL, so every category is mapped here
    /// explicitly, defaulting to EIO.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Config { .. } | Error::OutOfRange { .. } => libc::EINVAL,
            Error::PermissionDenied { .. } | Error::Unauthenticated { .. } => libc::EPERM,
            Error::FastZeroUnsupported => libc::ENOTSUP,
            Error::NotFound { .. }
            | Error::ExportNotFound { .. }
            | Error::CorruptBlock { .. }
            | Error::CorruptRecord { .. }
            | Error::Timeout { .. }
            | Error::Lease { .. }
            | Error::Backend { .. } => libc::EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_table() {
        let s = || "S".to_string();
        let m = || "m".to_string();
        let cases: Vec<(Error, i32)> = vec![
            (Error::config("size", "bad"), libc::EINVAL),
            (Error::OutOfRange { offset: 1, len: 2, size: 3 }, libc::EINVAL),
            (Error::PermissionDenied { store: s(), message: m() }, libc::EPERM),
            (Error::Unauthenticated { store: s(), message: m() }, libc::EPERM),
            (Error::NotFound { store: s(), message: m() }, libc::EIO),
            (Error::ExportNotFound { store: s(), export: "dev".into(), hint: m() }, libc::EIO),
            (Error::CorruptBlock { store: s(), key: "blocks/dev/0000000000001000".into(), message: m() }, libc::EIO),
            (Error::CorruptRecord { store: s(), key: "exports/dev".into(), message: m() }, libc::EIO),
            (Error::FastZeroUnsupported, libc::ENOTSUP),
            (Error::Timeout { store: s(), message: m() }, libc::EIO),
            (Error::Lease { export: "dev".into(), message: m() }, libc::EIO),
            (Error::backend("S", "m"), libc::EIO),
        ];
        for (e, errno) in cases {
            assert_eq!(e.errno(), errno, "{e}");
        }
    }

    #[test]
    fn io_errors_fold_into_categories() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(matches!(Error::io("F", "/x", &denied), Error::PermissionDenied { .. }));
        let other = std::io::Error::other("disk on fire");
        let e = Error::io("F", "/x", &other);
        assert_eq!(e.to_string(), "F: /x: disk on fire");
        let cause = std::error::Error::source(&e).expect("the I/O error is the cause");
        assert_eq!(cause.to_string(), "disk on fire");
    }
}
