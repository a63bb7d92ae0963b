//! Fencing race of the `cas` layout: two writers on one export, each writing its own pattern
//! and flushing. Exactly one wins each race: the loser's FLUSH is refused, it then fails every
//! write and FLUSH, and the export ends as exactly the winner's last flushed state. On
//! `MemoryObjects`, and on the S3 server under test with each writer on a client of its own (two
//! hosts), racing through real `If-Match` PUTs of the head.

mod common;

use std::sync::{Arc, Barrier};

use nbds3::storage::cas::{CasConfig, CasStorage};
use nbds3::storage::objects::{MemoryObjects, ObjectStore};
use nbds3::storage::{BlockBuf, BlockId, Storage};
use nbds3::ExportName;

const BS: usize = 4096;
const BLOCKS: u64 = 40;

/// What a writer managed: the pattern of its last successful flush, and whether it was fenced.
#[derive(Debug)]
struct Outcome {
    writer: u8,
    last_flushed_round: Option<u8>,
    fenced: bool,
}

/// A delta smaller than a round's writes, so each round both folds and commits a delta.
fn small_delta() -> CasConfig {
    CasConfig { delta_entries: 3, ..CasConfig::default() }
}

fn write_round(s: &CasStorage, writer: u8, round: u8) -> nbds3::Result<()> {
    for id in 0..BLOCKS {
        s.write_block(BlockId(id * 997), &vec![writer * 100 + round; BS])?;
    }
    s.flush()
}

/// A new client of the store the race runs on: each writer and the final reader get their own.
type Connect<'a> = &'a (dyn Fn() -> Arc<dyn ObjectStore> + Sync);

/// Two writers race `rounds` rounds on `export`. Without `late_opener` both open the same head
/// and race from round 1; with it the first commits round 1 alone and the second opens only
/// then, at the head that commit wrote, so the first's next commit and the second's first both
/// expect that head.
fn race(connect: Connect<'_>, export: &ExportName, rounds: u8, late_opener: bool) -> Vec<Outcome> {
    let barrier = Barrier::new(2);
    std::thread::scope(|scope| {
        let racers: Vec<_> = [1u8, 2]
            .into_iter()
            .map(|writer| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let second = late_opener && writer == 2;
                    if second {
                        barrier.wait();
                    }
                    let s = CasStorage::open(connect(), export, BS, small_delta()).expect("open");
                    let mut outcome = Outcome { writer, last_flushed_round: None, fenced: false };
                    if late_opener && writer == 1 {
                        write_round(&s, writer, 1).expect("the first writer's first round, alone");
                        outcome.last_flushed_round = Some(1);
                    }
                    if !second {
                        barrier.wait();
                    }
                    for round in outcome.last_flushed_round.map_or(1, |r| r + 1)..=rounds {
                        match write_round(&s, writer, round) {
                            Ok(()) => outcome.last_flushed_round = Some(round),
                            Err(e) => {
                                assert!(e.to_string().contains("another writer committed"), "writer {writer}: {e}");
                                outcome.fenced = true;
                                let after = s.write_block(BlockId(0), &vec![9; BS]).and_then(|()| s.flush());
                                assert!(after.is_err(), "writer {writer} wrote after it was fenced");
                                break;
                            }
                        }
                    }
                    outcome
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().expect("racer")).collect()
    })
}

fn check(connect: Connect<'_>, export: &ExportName, rounds: u8, outcomes: &[Outcome]) {
    let fenced = outcomes.iter().filter(|o| o.fenced).count();
    assert_eq!(fenced, 1, "exactly one writer loses each race: {outcomes:?}");
    let winner = outcomes.iter().find(|o| !o.fenced).expect("a winner");
    assert_eq!(winner.last_flushed_round, Some(rounds), "{outcomes:?}");
    let s = CasStorage::open(connect(), export, BS, small_delta()).expect("open");
    let expected = winner.writer * 100 + rounds;
    for id in 0..BLOCKS {
        let mut buf = BlockBuf::zeroed(BS);
        assert!(s.read_block(BlockId(id * 997), &mut buf).expect("read"), "block {id}");
        assert!(
            buf.iter().all(|&b| b == expected),
            "block {id} holds {} where writer {} flushed {expected}: states mixed",
            buf[0],
            winner.writer
        );
    }
}

/// `count` races of `rounds` rounds on fresh exports named `{label}{round}`, each on a store
/// `new_store` makes. Every other export has a head before the race (a writer committed to it
/// and went away), so both kinds of commit race: the creation of the head (`If-None-Match`) and
/// its replacement (`If-Match`).
fn races<'a>(label: &str, late_opener: bool, count: u32, rounds: u8, new_store: &dyn Fn() -> Clients<'a>) {
    for round in 0..count {
        let connect = new_store();
        let export = ExportName::new(&format!("{label}{round}")).unwrap();
        if round % 2 == 1 {
            let earlier = CasStorage::open(connect(), &export, BS, small_delta()).expect("open");
            write_round(&earlier, 0, 1).expect("an earlier writer's round");
        }
        check(&*connect, &export, rounds, &race(&*connect, &export, rounds, late_opener));
    }
}

/// What makes the clients of one race's store.
type Clients<'a> = Box<dyn Fn() -> Arc<dyn ObjectStore> + Sync + 'a>;

/// A fresh `MemoryObjects` that both writers share.
fn memory() -> Clients<'static> {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryObjects::default());
    Box::new(move || store.clone())
}

/// Both writers open the same head and race to commit: the first commit wins, the other is fenced.
#[test]
fn racing_writers_never_mix() {
    races("race", false, 20, 20, &memory);
}

/// A second writer takes over mid-stream (it opens once the first has committed): one of them
/// is fenced at its next commit, whoever wrote more.
#[test]
fn a_takeover_fences_the_old_writer() {
    races("takeover", true, 20, 20, &memory);
}

/// Both races on the S3 server, ten of each with five rounds a writer, in a bucket of the test's
/// own, the two kinds side by side: each writer and the final reader on an `S3Objects` of its own
/// (its own connections, as separate hosts).
#[test]
fn writers_on_separate_s3_clients_never_mix() {
    let Some(env) = common::s3_with_conditional_writes() else { return };
    let bucket = env.own_bucket("cas-fencing");
    let clients = || -> Clients<'_> { Box::new(|| bucket.env.objects(&bucket.name)) };
    std::thread::scope(|scope| {
        scope.spawn(|| races("race", false, 10, 5, &clients));
        scope.spawn(|| races("takeover", true, 10, 5, &clients));
    });
}
