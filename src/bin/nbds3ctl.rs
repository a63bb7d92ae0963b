//! `nbds3ctl`: list, inspect, create and delete the exports of an nbds3 bucket or directory.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use nbds3::config::{parse_size, Config, ConfigKey, StorageKind};
use nbds3::exports::open_backend;
use nbds3::{admin, Error, ExportName};

const USAGE: &str = "\
Usage: nbds3ctl [KEY=VALUE ...] COMMAND [ARGS]

Manage the exports that nbds3 serves from a bucket or directory. KEY=VALUE parameters are the
plugin's own (run `nbds3ctl --help-params` for them): bucket=, endpoint=, region=, access-key=,
secret-key= (or +FILE), path-style=, storage=, dir=. Credentials default to the AWS chain.

Commands:
  list                                        every export: size, block size, stored bytes, objects,
                                              and who holds its lease (host, pid, until when)
  info NAME                                   one export
  create NAME --size SIZE [--block-size SIZE] record a new export (sizes take K/M/G/T suffixes)
  delete NAME [--yes]                         delete an export and all its blocks; asks first
                                              unless --yes; refused while a writer holds the
                                              export's lease (see lease-time=, lease-takeover=)

Exit status: 0 done, 1 failed (the message says why), 2 bad usage, 3 no such export.

Examples:
  nbds3ctl bucket=nbd-storage endpoint=http://localhost:9000 list
  nbds3ctl storage=file dir=/var/lib/nbds3 create vm1 --size 20G --block-size 64K
";

/// A failure with the exit status it maps to.
struct Failure(u8, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        // 3 is for a missing export only; a missing bucket or directory is a plain failure.
        let status = match &e {
            Error::NotFound { message, .. } if message.starts_with("export ") => 3,
            _ => 1,
        };
        Failure(status, e.to_string())
    }
}

fn usage(message: impl std::fmt::Display) -> Failure {
    Failure(2, format!("{message} (see nbds3ctl --help)"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(status, message)) => {
            eprintln!("nbds3ctl: {message}");
            ExitCode::from(status)
        }
    }
}

fn run(args: &[String]) -> Result<(), Failure> {
    if args.iter().any(|a| a == "--help" || a == "-h") || args.is_empty() {
        print!("{USAGE}");
        return Ok(());
    }
    if args.iter().any(|a| a == "--help-params") {
        println!("{}", ConfigKey::help());
        return Ok(());
    }
    let (params, words): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| !a.starts_with('-') && a.contains('='));
    let mut config = Config::default();
    for p in params {
        let (key, value) = p.split_once('=').unwrap_or((p, ""));
        let value = match key.parse::<ConfigKey>() {
            Ok(ConfigKey::SecretKey) => read_secret(value)?,
            _ => value.to_string(),
        };
        config.set(key, &value)?;
    }
    if config.storage.is_none() && config.s3.bucket.is_empty() && config.dir.is_none() {
        return Err(usage("say where the exports are: bucket=NAME (S3) or dir=PATH (storage=file)"));
    }
    config.finish()?;
    if let Some(id) = &config.host_id {
        nbds3::lease::set_host_id(id);
    }
    if config.storage_kind() == StorageKind::Memory {
        return Err(usage("storage=memory keeps nothing between processes; use bucket= or dir="));
    }
    let mut words = words.into_iter().map(String::as_str);
    let command = words.next().ok_or_else(|| usage("no command given"))?;
    let rest: Vec<&str> = words.collect();
    let backend = open_backend(&config)?;
    match command {
        "list" => {
            no_more(&rest)?;
            let exports = admin::list(&*backend)?;
            println!("{:<24} {:>16} {:>10} {:>16} {:>10}  LEASE", "EXPORT", "SIZE", "BLOCK", "STORED", "OBJECTS");
            for e in exports {
                println!(
                    "{:<24} {:>16} {:>10} {:>16} {:>10}  {}",
                    e.name.as_str(),
                    human(e.geometry.size()),
                    human(e.geometry.block_size() as u64),
                    human(e.stored_bytes()),
                    e.stored_blocks,
                    lease_holder(&e)
                );
            }
        }
        "info" => {
            let name = export_arg(&rest)?;
            no_more(&rest[1..])?;
            let e = admin::info(&*backend, &name)?;
            println!("export:      {}", e.name);
            println!("backend:     {backend}");
            println!("size:        {} ({} bytes)", human(e.geometry.size()), e.geometry.size());
            println!("block size:  {} ({} bytes)", human(e.geometry.block_size() as u64), e.geometry.block_size());
            println!("blocks:      {}", e.geometry.blocks());
            println!(
                "stored:      {} in {} objects ({:.2} % of the device)",
                human(e.stored_bytes()),
                e.stored_blocks,
                100.0 * e.stored_bytes() as f64 / e.geometry.size() as f64
            );
            println!("lease:       {}", lease_holder(&e));
        }
        "create" => {
            let name = export_arg(&rest)?;
            let known = |a: &&str| ["--size", "--block-size"].iter().any(|f| a == f || a.starts_with(&format!("{f}=")));
            if let Some(bad) = rest[1..].iter().find(|a| a.starts_with('-') && !known(a)) {
                return Err(usage(format!("unknown option {bad:?}")));
            }
            let size = option(&rest[1..], "--size")?.ok_or_else(|| usage("create needs --size SIZE"))?;
            let block_size = option(&rest[1..], "--block-size")?.unwrap_or(4096);
            let block_size = usize::try_from(block_size).map_err(|_| usage("--block-size is too large"))?;
            if config.storage_kind() == StorageKind::S3 {
                // Like the plugin: create the bucket if it is missing and the credentials allow.
                nbds3::storage::s3::check_bucket(&config.s3)?;
            }
            let g = admin::create(&*backend, &name, size, block_size)?;
            println!("created export {name}: {} in {}-byte blocks", human(g.size()), g.block_size());
        }
        "delete" => {
            let name = export_arg(&rest)?;
            let yes = rest[1..].iter().any(|a| *a == "--yes" || *a == "-y");
            if let Some(bad) = rest[1..].iter().find(|a| !matches!(**a, "--yes" | "-y")) {
                return Err(usage(format!("unexpected argument {bad:?}")));
            }
            let e = admin::info(&*backend, &name)?;
            if !yes {
                confirm(&format!(
                    "Delete export {name} ({} in {} objects) from {backend}? This cannot be undone.\nType the export name to confirm: ",
                    human(e.stored_bytes()),
                    e.stored_blocks
                ), name.as_str())?;
            }
            let show = std::io::stderr().is_terminal();
            let deleted = admin::delete(&backend, &name, config.lease_config(), |done, total| {
                if show {
                    let pct = (done * 100).checked_div(total).unwrap_or(100);
                    let bar = "#".repeat((pct / 4) as usize);
                    eprint!("\rdeleting [{bar:<25}] {done}/{total} objects ({pct}%)");
                    if done == total {
                        eprintln!();
                    }
                }
            })?;
            println!("deleted export {name} and its {deleted} objects");
        }
        other => return Err(usage(format!("unknown command {other:?}"))),
    }
    Ok(())
}

/// Who holds the export's lease, and until when.
fn lease_holder(e: &admin::ExportInfo) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    e.lease.as_ref().map_or_else(|| "none".into(), |l| l.describe(now))
}

fn export_arg(rest: &[&str]) -> Result<ExportName, Failure> {
    let name = rest.first().ok_or_else(|| usage("which export? give its NAME"))?;
    Ok(ExportName::new(name)?)
}

fn no_more(rest: &[&str]) -> Result<(), Failure> {
    match rest.first() {
        Some(extra) => Err(usage(format!("unexpected argument {extra:?}"))),
        None => Ok(()),
    }
}

/// The value of `--flag VALUE` or `--flag=VALUE` among `args`, parsed as a size.
fn option(args: &[&str], flag: &str) -> Result<Option<u64>, Failure> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if *a == flag {
            Some(*it.next().ok_or_else(|| usage(format!("{flag} needs a value")))?)
        } else {
            a.strip_prefix(flag).and_then(|v| v.strip_prefix('='))
        };
        if let Some(v) = value {
            return Ok(Some(parse_size(flag.trim_start_matches('-'), v)?));
        }
    }
    Ok(None)
}

/// `+FILE` reads the secret from a file, so it does not show in `ps`; anything else is the secret.
fn read_secret(value: &str) -> Result<String, Failure> {
    match value.strip_prefix('+') {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|e| Failure(1, format!("secret-key: cannot read {path}: {e}"))),
        None => Ok(value.to_string()),
    }
}

fn confirm(prompt: &str, expected: &str) -> Result<(), Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(usage("refusing to delete without --yes when standard input is not a terminal"));
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).map_err(|e| Failure(1, e.to_string()))?;
    if answer.trim() == expected {
        Ok(())
    } else {
        Err(Failure(1, "not confirmed; nothing deleted".into()))
    }
}

/// A size with a binary suffix, e.g. `1.5G`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["", "K", "M", "G", "T", "P"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}
