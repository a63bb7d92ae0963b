//! `Streams`: notices sequential reads and writes, loads blocks ahead of a reader and writes
//! them back behind a writer.
//!
//! A reader that reads on from where it was will want the next blocks: each sequential read
//! doubles a window (bounded by a quarter of the cache and 64 MiB) of blocks to load ahead. A
//! writer that writes on is done with the blocks it left behind (a file copy, an image upload,
//! a journal): those are written back at once (write-behind), so S3 works while the writer still
//! writes, and a FLUSH at the end finds little left to do. Random writes are left dirty until
//! FLUSH, `max-dirty` or `writeback-delay`, so blocks rewritten often cost one PUT, not many.
//!
//! Only over storage whose requests are slow enough to be worth overlapping (S3, files: see
//! [`Capabilities`](crate::storage::Capabilities)); over RAM it would only cost copies and threads.
//!
//! Both go into one queue that long-lived workers, as many as the volume's concurrency, take one
//! block at a time: `concurrency` requests stay in flight as long as a stream goes on, without the
//! gap that waiting for a whole batch leaves at its tail. A read elsewhere (a seek) drops the
//! queued loads: those blocks are no longer wanted.
//!
//! Every read passes here, cached ones too, so a read never waits: one that finds the read
//! detector busy goes unseen, and a seek takes the queue's lock only when loads were queued.
//!
//! A reader that has read on past the read-ahead bound is scanning (a backup, a checksum, a file
//! copy): the blocks it has left behind are demoted to the cold end of the cache's LRU (see
//! [`BlockCache::demote`](super::BlockCache::demote)), so that once the cache is full the scan
//! evicts its own blocks rather than the working set that was there before it. Until then they
//! stay cached like any other: a region read once and then read again (a warm-up) is served
//! from memory as long as it fits.
//!
//! Concurrent requests of one stream (a client with several in flight) reach us out of order, so
//! a request counts as sequential when it starts within a few requests of where the stream is,
//! or behind it within the read-ahead window: a request held up by a slow block while the
//! client's other requests ran on through blocks read ahead (measured: fio at iodepth 8 saw
//! one finish 18 requests behind) is late, not a seek, and taking it for one dropped the
//! queued loads and restarted the window.
//! Writes are written behind only once the stream has moved on by twice that much without
//! writing bytes twice, so small writes clustered in one place (file system metadata) are not
//! taken for a stream.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError, Weak};
use std::time::Duration;

use super::Volume;
use crate::storage::BlockId;
use crate::{background, lock};

/// How many requests of one stream may be in flight, and so arrive out of order. The slack this
/// allows is in requests, not blocks, so that small random requests on large blocks are not
/// taken for a stream.
const REORDER: u64 = 16;

/// A scan's blocks are demoted this many at a time: one index lock per this many blocks read.
const DEMOTE_EVERY: u64 = 16;

/// Sequential-access detection and the queue of blocks to load or write back.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    reads: Mutex<Detector>,
    writes: Mutex<Detector>,
    /// Work for the workers, in the order it was queued.
    queue: Mutex<VecDeque<Job>>,
    /// Whether loads may have been queued since a seek last dropped them: random reads, each a
    /// seek, need not take the queue's lock to drop nothing.
    loads_queued: AtomicBool,
    /// Signalled once per job queued, so that one waiting worker wakes for each.
    queued: Condvar,
    /// The workers start with the first stream, which is after nbdkit forks.
    workers: OnceLock<()>,
}

#[derive(Debug, Clone, Copy)]
enum Job {
    Load(BlockId),
    WriteBack(BlockId),
}

/// One stream: where it is and how far work has been queued for it.
#[derive(Debug, Default)]
struct Detector {
    /// Where the stream started.
    start: u64,
    /// Bytes its requests covered, counting overlaps again.
    covered: u64,
    /// The byte after the furthest request of the stream.
    next: u64,
    /// Reads: bytes to load ahead; doubles with each sequential read up to a bound.
    window: u64,
    /// Reads: everything before this was queued to load. Writes: everything from the stream's
    /// start to this was queued to write back.
    queued_until: u64,
    /// Reads: everything from the stream's start to this was demoted in the cache.
    demoted_until: u64,
}

impl Detector {
    /// Whether a request of `len` bytes at `offset` continues the stream (starts within `slack`
    /// bytes of its head, either side, or behind it within the read-ahead window); if not, it
    /// starts a new one.
    fn continues(&mut self, offset: u64, len: u64, slack: u64) -> bool {
        let end = offset + len;
        let behind = slack.max(self.window);
        let sequential = self.next != 0 && offset <= self.next + slack && offset + behind >= self.next;
        if sequential {
            self.next = self.next.max(end);
            self.covered += len;
        } else {
            *self = Detector {
                start: offset,
                covered: len,
                next: end,
                window: 0,
                queued_until: offset,
                demoted_until: offset,
            };
        }
        sequential
    }

    /// Whether the stream has gone on for `2 * slack` bytes without writing them twice: a writer
    /// moving on, not requests clustered around one place.
    fn moving_on(&self, slack: u64) -> bool {
        let span = self.next.saturating_sub(self.start);
        span >= 2 * slack && self.covered <= span + slack
    }

    /// Reads: once the stream has read more than `bound` bytes, the blocks of `bs` bytes it has
    /// left more than `slack` behind (requests still in flight may read those within it) and
    /// that were not demoted yet, at least [`DEMOTE_EVERY`] of them; otherwise none.
    fn left_behind(&mut self, bs: u64, bound: u64, slack: u64) -> Range<u64> {
        if self.next.saturating_sub(self.start) <= bound {
            return 0..0;
        }
        let (from, to) = (self.demoted_until / bs, self.next.saturating_sub(slack) / bs);
        if to < from + DEMOTE_EVERY {
            return 0..0;
        }
        self.demoted_until = to * bs;
        from..to
    }
}

impl Streams {
    /// After a read of `len` bytes at `offset` of `volume`: if reads are sequential, queues the
    /// blocks of the window ahead of them that are not queued yet; otherwise drops queued loads.
    pub(crate) fn after_read(&self, volume: &Arc<Volume>, offset: u64, len: u64) {
        let Some(bs) = Self::block_size_if_useful(volume) else { return };
        let max = (volume.cache.capacity() as u64 * bs / 4).min(64 << 20);
        let slack = REORDER * len;
        let (behind, ahead) = {
            // A reader that finds the detector busy leaves it be: one read fewer seen costs a
            // stream nothing (the next one still lands within the slack), while waiting would
            // put every read of every connection in one queue.
            let mut d = match self.reads.try_lock() {
                Ok(d) => d,
                Err(TryLockError::Poisoned(d)) => d.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            if !d.continues(offset, len, slack) {
                if self.loads_queued.swap(false, Relaxed) {
                    lock(&self.queue).retain(|job| matches!(job, Job::WriteBack(_)));
                }
                return;
            }
            let behind = d.left_behind(bs, max, slack);
            // Never `clamp`: a read longer than half the bound would make it panic.
            d.window = (d.window * 2).max(len.max(bs) * 2).min(max.max(bs));
            let from = d.queued_until.max(d.next).next_multiple_of(bs);
            let to = (d.next + d.window).min(volume.geometry().size());
            let ahead = (from < to).then(|| {
                d.queued_until = to;
                from / bs..to.div_ceil(bs)
            });
            (behind, ahead)
        };
        if !behind.is_empty() {
            // A load still queued for a block the reader has passed (the reader was faster and
            // loaded it itself) would only bring back a block just demoted, maybe evicted.
            lock(&self.queue).retain(|job| !matches!(job, Job::Load(id) if behind.contains(&id.0)));
            volume.cache.demote(behind);
        }
        let Some(ahead) = ahead else { return };
        self.push(volume, ahead.map(|b| Job::Load(BlockId(b))));
        // After the push: a seek that comes between leaves these loads for the next seek to drop.
        self.loads_queued.store(true, Relaxed);
    }

    /// After a write of `len` bytes at `offset` of `volume`: if writes are sequential, queues the
    /// write-back of the whole blocks the stream has left behind.
    pub(crate) fn after_write(&self, volume: &Arc<Volume>, offset: u64, len: u64) {
        let Some(bs) = Self::block_size_if_useful(volume) else { return };
        let slack = REORDER * len;
        let (from, to) = {
            let mut d = lock(&self.writes);
            if !d.continues(offset, len, slack) || !d.moving_on(slack) {
                return;
            }
            // Blocks the stream's requests still in flight may write are left for later.
            let from = d.queued_until / bs;
            let to = d.next.saturating_sub(slack) / bs;
            if from >= to {
                return;
            }
            d.queued_until = to * bs;
            (from, to)
        };
        self.push(volume, (from..to).map(|b| Job::WriteBack(BlockId(b))));
    }

    /// The volume's block size, or `None` when its storage answers too fast for overlapping
    /// requests to gain anything (RAM).
    fn block_size_if_useful(volume: &Volume) -> Option<u64> {
        volume.capabilities.slow_requests.then(|| volume.geometry().block_size() as u64)
    }

    fn push(&self, volume: &Arc<Volume>, jobs: impl Iterator<Item = Job>) {
        self.workers.get_or_init(|| self.start_workers(Arc::downgrade(volume), volume.config.concurrency));
        let pushed = {
            let mut queue = lock(&self.queue);
            let before = queue.len();
            queue.extend(jobs);
            queue.len() - before
        };
        // One worker per job: waking every idle worker for one block sent all but one back to
        // sleep, two task switches each (about 5,000 per GiB of a cold 1M read, measured).
        for _ in 0..pushed.min(volume.config.concurrency) {
            self.queued.notify_one();
        }
    }

    fn start_workers(&self, volume: Weak<Volume>, n: usize) {
        for _ in 0..n {
            let (volume, failing) = (volume.clone(), volume.clone());
            let worker = move || loop {
                let Some(v) = volume.upgrade() else { return };
                let next = {
                    let queue = lock(&v.streams.queue);
                    let (mut queue, _) = v
                        .streams
                        .queued
                        .wait_timeout_while(queue, Duration::from_secs(1), |q| q.is_empty())
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    queue.pop_front()
                };
                // A failure leaves the block as it was (not loaded, or dirty for the next
                // write-back to retry); the request that needs it sees the error, if it recurs.
                match next {
                    Some(Job::Load(id)) => {
                        if let Err(e) = v.cache.prefetch(std::iter::once(id), 1) {
                            log::debug!("read-ahead of block {id} failed: {e}");
                        }
                    }
                    // A failed volume writes nothing more back (see `Volume`).
                    Some(Job::WriteBack(_)) if v.has_failed() => {}
                    Some(Job::WriteBack(id)) => {
                        if let Err(e) = v.cache.write_back(&[id], 1) {
                            log::debug!("write-behind of block {id} failed: {e}");
                        }
                    }
                    None => {}
                }
            };
            if let Err(e) = background::spawn("nbds3-streams", worker, move |what| Volume::fail(&failing, what)) {
                log::warn!("cannot start a read-ahead and write-behind worker: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Detector;

    #[test]
    fn requests_of_one_stream_may_arrive_out_of_order() {
        let mut d = Detector::default();
        assert!(!d.continues(0, 10, 40), "the first request starts a stream");
        assert!(d.continues(20, 10, 40), "a request ahead of one still in flight");
        assert!(d.continues(10, 10, 40), "the one that was in flight");
        assert_eq!(d.next, 30);
        assert!(!d.continues(1000, 10, 40), "a seek");
        assert_eq!((d.next, d.queued_until), (1010, 1000), "a new stream from there");
        assert!(!d.continues(900, 10, 40), "behind by more than the slack");
    }

    #[test]
    fn a_request_held_up_within_the_read_ahead_window_still_continues_the_stream() {
        let mut d = Detector::default();
        d.continues(0, 10, 40);
        d.window = 200;
        for at in (10..300).step_by(10) {
            assert!(d.continues(at, 10, 40), "sequential at {at}");
        }
        assert!(d.continues(150, 10, 40), "150 behind the head, within the window: late");
        assert_eq!((d.start, d.next), (0, 300), "the stream goes on from its head");
        assert!(!d.continues(50, 10, 40), "behind by more than the window: a seek");
    }

    #[test]
    fn a_stream_past_the_bound_leaves_blocks_behind_in_batches() {
        let mut d = Detector::default();
        d.continues(0, 10, 40);
        for at in (10..500).step_by(10) {
            d.continues(at, 10, 40);
            if d.next <= 400 {
                assert_eq!(d.left_behind(10, 400, 40), 0..0, "not past the bound at {at}");
            }
        }
        assert_eq!(d.left_behind(10, 400, 40), 0..46, "from the start to the slack behind the head");
        d.continues(500, 10, 40);
        assert_eq!(d.left_behind(10, 400, 40), 0..0, "one block more is not a batch");
        for at in (510..700).step_by(10) {
            d.continues(at, 10, 40);
        }
        assert_eq!(d.left_behind(10, 400, 40), 46..66);
    }

    #[test]
    fn a_stream_moves_on_once_it_spans_twice_the_slack_without_rewriting() {
        let mut d = Detector::default();
        for at in (0..80).step_by(10) {
            d.continues(at, 10, 40);
        }
        assert!(d.moving_on(40), "80 bytes written once each");
        let mut d = Detector::default();
        for at in [0, 20, 10, 30, 20, 40, 30, 50, 40, 60, 50, 70, 60, 80] {
            d.continues(at, 10, 40);
        }
        assert!(!d.moving_on(40), "90 bytes spanned, 140 written: requests around one place");
    }
}
