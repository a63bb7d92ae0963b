//! The one fold of S3's failures into the crate's error categories, used by both transports (the
//! SDK's and the [direct](super::direct) one), so the same answer is the same error whichever
//! path sent the request, and the same answers are retried.

use std::fmt;
use std::time::Instant;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::http::Response as HttpResponse;
use aws_smithy_types::error::display::DisplayErrorContext;

use crate::Error;

/// What sets a request's deadline, for messages about one that passed: a request runs until
/// `s3-timeout`, or less when its caller's fence ends sooner.
pub(super) const DEADLINES: &str =
    "s3-timeout, or the end of the writer's lease or of its upload permit during a cas GC";

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
        _ => Error::backend(store, message),
    }
}

/// Whether an error answer is worth another attempt: 5xx and throttling, as the SDK's standard
/// retry policy has it.
pub(super) fn transient(status: u16, code: &str) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
        || matches!(code, "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout")
}

/// Whether an SDK failure is an answer with one of these HTTP statuses.
pub(super) fn status_is<E>(err: &SdkError<E, HttpResponse>, statuses: &[u16]) -> bool {
    err.raw_response().is_some_and(|r| statuses.contains(&r.status().as_u16()))
}

/// Folds an SDK error into a crate error category, keeping the operation, key, status and code,
/// and the SDK's error as the cause.
pub(super) fn fold<E, R>(store: &str, what: &str, err: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_string();
    let detail = err.message().map(|m| format!(": {m}")).unwrap_or_default();
    let timed_out =
        matches!(&err, SdkError::TimeoutError(_)) || matches!(&err, SdkError::DispatchFailure(d) if d.is_timeout());
    if timed_out {
        return Error::Timeout { store: store.to_string(), message: format!("{what}: no answer in time") };
    }
    let message = match &err {
        SdkError::DispatchFailure(_) => format!("{what}: cannot reach the endpoint: {}", DisplayErrorContext(&err)),
        _ if code.is_empty() => format!("{what}: {}", DisplayErrorContext(&err)),
        _ => return classify(store, what, &code, &detail),
    };
    Error::backend_caused(store, message, err)
}

/// [`fold`], for a write or delete that had to be sent by `deadline`: one that failed without an
/// answer once that had passed was stopped by it (the SDK's operation timeout, or the interceptor
/// that sends no attempt after it).
pub(super) fn fold_by<E, R>(store: &str, what: &str, err: SdkError<E, R>, deadline: Instant) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let answered = matches!(err, SdkError::ServiceError(_) | SdkError::ResponseError(_));
    if !answered && Instant::now() >= deadline {
        let message = format!("{what}: no answer before its deadline, or not sent once it had passed ({DEADLINES})");
        return Error::Timeout { store: store.to_string(), message };
    }
    fold(store, what, err)
}
