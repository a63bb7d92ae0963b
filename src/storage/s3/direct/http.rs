//! The direct transport's HTTP/1.1 parsing: a response's head and an S3 error body, read with
//! bounds, from a server that may send anything (see the fuzz tests in `tests/fuzz.rs`).

use std::io::{self, BufRead, Read};

/// The most response head, or error body, read; a server that sends more is not S3.
pub(super) const MAX_HEAD: u64 = 64 * 1024;

/// The most characters of what a server said (an error message, a bad header) that a log line
/// shows.
const MAX_SHOWN: usize = 200;

/// What a response head says that matters here.
pub(super) struct Head {
    pub(super) status: u16,
    pub(super) length: Option<u64>,
    /// The object's CRC32 (base64), when the server has one for the whole object.
    pub(super) crc32: Option<String>,
    /// The object's version, as S3 names it.
    pub(super) etag: Option<String>,
    /// The server closes the connection after this response.
    pub(super) close: bool,
}

impl Head {
    /// Reads the head of the answer, after any interim (1xx) ones, at most `MAX_HEAD` bytes in all.
    pub(super) fn read(r: &mut impl BufRead) -> io::Result<Head> {
        let mut limited = r.take(MAX_HEAD);
        loop {
            let head = Head::read_one(&mut limited)?;
            // 100 Continue and 103 Early Hints come before the answer (101 would end HTTP).
            if !(100..200).contains(&head.status) || head.status == 101 {
                return Ok(head);
            }
        }
    }

    fn read_one(limited: &mut impl BufRead) -> io::Result<Head> {
        let mut line = Vec::new();
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        limited.read_until(b'\n', &mut line)?;
        if line.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
        let status_line = String::from_utf8_lossy(&line);
        // HTTP/1.x, a space, three digits, and a reason (or none).
        let mut parts = status_line.trim_end_matches(['\r', '\n']).splitn(3, ' ');
        let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let status = Some(code)
            .filter(|c| {
                matches!(version, "HTTP/1.0" | "HTTP/1.1") && c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit())
            })
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| bad(&format!("not an HTTP/1.x answer: {}", printable(status_line.trim_end()))))?;
        let mut head = Head { status, length: None, crc32: None, etag: None, close: version == "HTTP/1.0" };
        let (mut composite, mut framed_otherwise) = (false, false);
        loop {
            line.clear();
            limited.read_until(b'\n', &mut line)?;
            if line.is_empty() {
                return Err(bad("the answer's head is cut short or too long"));
            }
            let text = String::from_utf8_lossy(&line);
            let Some((name, value)) = text.split_once(':') else {
                if text.trim().is_empty() {
                    break;
                }
                return Err(bad(&format!("malformed header line {}", printable(text.trim_end()))));
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => {
                    // Digits only; repeated, it must say the same, or where the answer ends is unknown.
                    let length = Some(value)
                        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|v| v.parse().ok())
                        .filter(|n| head.length.is_none_or(|m| m == *n))
                        .ok_or_else(|| bad(&format!("malformed or conflicting Content-Length {}", printable(value))))?;
                    head.length = Some(length);
                }
                "transfer-encoding" => framed_otherwise = true,
                "connection" => head.close |= value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")),
                "x-amz-checksum-crc32" => head.crc32 = Some(value.to_string()),
                "etag" => head.etag = Some(value.to_string()),
                // A multipart object's checksum is of its parts' checksums, not of the bytes.
                "x-amz-checksum-type" => composite = value.eq_ignore_ascii_case("COMPOSITE"),
                _ => {}
            }
        }
        if framed_otherwise {
            // A body not framed by its length is not read here, nor the connection reused.
            (head.length, head.close) = (None, true);
        }
        if composite || head.crc32.as_deref().is_some_and(|c| c.contains('-')) {
            head.crc32 = None;
        }
        Ok(head)
    }
}

/// Reads a body of `n` bytes as text; one cut short is an error.
pub(super) fn read_text(r: &mut impl Read, n: u64) -> io::Result<String> {
    let mut body = Vec::new();
    if r.take(n).read_to_end(&mut body)? as u64 != n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// What a server said, fit for a log line: at most `MAX_SHOWN` characters, control characters
/// (a forged second line) escaped.
pub(super) fn printable(said: &str) -> String {
    let mut shown = String::new();
    for c in said.chars().take(MAX_SHOWN) {
        match c.is_control() {
            true => shown.extend(c.escape_default()),
            false => shown.push(c),
        }
    }
    if said.chars().nth(MAX_SHOWN).is_some() {
        shown.push_str("...");
    }
    shown
}

/// The text of the first `<name>` element of an S3 error body, or "".
pub(super) fn xml_field<'a>(body: &'a str, name: &str) -> &'a str {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    body.split_once(open.as_str()).and_then(|(_, rest)| rest.split_once(close.as_str())).map_or("", |(v, _)| v)
}
