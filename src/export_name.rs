//! Export names.
//!
//! An export name becomes part of an S3 key and of a directory path, so it is validated once,
//! here, into an [`ExportName`]; nothing else ever builds a key or a path from a raw string. The
//! keys derived from it are the storage layer's layout (`storage/keys.rs`).

use std::fmt;

use crate::{Error, Result};

/// The longest export name accepted, in bytes.
pub const MAX_EXPORT_NAME: usize = 128;

/// A validated export name: 1 to 128 bytes of ASCII letters, digits, `.`, `_` and `-`, and
/// neither `.` nor `..`. It can never escape its key prefix or directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExportName(String);

impl ExportName {
    /// Validates `name`.
    ///
    /// # Errors
    /// [`Error::Config`] for parameter `export`, naming what is wrong.
    pub fn new(name: &str) -> Result<Self> {
        let problem = if name.is_empty() {
            Some("the name is empty".to_string())
        } else if name.len() > MAX_EXPORT_NAME {
            Some(format!("the name is {} bytes long, the limit is {MAX_EXPORT_NAME}", name.len()))
        } else if name == "." || name == ".." {
            Some(format!("{name:?} is not allowed"))
        } else {
            name.chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
                .map(|c| format!("character {c:?} is not allowed"))
        };
        match problem {
            None => Ok(ExportName(name.to_string())),
            Some(p) => Err(Error::config(
                "export",
                format!(
                    "invalid export name {:?}: {p} (use letters, digits, '.', '_' and '-', at most {MAX_EXPORT_NAME} bytes)",
                    name.escape_debug().to_string()
                ),
            )),
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExportName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for n in ["dev", "a", "my_device-1.img", &"x".repeat(128)] {
            assert_eq!(ExportName::new(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn hostile_names_are_refused_with_the_reason() {
        let cases = [
            ("", "empty"),
            (".", "not allowed"),
            ("..", "not allowed"),
            ("a/b", "'/'"),
            ("../etc", "'/'"),
            ("a\0b", "'\\0'"),
            ("tab\there", "'\\t'"),
            ("é", "'é'"),
            (&"x".repeat(129), "129 bytes"),
            (&"x".repeat(1000), "1000 bytes"),
        ];
        for (name, why) in cases {
            let e = ExportName::new(name).unwrap_err().to_string();
            assert!(e.starts_with("export: invalid export name"), "{e}");
            assert!(e.contains(why), "{name:?}: {e}");
        }
    }
}
