//! Crash model test of the `cas` layout's atomic FLUSH: random writes, deletes and flushes on a
//! `CasStorage` over an object store that dies after a random number of requests (kill -9
//! between any two requests; the last request may land without its answer). A new store opened
//! on what was left must read exactly as the last acknowledged FLUSH, or as a later FLUSH whose
//! commit landed: never a mix. On `MemoryObjects`, whose conditional writes are exact, and on
//! the S3 server under test through `S3Objects`, where the head's `If-Match` is a real request.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbds3::storage::cas::{CasConfig, CasStorage};
use nbds3::storage::objects::{Listed, MemoryObjects, Object, ObjectStore, Put, ReadInto};
use nbds3::storage::{BlockBuf, BlockId, Fence, Storage};
use nbds3::{Error, ExportName, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: usize = 512;

/// An object store that stops answering after `budget` requests, like a process killed there.
/// With `lose_last_answer`, the last request reaches the store but its caller sees an error.
/// Before that, one request in `flaky_one_in` (if not 0) fails, as a refused connection does
/// (or, for one in three of those, after reaching the store, as a lost answer), and the writer
/// goes on.
#[derive(Debug)]
struct Dying {
    inner: Arc<dyn ObjectStore>,
    left: AtomicU64,
    lose_last_answer: bool,
    flaky_one_in: u64,
    attempts: AtomicU64,
}

impl fmt::Display for Dying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dying")
    }
}

impl Dying {
    /// Whether this request reaches the store, and whether its answer reaches the caller.
    fn request(&self) -> (bool, bool) {
        match self.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
            Ok(1) => (true, !self.lose_last_answer),
            Ok(_) => (true, true),
            Err(_) => (false, false),
        }
    }

    fn run<T>(&self, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let dead = || Err(Error::backend(self, "killed"));
        let n = self.attempts.fetch_add(1, Ordering::SeqCst);
        let draw = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
        let flaky = self.flaky_one_in != 0 && draw % self.flaky_one_in == 0;
        if flaky && draw % 3 != 0 {
            return Err(Error::backend(self, "connection refused"));
        }
        match self.request() {
            (true, true) if flaky => {
                let _ = op();
                Err(Error::backend(self, "answer lost"))
            }
            (false, _) => dead(),
            (true, answered) => {
                let result = op();
                if answered {
                    result
                } else {
                    dead()
                }
            }
        }
    }
}

impl ObjectStore for Dying {
    fn get(&self, key: &str, max_len: usize) -> Result<Option<Object>> {
        self.run(|| self.inner.get(key, max_len))
    }
    fn read_into(&self, key: &str, offset: Option<u64>, buf: &mut BlockBuf) -> Result<ReadInto> {
        self.run(|| self.inner.read_into(key, offset, buf))
    }
    fn put(&self, key: &str, data: &[u8], condition: Put<'_>, fence: Option<Fence<'_>>) -> Result<Option<String>> {
        self.run(|| self.inner.put(key, data, condition, fence))
    }
    fn delete(&self, keys: &[String], fence: Option<Fence<'_>>) -> Result<()> {
        self.run(|| self.inner.delete(keys, fence))
    }
    fn list(&self, prefix: &str, start_after: Option<&str>, visit: &mut dyn FnMut(Listed) -> bool) -> Result<()> {
        self.run(|| self.inner.list(prefix, start_after, visit))
    }
    fn sync(&self) -> Result<()> {
        self.run(|| self.inner.sync())
    }
    fn conditional_writes(&self) -> Result<bool> {
        // Not a request the budget counts: S3Objects answers from its start-up probe.
        self.inner.conditional_writes()
    }
}

type Model = BTreeMap<u64, Vec<u8>>;

fn read_all(s: &dyn Storage, blocks: &[u64]) -> Result<Model> {
    let mut found = Model::new();
    for &id in blocks {
        let mut buf = BlockBuf::zeroed(BS);
        if s.read_block(BlockId(id), &mut buf)? {
            found.insert(id, buf.to_vec());
        }
    }
    Ok(found)
}

/// One life of a writer until its store dies; returns the states it may have committed.
fn run_until_killed(
    seed: u64,
    inner: Arc<dyn ObjectStore>,
    export: &ExportName,
    acked: &mut Model,
    blocks: &[u64],
) -> Vec<Model> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dying = Arc::new(Dying {
        inner,
        left: AtomicU64::new(rng.random_range(1..300)),
        lose_last_answer: rng.random_bool(0.5),
        flaky_one_in: if rng.random_bool(0.5) { rng.random_range(3..20) } else { 0 },
        attempts: AtomicU64::new(seed),
    });
    let config = CasConfig {
        cached_pages: rng.random_range(1..8),
        max_dirty_pages: rng.random_range(1..6),
        // Tiny deltas, so writes land in the delta and folds into the tree happen all the time.
        delta_entries: rng.random_range(0..8),
        ..CasConfig::default()
    };
    let Ok(s) = CasStorage::open(dying, export, BS, config) else { return vec![] };
    let mut state = acked.clone();
    let mut attempted = Vec::new();
    for _ in 0..200 {
        let id = blocks[rng.random_range(0..blocks.len())];
        let result = match rng.random_range(0..10) {
            0..=5 => {
                // Few distinct contents, so dedup skips happen too.
                let data = vec![rng.random_range(1..6u8); BS];
                s.write_block(BlockId(id), &data).map(|()| {
                    state.insert(id, data);
                })
            }
            6 => s.delete_block(BlockId(id)).map(|()| {
                state.remove(&id);
            }),
            _ => {
                attempted.push(state.clone());
                match s.flush() {
                    Ok(()) => {
                        *acked = state.clone();
                        attempted.clear();
                    }
                    // A failed FLUSH may be retried; the writer goes on, as a client would. Being
                    // the only writer, it must never think another one took over.
                    Err(e) => {
                        assert!(
                            !e.to_string().contains("another writer"),
                            "seed {seed}: fenced with no other writer: {e}"
                        );
                        continue;
                    }
                }
                Ok(())
            }
        };
        if result.is_err() {
            break;
        }
    }
    attempted
}

/// Blocks in three leaves and beyond the first level, so the map grows and pages split.
fn blocks() -> Vec<u64> {
    (0..12).chain(1020..1030).chain([5000, 1 << 20, (1 << 20) + 1]).collect()
}

/// `lives` lives of one writer after another on `export`, the first seeded `first_seed`, each
/// on a store `connect` makes (a restarted process's own client): after each, a fresh open must
/// find an acknowledged state or a later attempted one, and the next life goes on from there.
fn lives(connect: &dyn Fn() -> Arc<dyn ObjectStore>, export: &ExportName, first_seed: u64, lives: u64) {
    let blocks = blocks();
    let mut acked = Model::new();
    for seed in first_seed..first_seed + lives {
        let attempted = run_until_killed(seed, connect(), export, &mut acked, &blocks);
        let reopened = CasStorage::open(connect(), export, BS, CasConfig::default()).expect("reopen");
        let found = read_all(&reopened, &blocks)
            .unwrap_or_else(|e| panic!("{export}, seed {seed}: reading after the crash: {e}"));
        if found == acked {
            continue;
        }
        match attempted.iter().find(|m| **m == found) {
            Some(later) => acked = later.clone(),
            None => panic!(
                "{export}, seed {seed}: after the crash the export holds {:?}, which is neither the last acknowledged FLUSH {:?} nor a later attempt",
                found.iter().map(|(k, v)| (*k, v[0])).collect::<Vec<_>>(),
                acked.iter().map(|(k, v)| (*k, v[0])).collect::<Vec<_>>()
            ),
        }
    }
}

/// The number in environment variable `var`, or `default`.
fn seeds(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Hundreds of lives on `MemoryObjects`, in runs of 30 on a fresh store each.
#[test]
fn a_crash_at_any_request_leaves_some_flushed_state() {
    let export = ExportName::new("crash").unwrap();
    for run in 0..seeds("CAS_CRASH_SEEDS", 600).div_ceil(30) {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryObjects::default());
        lives(&|| store.clone(), &export, run * 1000, 30);
    }
}

/// The same on the S3 server, through `S3Objects` (a new client for each life and each reopen,
/// as a restarted process has): a few dozen lives (`CAS_CRASH_S3_SEEDS`, default 60), in runs
/// of 6 on an export of their own, four runs at a time, in a bucket of the test's own.
#[test]
fn a_crash_at_any_request_on_s3_leaves_some_flushed_state() {
    let Some(env) = common::s3_with_conditional_writes() else { return };
    let bucket = env.own_bucket("cas-crash");
    let runs = seeds("CAS_CRASH_S3_SEEDS", 60).div_ceil(6);
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| loop {
                let run = next.fetch_add(1, Ordering::Relaxed);
                if run >= runs {
                    return;
                }
                let export = ExportName::new(&format!("crash{run}")).unwrap();
                lives(&|| bucket.env.objects(&bucket.name) as Arc<dyn ObjectStore>, &export, run * 1000, 6);
            });
        }
    });
}
