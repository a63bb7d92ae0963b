//! `nbds3ctl`: list, inspect, create, resize and delete the exports of an nbds3 bucket or
//! directory; snapshot, clone and diff its `cas` exports and collect their garbage, for people at a terminal and for scripts (`--json`, exit statuses, no prompts or
//! progress unless on a terminal).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use nbds3::config::{parse_size, Config, ConfigKey, StorageKind};
use nbds3::diff_stream::ImportOptions;
use nbds3::export_record::Layout;
use nbds3::exports::open_backend;
use nbds3::lease::LeaseHolder;
use nbds3::snapshots::{self, Version};
use nbds3::storage::cas::gc::{self, GcOptions, GcPhase, GcReport};
use nbds3::storage::cas::ops::Change;
use nbds3::storage::cas::stream::StreamSummary;
use nbds3::storage::Backend;
use nbds3::{admin, diff_stream, Error, ExportName};

const USAGE: &str = "\
Usage: nbds3ctl [KEY=VALUE ...] COMMAND [ARGS]
       nbds3ctl help COMMAND     (or COMMAND --help)

Manage the exports that nbds3 serves from a bucket or directory. KEY=VALUE parameters are the
plugin's own (run `nbds3ctl --help-params` for them): bucket=, endpoint=, region=, access-key=,
secret-key= (or +FILE), path-style=, storage=, dir=. Credentials default to the AWS chain.

Commands:
";

const FOOTER: &str = "
Exit status: 0 done, 1 failed (the message says why), 2 bad usage, 3 no such export.

Examples:
  nbds3ctl bucket=nbd-storage endpoint=http://localhost:9000 list
  nbds3ctl storage=file dir=/var/lib/nbds3 create vm1 --size 20G --block-size 64K
  nbds3ctl bucket=nbd-storage resize vm1 --size 40G
";

/// A command: how it is called and what it does, for `--help`, and the flags it takes.
struct Command {
    name: &'static str,
    /// Its arguments, as `--help` shows them.
    args: &'static str,
    /// One line for the command list.
    summary: &'static str,
    /// The rest of `nbds3ctl help NAME`.
    details: &'static str,
    /// Whether it takes an export NAME.
    takes_name: bool,
    /// Flags that take a value (`--size 1G` or `--size=1G`).
    options: &'static [&'static str],
    /// Flags that take none.
    switches: &'static [&'static str],
}

const COMMANDS: [Command; 13] = [
    Command {
        name: "list",
        args: "[--json]",
        summary: "every export: size, block size, stored bytes, objects, lease holder",
        details: "\
With --json, a JSON array with one object per export (name, size, block_size, blocks,
stored_blocks, stored_bytes; sizes in bytes; lease: null if no writer ever took the export's
lease, else its holder's host and pid and when it expires, in Unix seconds, 0 once released).",
        takes_name: false,
        options: &[],
        switches: &["--json"],
    },
    Command {
        name: "info",
        args: "NAME [--json]",
        summary: "one export: sizes, and what holes and dedup saved",
        details: "\
Exits 3 if there is no such export.

A cas export's figures are of the export as of its last FLUSH (what a snapshot would hold),
without its snapshots: mapped, the blocks that hold data; holes saved, the size less that (blocks
never written, zeroed or trimmed take nothing); distinct chunks, the chunk objects those blocks
name, each once (one block long each); dedup saved, mapped less distinct (identical blocks stored
once; chunks shared with other exports, snapshots and clones are counted here too). Then the
same for the export with its snapshots, and what the whole bucket stores under cas/.

Cost, for a cas export: a GET of its head and of each snapshot record, one GET per distinct map
page of their maps (a page maps 1024 blocks: a fully written 1 TiB export of 4K blocks has about
262 000 pages), and a LIST of cas/chunks/ and cas/pages/ (one request per 1000 objects in the
bucket). Memory: a set of the distinct chunks, 20 to 40 bytes each (a TiB of distinct 4K blocks
needs 5 to 10 GiB; of 64K blocks, 0.3 to 0.6 GiB), and 50 to 100 bytes per distinct map page.
For a plain export: a LIST of its blocks.

With --json, one JSON object: the keys of one element of `list --json` (for a cas export,
stored_blocks and stored_bytes count mapped blocks: its chunks are shared), then, sizes in bytes:
  mapped_blocks, mapped_bytes   blocks that hold data (plain: the block objects)
  holes_saved_bytes             size - mapped_bytes
and for a cas export:
  snapshots                     how many it has
  distinct_chunks, distinct_chunk_bytes, map_pages, map_page_bytes
                                what the export's map references (snapshots not included)
  dedup_saved_bytes             mapped_bytes - distinct_chunk_bytes
  with_snapshots                {distinct_chunks, distinct_chunk_bytes, map_pages, map_page_bytes}
                                of the export and its snapshots together
  bucket                        {chunk_objects, chunk_bytes, page_objects, page_bytes,
                                stored_bytes}: every chunk and page object in the bucket",
        takes_name: true,
        options: &[],
        switches: &["--json"],
    },
    Command {
        name: "create",
        args: "NAME --size SIZE [--block-size SIZE] [--layout plain|cas]",
        summary: "record a new export (sizes take K/M/G/T suffixes)",
        details: "\
SIZE is a multiple of the block size (a power of two from 512 to 4M, default 4K). nbdkit creates
only the export named by its export= parameter on a client's first open (see its create=
parameter); every other export is created here first. --layout cas makes a content-addressed
export, which has snapshots and clones (see snapshot); the default, plain, stores one object per
block. A cas export needs a server that honours conditional writes (not Garage) to be written.",
        takes_name: true,
        options: &["--size", "--block-size", "--layout"],
        switches: &[],
    },
    Command {
        name: "resize",
        args: "NAME --size SIZE [--shrink [--yes]]",
        summary: "grow an export, also while it is served; shrink it with --shrink",
        details: "\
Growing changes only the export's record, and works while nbdkit serves the export: connections
opened afterwards see the new size (an NBD connection keeps the size it opened with, so clients
reconnect; then grow the filesystem, e.g. resize2fs). SIZE must be a multiple of the export's
block size.

Shrinking is refused unless --shrink is given. It deletes the export's data past the new end
(asking first unless --yes), then records the new size; if it is interrupted, the export keeps
its old size with part of that data gone, and running it again finishes the job. Like delete, it takes the export's lease
first, so it is refused while a running nbdkit holds the export for writing: stop that nbdkit
first. An nbdkit that serves the export read-only refuses new connections to it until it is
restarted.",
        takes_name: true,
        options: &["--size"],
        switches: &["--shrink", "--yes"],
    },
    Command {
        name: "delete",
        args: "NAME [--yes]",
        summary: "delete an export and all its blocks",
        details: "\
Asks for the export's name first unless --yes (and refuses without --yes when standard input is
not a terminal). Refused while a writer holds the export's lease (see nbdkit's lease-time= and
lease-takeover=), naming that writer. A cas export's snapshots go with it; clones of them stay,
and the chunks no export or snapshot uses any more are freed by `gc`. On a terminal, shows its
progress. A name that a clone interrupted before its record left taken is freed at once.",
        takes_name: true,
        options: &[],
        switches: &["--yes"],
    },
    Command {
        name: "snapshot",
        args: "EXPORT SNAP",
        summary: "record a cas export's state as of its last completed FLUSH as snapshot SNAP",
        details: "\
Costs two requests whatever the export's size, and works while nbdkit serves the export: the
snapshot holds what the last FLUSH (or FUA write) committed, never a half-written state. nbdkit
serves it read-only as export EXPORT@SNAP. A plain export has no snapshots: create a cas one and
copy it with nbdcopy first (the error says how).",
        takes_name: true,
        options: &[],
        switches: &[],
    },
    Command {
        name: "snapshots",
        args: "EXPORT [--json]",
        summary: "the snapshots of a cas export",
        details: "\
One name a line, in order; with --json, a JSON array of names.",
        takes_name: true,
        options: &[],
        switches: &["--json"],
    },
    Command {
        name: "delete-snapshot",
        args: "EXPORT SNAP",
        summary: "delete a snapshot; gc frees the blocks nothing else references",
        details: "\
Clones of the snapshot keep every block they share with it. Its data is freed by the next gc
once no export or snapshot references it.",
        takes_name: true,
        options: &[],
        switches: &[],
    },
    Command {
        name: "clone",
        args: "EXPORT@SNAP NEW",
        summary: "create the writable cas export NEW from a snapshot, sharing its blocks",
        details: "\
Costs a few requests whatever the size: NEW starts as the snapshot's map. Writes to NEW and to
EXPORT do not affect each other. NEW must not exist yet. An interrupted clone is finished by
running it again, or its name freed by `delete NEW`.",
        takes_name: true,
        options: &[],
        switches: &[],
    },
    Command {
        name: "diff",
        args: "FROM TO",
        summary: "the byte ranges that differ between two versions of cas exports, as JSON lines",
        details: "\
FROM and TO are EXPORT@SNAP or EXPORT (its last completed FLUSH), of one block size. Prints one
JSON object a line: {\"offset\":BYTES,\"length\":BYTES,\"kind\":\"data\"|\"zero\"} (zero: the range
reads as zeros in TO), in order, at block granularity. Reads cost requests in proportion to what
changed.",
        takes_name: true,
        options: &[],
        switches: &[],
    },
    Command {
        name: "gc",
        args: "[--grace SECONDS] [--dry-run] [--force] [--json]",
        summary: "free the cas chunks and map pages no export or snapshot references",
        details: "\
Lists every chunk and map page of the bucket's cas exports, then reads every head and snapshot,
and deletes (1000 a request) what none of them references and was last written more than the
grace period ago (default 86400 seconds): deleting a cas export or snapshot frees its data only
then. Safe while nbdkit serves cas exports: writers upload again what they keep uncommitted long
before it is that old. A grace period under 7200 seconds is refused unless --force (use it only
when no writer is running). A head, snapshot or map page that cannot be read stops it before it
deletes anything, naming the object. Before deleting it takes the lease cas/gc/sweeping, waits
10 seconds and looks again; while it deletes, writers' uploads, snapshots and clones wait (at
most 5 minutes). --dry-run deletes nothing and says what would be freed. On a terminal, shows
its progress; --json prints the summary as one JSON object.",
        takes_name: false,
        options: &["--grace"],
        switches: &["--dry-run", "--force", "--json"],
    },
    Command {
        name: "export-diff",
        args: "[FROM] TO FILE|- [--json]",
        summary: "the blocks changed from FROM to TO with their data, as one stream",
        details: "\
FROM and TO are cas exports (EXPORT: its last completed FLUSH) or their snapshots (EXPORT@SNAP),
of one block size; without FROM the stream carries every block of TO (a full backup). FILE is
created (an existing one is refused); - writes to standard output. The stream's format is in
docs/DIFF-STREAM.md. Reads cost requests in proportion to what changed. With --json, prints what
was written as one JSON object (not with -). On a terminal, shows its progress.",
        takes_name: true,
        options: &[],
        switches: &["--json"],
    },
    Command {
        name: "import-diff",
        args: "FILE|- EXPORT [--force] [--json]",
        summary: "apply a stream from export-diff to a cas export, atomically",
        details: "\
EXPORT must hold the stream's FROM state (a clone of that snapshot, or an export an earlier import
brought there) unless --force. The stream is applied under the export's lease, like a writer, and
committed with one FLUSH only once all of it has arrived and its checksum matches: a stream cut
short, altered, of a newer version or another block size is refused and the export stays as it
was. - reads from standard input. With --json, prints what was applied as one JSON object. On a
terminal, shows its progress. On a server that ignores conditional writes (Garage) it is refused
unless cas-unconditional=true is given, as for nbdkit.",
        takes_name: true,
        options: &[],
        switches: &["--force", "--json"],
    },
];

/// A failure with the exit status it maps to.
struct Failure(u8, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match e {
            Error::ExportNotFound { .. } => 3,
            _ => 1,
        };
        Failure(status, e.to_string())
    }
}

fn usage(message: impl std::fmt::Display) -> Failure {
    Failure(2, format!("{message} (see nbds3ctl --help)"))
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so every print to a pipe whose reader has gone (`nbds3ctl list |
    // head -1`) would panic; the default action ends the process quietly, as it ends any Unix
    // tool. Sockets are unaffected: the standard library sends with MSG_NOSIGNAL.
    // SAFETY: called before any thread starts; SIG_DFL is a valid action for SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
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
    if args.is_empty() {
        print!("{}", general_help());
        return Ok(());
    }
    if args.iter().any(|a| a == "--help-params") {
        println!("{}", ConfigKey::help());
        return Ok(());
    }
    let (params, words): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| !a.starts_with('-') && a.contains('='));
    let words: Vec<&str> = words.into_iter().map(String::as_str).collect();
    if let Some(help) = help_asked(&words)? {
        print!("{help}");
        return Ok(());
    }
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
    let name = words.first().ok_or_else(|| usage("no command given"))?;
    let command = find(name).ok_or_else(|| usage(format!("unknown command {name:?}")))?;
    let args = Args::parse(command, &words[1..])?;
    let backend = open_backend(&config)?;
    match command.name {
        "list" => {
            let exports = admin::list(&*backend)?;
            if args.switch("--json") {
                print_json(&exports.iter().map(export_json).collect());
                return Ok(());
            }
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
            let (e, cas) = admin::space(&*backend, &args.name()?)?;
            if args.switch("--json") {
                print_json(&info_json(&e, cas.as_ref()));
                return Ok(());
            }
            println!("export:      {}", e.name);
            println!("backend:     {backend}");
            println!("size:        {} ({} bytes)", human(e.geometry.size()), e.geometry.size());
            println!("block size:  {} ({} bytes)", human(e.geometry.block_size() as u64), e.geometry.block_size());
            println!("blocks:      {}", e.geometry.blocks());
            println!("layout:      {}", e.layout);
            let Some(cas) = cas else {
                println!(
                    "stored:      {} in {} objects ({:.2} % of the device)",
                    human(e.stored_bytes()),
                    e.stored_blocks,
                    100.0 * e.stored_bytes() as f64 / e.geometry.size() as f64
                );
                println!("lease:       {}", lease_holder(&e));
                return Ok(());
            };
            println!("snapshots:   {}", cas.snapshots);
            println!("lease:       {}", lease_holder(&e));
            print!("{}", cas_space_text(&e, &cas));
        }
        "create" => {
            let name = args.name()?;
            let size = args.size("--size")?.ok_or_else(|| usage("create needs --size SIZE"))?;
            let block_size = args.size("--block-size")?.unwrap_or(4096);
            let block_size = usize::try_from(block_size).map_err(|_| usage("--block-size is too large"))?;
            let layout = args.value("--layout").map(Layout::parse).transpose()?.unwrap_or_default();
            if config.storage_kind() == StorageKind::S3 {
                // Like the plugin: create the bucket if it is missing and the credentials allow.
                nbds3::storage::s3::check_bucket(&config.s3)?;
            }
            let g = admin::create(&*backend, &name, size, block_size, layout)?;
            println!("created export {name}: {} in {}-byte blocks, layout {layout}", human(g.size()), g.block_size());
        }
        "resize" => {
            let name = args.name()?;
            let size = args.size("--size")?.ok_or_else(|| usage("resize needs --size SIZE"))?;
            let shrink = args.switch("--shrink");
            let e = admin::info(&*backend, &name)?;
            if shrink && size < e.geometry.size() && !args.switch("--yes") {
                confirm(
                    "shrink",
                    &format!(
                        "Shrink export {name} from {} to {}, deleting its data past {} from {backend}? This cannot be undone.\nType the export name to confirm: ",
                        human(e.geometry.size()),
                        human(size),
                        human(size)
                    ),
                    name.as_str(),
                )?;
            }
            let r = admin::resize(&backend, &name, size, shrink, config.lease_config(), progress("deleting"))?;
            let (from, to) = (human(r.from.size()), human(r.to.size()));
            match r.to.size().cmp(&r.from.size()) {
                std::cmp::Ordering::Equal => println!("export {name} is already {to}"),
                std::cmp::Ordering::Greater => {
                    println!("grew export {name} from {from} to {to}; clients see the new size when they reconnect")
                }
                std::cmp::Ordering::Less => println!(
                    "shrank export {name} from {from} to {to}, deleting {} objects past the new end",
                    r.deleted_blocks
                ),
            }
        }
        "delete" => {
            let name = args.name()?;
            if snapshots::clear_interrupted_clone(&*backend, &*backend.objects(), &name)? {
                println!("deleted the head an interrupted clone left at {name}: the name is free");
                return Ok(());
            }
            let e = admin::info(&*backend, &name)?;
            if !args.switch("--yes") {
                confirm(
                    "delete",
                    &format!(
                        "Delete export {name} ({} in {} objects) from {backend}? This cannot be undone.\nType the export name to confirm: ",
                        human(e.stored_bytes()),
                        e.stored_blocks
                    ),
                    name.as_str(),
                )?;
            }
            let deleted = admin::delete(&backend, &name, config.lease_config(), progress("deleting"))?;
            println!("deleted export {name} and its {deleted} objects");
        }
        "gc" => {
            let grace = match args.value("--grace") {
                None => gc::DEFAULT_GRACE,
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .ok_or_else(|| usage(format!("--grace takes seconds, not {v:?}")))?,
            };
            let options = GcOptions { grace, dry_run: args.switch("--dry-run"), force: args.switch("--force") };
            let objects = backend.objects();
            let mut bar = progress("deleting");
            let show = std::io::stderr().is_terminal();
            let report = gc::gc(&*objects, &options, &mut |phase, done, total| match phase {
                GcPhase::Deleting => bar(done, total),
                GcPhase::Listing | GcPhase::Marking if show && done % 1000 == 0 => {
                    let what = if phase == GcPhase::Listing { "listing: objects" } else { "marking: pages read" };
                    eprint!("\r{what} {done}\x1b[K");
                }
                GcPhase::Listing | GcPhase::Marking => {}
            })?;
            if show {
                eprint!("\r\x1b[K");
            }
            if args.switch("--json") {
                print_json(&gc_json(&report, options.dry_run));
                return Ok(());
            }
            let verb = if options.dry_run { "would free" } else { "freed" };
            println!("{verb} {} objects ({})", report.freed_objects, human(report.freed_bytes));
            println!(
                "kept {} live chunks ({}) and {} live map pages ({}), and {} unreferenced objects ({}) younger than {}s",
                report.live_chunks,
                human(report.live_chunk_bytes),
                report.live_pages,
                human(report.live_page_bytes),
                report.young_objects,
                human(report.young_bytes),
                grace.as_secs_f64()
            );
        }
        "snapshot" => {
            let (export, snap) = (args.name()?, args.second_name("SNAP")?);
            snapshots::snapshot(&*backend, &*backend.objects(), &export, &snap)?;
            println!("took snapshot {export}@{snap}");
        }
        "snapshots" => {
            let names = snapshots::snapshots(&*backend, &*backend.objects(), &args.name()?)?;
            if args.switch("--json") {
                print_json(&names.iter().map(ExportName::as_str).collect());
                return Ok(());
            }
            for name in names {
                println!("{name}");
            }
        }
        "delete-snapshot" => {
            let (export, snap) = (args.name()?, args.second_name("SNAP")?);
            snapshots::delete_snapshot(&*backend.objects(), &export, &snap)?;
            println!("deleted snapshot {export}@{snap}; `nbds3ctl gc` frees the blocks nothing else references");
        }
        "clone" => {
            let from = args.version()?;
            let Some(snap) = &from.snapshot else {
                return Err(usage(format!("clone needs EXPORT@SNAP, not {from}: take a snapshot first")));
            };
            let new = args.second_name("NEW")?;
            let record = snapshots::clone(&*backend, &*backend.objects(), &from.export, snap, &new)?;
            println!("created export {new} from {from}: {}, layout {}", human(record.geometry.size()), record.layout);
        }
        "diff" => {
            let from = args.version()?;
            let to = Version::parse(args.more.first().ok_or_else(|| usage("diff needs FROM TO"))?)?;
            let mut out = std::io::stdout().lock();
            for changed in snapshots::diff(&*backend, &*backend.objects(), &from, &to)? {
                let kind = match changed.change {
                    Change::Data => "data",
                    Change::Zero => "zero",
                };
                // In the order --help documents, which a JSON map would sort.
                let (offset, length) = (changed.offset, changed.length);
                writeln!(out, "{{\"offset\":{offset},\"length\":{length},\"kind\":\"{kind}\"}}")
                    .map_err(|e| Failure(1, format!("writing to standard output: {e}")))?;
            }
        }
        "export-diff" => export_diff(&*backend, &args)?,
        "import-diff" => {
            let cas = config.cas_config(config.cas_unconditional);
            let options = ImportOptions { force: args.switch("--force"), lease: config.lease_config(), cas };
            import_diff(&backend, &args, options)?
        }
        other => unreachable!("command {other} is in COMMANDS but not run"),
    }
    Ok(())
}

/// `export-diff [FROM] TO FILE|-`.
fn export_diff(backend: &dyn Backend, args: &Args<'_>) -> Result<(), Failure> {
    let words: Vec<&str> = args.name.iter().copied().chain(args.more.iter().copied()).collect();
    let (from, to, file) = match words[..] {
        [from, to, file] => (Some(Version::parse(from)?), Version::parse(to)?, file),
        [to, file] => (None, Version::parse(to)?, file),
        _ => return Err(usage("export-diff needs [FROM] TO FILE (- for standard output)")),
    };
    let json = args.switch("--json");
    if file == "-" && json {
        return Err(usage("--json prints to standard output, where - writes the stream: give a FILE"));
    }
    if file == "-" && std::io::stdout().is_terminal() {
        return Err(usage("refusing to write a binary stream to a terminal: redirect it, or give a FILE"));
    }
    let objects = backend.objects();
    let mut progress = progress("exporting");
    let summary = if file == "-" {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
        diff_stream::export_diff(backend, objects, from.as_ref(), &to, &mut out, &mut progress)?
    } else {
        let created = std::fs::OpenOptions::new().write(true).create_new(true).open(file);
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            created.map_err(|e| Failure(1, format!("cannot create {file}: {e}")))?,
        );
        let written =
            diff_stream::export_diff(backend, objects, from.as_ref(), &to, &mut out, &mut progress).and_then(|s| {
                // Durable before it is reported written: a backup that a crash could lose is none.
                let file_done = out.into_inner().map_err(|e| Error::io(file, "writing", e.error()))?;
                file_done.sync_all().map_err(|e| Error::io(file, "syncing", &e))?;
                Ok(s)
            });
        if written.is_err() {
            // A partial stream would only be refused later: leave none behind.
            let _ = std::fs::remove_file(file);
        }
        written?
    };
    let from = from.map_or_else(|| "nothing".to_string(), |f| f.to_string());
    if json {
        print_json(&serde_json::json!({
            "from": from, "to": to.to_string(), "file": file,
            "data_blocks": summary.data_blocks, "zero_blocks": summary.zero_blocks, "stream_bytes": summary.stream_bytes,
        }));
    } else if file != "-" {
        println!("{}", stream_summary(&format!("wrote the changes from {from} to {to} into {file}"), &summary));
    } else if std::io::stderr().is_terminal() {
        eprintln!("{}", stream_summary(&format!("wrote the changes from {from} to {to}"), &summary));
    }
    Ok(())
}

/// `import-diff FILE|- EXPORT`.
fn import_diff(backend: &Arc<dyn Backend>, args: &Args<'_>, options: ImportOptions) -> Result<(), Failure> {
    let (Some(file), [export]) = (args.name, &args.more[..]) else {
        return Err(usage("import-diff needs FILE EXPORT (- for standard input)"));
    };
    let export = ExportName::new(export)?;
    if file == "-" && std::io::stdin().is_terminal() {
        return Err(usage("- reads the stream from standard input, which is a terminal: pipe it in, or give a FILE"));
    }
    let objects = backend.objects();
    let mut progress = progress("importing");
    let summary = if file == "-" {
        let mut input = std::io::BufReader::with_capacity(1 << 20, std::io::stdin().lock());
        diff_stream::import_diff(backend, objects, &export, &mut input, options, &mut progress)?
    } else {
        let opened = std::fs::File::open(file).map_err(|e| Failure(1, format!("cannot open {file}: {e}")))?;
        let mut input = std::io::BufReader::with_capacity(1 << 20, opened);
        diff_stream::import_diff(backend, objects, &export, &mut input, options, &mut progress)?
    };
    if args.switch("--json") {
        print_json(&serde_json::json!({
            "export": export.as_str(), "file": file,
            "data_blocks": summary.data_blocks, "zero_blocks": summary.zero_blocks, "stream_bytes": summary.stream_bytes,
        }));
    } else {
        println!("{}", stream_summary(&format!("applied {file} to export {export}"), &summary));
    }
    Ok(())
}

fn stream_summary(done: &str, s: &StreamSummary) -> String {
    format!(
        "{done}: {} blocks of data, {} blocks zeroed ({} stream)",
        s.data_blocks,
        s.zero_blocks,
        human(s.stream_bytes)
    )
}

/// Who held the export's lease when it was read, and until when.
fn lease_holder(e: &admin::ExportInfo) -> String {
    e.lease.as_ref().map_or_else(|| "none".into(), |l| l.describe(e.lease_read_at))
}

fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// The help `words` ask for, if they do: `--help` alone or with no command, `help`, `help
/// COMMAND`, or `COMMAND ... --help`.
fn help_asked(words: &[&str]) -> Result<Option<String>, Failure> {
    let wants_help = |w: &&str| *w == "--help" || *w == "-h";
    let command = match words {
        ["help"] => return Ok(Some(general_help())),
        ["help", name, ..] => Some(*name),
        _ if words.iter().any(wants_help) => words.iter().copied().find(|w| !w.starts_with('-')),
        _ => return Ok(None),
    };
    match command {
        None => Ok(Some(general_help())),
        Some(name) => {
            let c = find(name).ok_or_else(|| usage(format!("no help for {name:?}: it is not a command")))?;
            let mut summary = c.summary.chars();
            let summary: String = summary.next().map(|f| f.to_ascii_uppercase()).into_iter().chain(summary).collect();
            Ok(Some(format!("Usage: nbds3ctl [KEY=VALUE ...] {} {}\n\n{summary}.\n\n{}\n", c.name, c.args, c.details)))
        }
    }
}

fn general_help() -> String {
    let synopses: Vec<String> = COMMANDS.iter().map(|c| format!("{} {}", c.name, c.args)).collect();
    let width = synopses.iter().map(String::len).max().unwrap_or(0);
    let mut help = USAGE.to_string();
    for (synopsis, c) in synopses.iter().zip(&COMMANDS) {
        help.push_str(&format!("  {synopsis:<width$}  {}\n", c.summary));
    }
    help + FOOTER
}

/// How many words a command takes after its NAME: few take any.
fn more_words(command: &str) -> usize {
    match command {
        "export-diff" => 2,
        "import-diff" | "snapshot" | "delete-snapshot" | "clone" | "diff" => 1,
        _ => 0,
    }
}

/// A command's arguments, checked against what it takes.
struct Args<'a> {
    name: Option<&'a str>,
    /// Words after NAME, for the commands that take them ([`more_words`]).
    more: Vec<&'a str>,
    options: Vec<(&'a str, &'a str)>,
    switches: Vec<&'a str>,
}

impl<'a> Args<'a> {
    fn parse(command: &Command, words: &[&'a str]) -> Result<Self, Failure> {
        let mut args = Args { name: None, more: Vec::new(), options: Vec::new(), switches: Vec::new() };
        let mut words = words.iter().copied();
        while let Some(word) = words.next() {
            let word = if word == "-y" { "--yes" } else { word };
            if word == "-" || !word.starts_with('-') {
                if command.takes_name && args.name.is_none() {
                    args.name = Some(word);
                } else if args.name.is_some() && args.more.len() < more_words(command.name) {
                    args.more.push(word);
                } else {
                    return Err(usage(format!("unexpected argument {word:?}")));
                }
                continue;
            }
            let (flag, inline) = word.split_once('=').map_or((word, None), |(f, v)| (f, Some(v)));
            if let Some(&flag) = command.options.iter().find(|o| **o == flag) {
                let value = match inline {
                    Some(v) => v,
                    None => words.next().ok_or_else(|| usage(format!("{flag} needs a value")))?,
                };
                args.options.push((flag, value));
            } else if let (Some(&flag), None) = (command.switches.iter().find(|s| **s == flag), inline) {
                args.switches.push(flag);
            } else {
                return Err(usage(format!("unknown option {word:?} for {}", command.name)));
            }
        }
        Ok(args)
    }

    fn name(&self) -> Result<ExportName, Failure> {
        Ok(ExportName::new(self.name.ok_or_else(|| usage("which export? give its NAME"))?)?)
    }

    /// The name after the first, which `--help` calls `what` (`SNAP`, `NEW`).
    fn second_name(&self, what: &str) -> Result<ExportName, Failure> {
        Ok(ExportName::new(self.more.first().ok_or_else(|| usage(format!("give {what} after the export")))?)?)
    }

    /// The first argument as `EXPORT` or `EXPORT@SNAP`.
    fn version(&self) -> Result<Version, Failure> {
        Ok(Version::parse(self.name.ok_or_else(|| usage("which export? give EXPORT or EXPORT@SNAP"))?)?)
    }

    fn switch(&self, flag: &str) -> bool {
        self.switches.contains(&flag)
    }

    /// The value of option `flag`, the last one given.
    fn value(&self, flag: &str) -> Option<&'a str> {
        self.options.iter().rev().find(|(f, _)| *f == flag).map(|(_, v)| *v)
    }

    /// The value of option `flag`, parsed as a size.
    fn size(&self, flag: &str) -> Result<Option<u64>, Failure> {
        Ok(self.value(flag).map(|v| parse_size(flag.trim_start_matches('-'), v)).transpose()?)
    }
}

/// One export as `list --json` and `info --json` show it: one field a line.
fn export_json(e: &admin::ExportInfo) -> serde_json::Value {
    serde_json::json!({
        "name": e.name.as_str(),
        "size": e.geometry.size(),
        "block_size": e.geometry.block_size(),
        "blocks": e.geometry.blocks(),
        "layout": e.layout.to_string(),
        "stored_blocks": e.stored_blocks,
        "stored_bytes": e.stored_bytes(),
        "lease": match &e.lease {
            Some(LeaseHolder::Writer { host, pid, expires }) => serde_json::json!({ "host": host, "pid": pid, "expires": expires }),
            Some(LeaseHolder::Unreadable) => serde_json::json!("unreadable"),
            None => serde_json::Value::Null,
        },
    })
}

/// What `info --json` prints: `list --json`'s object, what holes saved, and for a cas export
/// where its space goes (the keys `info --help` lists).
fn info_json(e: &admin::ExportInfo, cas: Option<&admin::CasSpace>) -> serde_json::Value {
    let mut json = export_json(e);
    json["mapped_blocks"] = e.stored_blocks.into();
    json["mapped_bytes"] = e.stored_bytes().into();
    json["holes_saved_bytes"] = e.holes_saved_bytes().into();
    if let Some(cas) = cas {
        let extra = serde_json::json!({
            "snapshots": cas.snapshots,
            "distinct_chunks": cas.distinct_chunks,
            "distinct_chunk_bytes": cas.distinct_chunk_bytes,
            "dedup_saved_bytes": cas.dedup_saved_bytes,
            "map_pages": cas.pages,
            "map_page_bytes": cas.page_bytes,
            "with_snapshots": {
                "distinct_chunks": cas.with_snapshots_chunks,
                "distinct_chunk_bytes": cas.with_snapshots_chunk_bytes,
                "map_pages": cas.with_snapshots_pages,
                "map_page_bytes": cas.with_snapshots_page_bytes,
            },
            "bucket": {
                "chunk_objects": cas.bucket.chunks,
                "chunk_bytes": cas.bucket.chunk_bytes,
                "page_objects": cas.bucket.pages,
                "page_bytes": cas.bucket.page_bytes,
                "stored_bytes": cas.bucket.bytes(),
            },
        });
        if let (Some(json), serde_json::Value::Object(extra)) = (json.as_object_mut(), extra) {
            json.extend(extra);
        }
    }
    json
}

/// `info`'s account of a cas export's space, like `zfs list -o space`: the export, then with its
/// snapshots, then the whole bucket.
fn cas_space_text(e: &admin::ExportInfo, cas: &admin::CasSpace) -> String {
    let (size, mapped, distinct) = (e.geometry.size(), e.stored_bytes(), cas.distinct_chunk_bytes);
    let row =
        |label: &str, bytes: u64, what: String| format!("  {label:<17}{:>8}  {bytes} bytes{what}\n", human(bytes));
    let mut text = String::from("\nthe export as of its last flush, snapshots not included:\n");
    text += &row("logical size", size, String::new());
    text += &row("mapped", mapped, format!(" in {} blocks that hold data", e.stored_blocks));
    text += &row("holes saved", e.holes_saved_bytes(), ": blocks never written, zeroed or trimmed".into());
    text += &row("distinct chunks", distinct, format!(" in {} chunks", cas.distinct_chunks));
    text += &row("dedup saved", cas.dedup_saved_bytes, ": identical blocks in the export stored once".into());
    text += &row("map pages", cas.page_bytes, format!(" in {} pages", cas.pages));
    let snapshots = if cas.snapshots == 1 { "snapshot".to_string() } else { "snapshots".to_string() };
    text += &format!("with its {} {snapshots}:\n", cas.snapshots);
    let chunks = cas.with_snapshots_chunks;
    text += &row("distinct chunks", cas.with_snapshots_chunk_bytes, format!(" in {chunks} chunks"));
    text += &row("map pages", cas.with_snapshots_page_bytes, format!(" in {} pages", cas.with_snapshots_pages));
    text += "the bucket (every cas export, snapshot and clone, shared objects once, and garbage gc has not freed):\n";
    let b = &cas.bucket;
    text += &row("chunk objects", b.chunk_bytes, format!(" in {} objects", b.chunks));
    text += &row("page objects", b.page_bytes, format!(" in {} objects", b.pages));
    text += &row("stored", b.bytes(), String::new());
    text
}

/// What `gc --json` prints: one field a line, sizes in bytes.
fn gc_json(r: &GcReport, dry_run: bool) -> serde_json::Value {
    serde_json::json!({
        "dry_run": dry_run,
        "listed_objects": r.listed_objects,
        "listed_bytes": r.listed_bytes,
        "freed_objects": r.freed_objects,
        "freed_bytes": r.freed_bytes,
        "young_objects": r.young_objects,
        "young_bytes": r.young_bytes,
        "live_chunks": r.live_chunks,
        "live_chunk_bytes": r.live_chunk_bytes,
        "live_pages": r.live_pages,
        "live_page_bytes": r.live_page_bytes,
    })
}

fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_else(|e| unreachable!("JSON of plain values: {e}")));
}

/// A progress callback for `admin`'s long operations: a bar on standard error when it is a
/// terminal, nothing otherwise (so scripts and logs see only the result).
fn progress(verb: &'static str) -> impl FnMut(u64, u64) {
    let show = std::io::stderr().is_terminal();
    move |done, total| {
        if show {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            let bar = "#".repeat((pct / 4) as usize);
            eprint!("\r{verb} [{bar:<25}] {done}/{total} objects ({pct}%)");
            if done == total {
                eprintln!();
            }
        }
    }
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

/// Asks the user to type `expected` before `verb`ing; refuses when no one can answer.
fn confirm(verb: &str, prompt: &str, expected: &str) -> Result<(), Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(usage(format!("refusing to {verb} without --yes when standard input is not a terminal")));
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).map_err(|e| Failure(1, e.to_string()))?;
    if answer.trim() == expected {
        Ok(())
    } else {
        Err(Failure(1, "not confirmed; nothing changed".into()))
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
