//! `S3Config`: how to reach a bucket, the settings both S3 transports (the SDK's and
//! [`DirectClient`](super::direct::DirectClient)) are built from. The storage layer owns it; the
//! plugin's parameters ([`Config`](crate::Config)) fill it in.

use std::fmt;
use std::time::Duration;

/// How to reach the bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// The endpoint URL; `None` means AWS.
    pub endpoint: Option<String>,
    /// The signing region.
    pub region: String,
    /// The access key id; `None` means the AWS credential chain.
    pub access_key: Option<String>,
    /// The secret key that goes with `access_key`.
    pub secret_key: Option<Secret>,
    /// Path-style URLs (`endpoint/bucket/key`); `None` until the config is finished.
    pub path_style: Option<bool>,
    /// Requests in flight during write-back.
    pub concurrency: usize,
    /// The bound on one request, retries included.
    pub timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key: None,
            secret_key: None,
            path_style: None,
            concurrency: 16,
            timeout: Duration::from_secs(30),
        }
    }
}

impl S3Config {
    /// `s3://bucket (endpoint)`, how messages name this store: the bucket as users write it,
    /// and which server holds it.
    pub fn describe(&self) -> String {
        format!("s3://{} ({})", self.bucket, self.endpoint.as_deref().unwrap_or("AWS"))
    }
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
