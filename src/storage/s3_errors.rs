//! How an S3 error answer maps onto the crate's error categories, the one fold both S3
//! transports (the SDK's in `s3.rs`, [`DirectClient`](super::direct::DirectClient)) use, so the
//! same answer is the same error whichever path sent the request.

use crate::Error;

/// The error category of an S3 error answer, from its code: `detail` is ": message" or "".
pub(super) fn classify(store: &str, what: &str, code: &str, detail: &str) -> Error {
    let store = store.to_string();
    let message = format!("{what}: {code}{detail}");
    // Some servers (Garage) answer a bad key or signature with a plain AccessDenied.
    let bad_credentials =
        ["signature", "no such key", "access key"].iter().any(|m| detail.to_ascii_lowercase().contains(m));
    match code {
        "AccessDenied" if bad_credentials => Error::Unauthenticated { store, message },
        "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidToken" | "ExpiredToken" => {
            Error::Unauthenticated { store, message }
        }
        "AccessDenied" | "AllAccessDisabled" | "Forbidden" | "HTTP 403" => Error::PermissionDenied { store, message },
        "NoSuchBucket" => Error::NotFound { store, message },
        _ => Error::Backend { store, message },
    }
}
