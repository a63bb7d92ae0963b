//! Rewrites the generated parts of README.md, docs/PARAMETERS.md and the man page source (the
//! parameter tables and versions, see `nbds3::param_docs`) from the code: run
//! `cargo run --example generate_docs` after adding or changing a parameter.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for section in &nbds3::param_docs::SECTIONS {
        let path = root.join(section.path);
        let written = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|text| Ok((section.splice(&text)?, text)))
            .and_then(|(generated, text)| {
                if generated == text {
                    return Ok(false);
                }
                std::fs::write(&path, generated).map(|()| true).map_err(|e| format!("{}: {e}", path.display()))
            });
        match written {
            Ok(true) => eprintln!("generate_docs: rewrote {}", section.path),
            Ok(false) => {}
            Err(e) => {
                eprintln!("generate_docs: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
