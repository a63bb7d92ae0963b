//! Fencing race of the `cas` layout: two writers on one export, each writing its own pattern
//! and flushing. Exactly one wins each race: the loser's FLUSH is refused, it then fails every
//! write and FLUSH, and the export ends as exactly the winner's last flushed state.

use std::sync::{Arc, Barrier};

use nbds3::storage::cas::{CasConfig, CasStorage};
use nbds3::storage::objects::MemoryObjects;
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

fn write_round(s: &CasStorage, writer: u8, round: u8) -> nbds3::Result<()> {
    for id in 0..BLOCKS {
        s.write_block(BlockId(id * 997), &vec![writer * 100 + round; BS])?;
    }
    s.flush()
}

fn race(store: &Arc<MemoryObjects>, export: &ExportName, late_opener: bool) -> Vec<Outcome> {
    let barrier = Barrier::new(2);
    std::thread::scope(|scope| {
        let racers: Vec<_> = [1u8, 2]
            .into_iter()
            .map(|writer| {
                let barrier = &barrier;
                scope.spawn(move || {
                    if late_opener && writer == 2 {
                        barrier.wait();
                    }
                    let s = CasStorage::open(store.clone(), export, BS, CasConfig::default()).expect("open");
                    if !(late_opener && writer == 2) {
                        barrier.wait();
                    }
                    let mut outcome = Outcome { writer, last_flushed_round: None, fenced: false };
                    for round in 1..=20 {
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

fn check(store: &Arc<MemoryObjects>, export: &ExportName, outcomes: &[Outcome]) {
    let fenced = outcomes.iter().filter(|o| o.fenced).count();
    assert_eq!(fenced, 1, "exactly one writer loses each race: {outcomes:?}");
    let winner = outcomes.iter().find(|o| !o.fenced).expect("a winner");
    assert_eq!(winner.last_flushed_round, Some(20), "{outcomes:?}");
    let s = CasStorage::open(store.clone(), export, BS, CasConfig::default()).expect("open");
    let expected = winner.writer * 100 + 20;
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

/// Twenty races on fresh exports named `{label}{round}`.
fn races(label: &str, late_opener: bool) {
    for round in 0..20 {
        let store = Arc::new(MemoryObjects::default());
        let export = ExportName::new(&format!("{label}{round}")).unwrap();
        check(&store, &export, &race(&store, &export, late_opener));
    }
}

/// Both writers open the same head and race to commit: the first commit wins, the other is fenced.
#[test]
fn racing_writers_never_mix() {
    races("race", false);
}

/// A second writer takes over mid-stream (it opens as the first commits): the first is fenced
/// at its next commit, whoever wrote more.
#[test]
fn a_takeover_fences_the_old_writer() {
    races("takeover", true);
}
