//! The parts of the docs (README, docs/PARAMETERS.md, the man page) that are generated from
//! [`ConfigKey`], the stats file's counters and the crate's version, each kept between two
//! marker lines of its file.
//!
//! Generated rather than written, so that a parameter added to the code is a parameter in the
//! docs: `tests/generated_docs.rs` fails when a file differs from what [`GeneratedSection::splice`]
//! makes of it, and `cargo run --example generate_docs` rewrites the files.

use crate::config::ConfigKey;

/// One generated part of a file in the repository.
#[derive(Debug)]
pub struct GeneratedSection {
    /// The file, relative to the repository's root.
    pub path: &'static str,
    /// The line before the generated text (newline included), which says how to regenerate it.
    begin: &'static str,
    /// The line after it.
    end: &'static str,
    generate: fn() -> String,
}

/// The parameter table of docs/PARAMETERS.md, the README's versions, and the man page's
/// PARAMETERS, STATS FILE and VERSION.
pub const SECTIONS: [GeneratedSection; 5] = [
    GeneratedSection {
        path: "docs/PARAMETERS.md",
        begin: "<!-- parameters: generated from ConfigKey (src/config.rs) by `cargo run --example generate_docs` -->\n",
        end: "<!-- end of parameters -->\n",
        generate: markdown_table,
    },
    GeneratedSection {
        path: "README.md",
        begin: "<!-- versions: generated from Cargo.toml by `cargo run --example generate_docs` -->\n",
        end: "<!-- end of versions -->\n",
        generate: versions_paragraph,
    },
    GeneratedSection {
        path: "docs/nbdkit-nbds3-plugin.pod",
        begin:
            "=for comment parameters: generated from ConfigKey (src/config.rs) by cargo run --example generate_docs\n",
        end: "=for comment end of parameters\n",
        generate: pod_parameters,
    },
    GeneratedSection {
        path: "docs/nbdkit-nbds3-plugin.pod",
        begin: "=for comment counters: generated from src/stats_file.rs by cargo run --example generate_docs\n",
        end: "=for comment end of counters\n",
        generate: pod_counters,
    },
    GeneratedSection {
        path: "docs/nbdkit-nbds3-plugin.pod",
        begin: "=for comment version: generated from Cargo.toml by cargo run --example generate_docs\n",
        end: "=for comment end of version\n",
        generate: pod_version,
    },
];

impl GeneratedSection {
    /// `text`, the contents of [`path`](Self::path), with this section as the code generates it
    /// now.
    ///
    /// # Errors
    /// A message naming the file and the marker line it lacks.
    pub fn splice(&self, text: &str) -> Result<String, String> {
        let missing = |marker: &str| format!("{} has no line {:?}", self.path, marker.trim_end());
        let start = text.find(self.begin).ok_or_else(|| missing(self.begin))? + self.begin.len();
        let end = start + text.get(start..).and_then(|rest| rest.find(self.end)).ok_or_else(|| missing(self.end))?;
        Ok(format!(
            "{}{}{}",
            text.get(..start).unwrap_or_default(),
            (self.generate)(),
            text.get(end..).unwrap_or_default()
        ))
    }
}

/// The parameter table of docs/PARAMETERS.md, in Markdown.
fn markdown_table() -> String {
    let mut table = String::from("| parameter | meaning |\n|---|---|\n");
    for k in ConfigKey::ALL {
        let (name, value, doc) = k.doc();
        table.push_str(&format!("| `{name}={}` | {doc} |\n", value.replace('|', "\\|")));
    }
    table
}

/// The supported nbdkit and Rust versions, in a sentence.
fn versions() -> String {
    format!(
        "nbds3 {} needs nbdkit 1.32 or later (Debian 12's) and builds with Rust {} or later (`rust-version` in \
         Cargo.toml).",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_RUST_VERSION")
    )
}

fn versions_paragraph() -> String {
    versions() + "\n"
}

/// The man page's parameter list, in POD, in the style of nbdkit's own pages.
fn pod_parameters() -> String {
    let mut pod = String::from("\n=over 4\n\n");
    for k in ConfigKey::ALL {
        let (name, value, doc) = k.doc();
        pod.push_str(&format!("=item B<{name}=>{}\n\n{}\n\n", pod_escape(value), pod_escape(doc)));
    }
    pod.push_str("=back\n\n");
    pod
}

/// The stats file's counters, in POD: each one's name in both formats, its type and meaning.
fn pod_counters() -> String {
    let mut pod = String::from("\n=over 4\n\n");
    for [field, name, kind, help] in crate::stats_file::described() {
        pod.push_str(&format!("=item C<{field}> (C<{name}>, {kind})\n\n{}\n\n", pod_escape(help)));
    }
    pod.push_str("=back\n\n");
    pod
}

fn pod_version() -> String {
    format!("\n{}\n\n", pod_escape(&versions()).replace("`rust-version`", "C<rust-version>"))
}

/// `text` with the characters POD would take for markup written as POD escapes.
fn pod_escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '<' => "E<lt>".to_string(),
            '>' => "E<gt>".to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_what_lies_between_the_markers() {
        let table = &SECTIONS[0];
        let text = format!("intro\n{}stale table\n{}outro\n", table.begin, table.end);
        let spliced = table.splice(&text).unwrap();
        assert_eq!(spliced, format!("intro\n{}{}{}outro\n", table.begin, markdown_table(), table.end));
        assert_eq!(table.splice(&spliced).unwrap(), spliced);
        let e = table.splice("no markers\n").unwrap_err();
        assert!(e.starts_with("docs/PARAMETERS.md has no line \"<!-- parameters: generated"), "{e}");
    }

    #[test]
    fn every_parameter_is_in_the_table_and_the_man_page() {
        let (table, pod) = (markdown_table(), pod_parameters());
        for k in ConfigKey::ALL {
            assert!(table.contains(&format!("| `{}=", k.name())), "{}", k.name());
            assert!(pod.contains(&format!("=item B<{}=>", k.name())), "{}", k.name());
        }
        assert!(table.contains("| `storage=memory\\|file\\|s3` |"), "{table}");
        assert_eq!(pod_escape("a<b>"), "aE<lt>bE<gt>");
    }
}
