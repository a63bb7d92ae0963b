//! Unit tests of the `Volume` over counted, fault-injecting memory storage.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::*;
use crate::storage::faulty::FaultyStorage;
use crate::storage::MemoryStorage;
use crate::storage::{BlockBuf, BlockId, Capabilities};

const BS: usize = 4096;

fn volume(blocks: u64, config: VolumeConfig) -> (Volume, Arc<FaultyStorage<MemoryStorage>>) {
    stored_volume(blocks, config, &[])
}

/// A volume over storage that already holds block `id` filled with `byte`, for each pair.
fn stored_volume(
    blocks: u64,
    config: VolumeConfig,
    stored: &[(u64, u8)],
) -> (Volume, Arc<FaultyStorage<MemoryStorage>>) {
    volume_on(FaultyStorage::new(MemoryStorage::new(BS)), blocks, config, stored)
}

/// As [`stored_volume`], over RAM posing as a remote store: sequential reads are read ahead and
/// sequential writes written behind.
fn remote_volume(
    blocks: u64,
    config: VolumeConfig,
    stored: &[(u64, u8)],
) -> (Volume, Arc<FaultyStorage<MemoryStorage>>) {
    volume_on(FaultyStorage::new(MemoryStorage::new(BS)).posing_as(Capabilities::REMOTE), blocks, config, stored)
}

fn volume_on(
    storage: FaultyStorage<MemoryStorage>,
    blocks: u64,
    config: VolumeConfig,
    stored: &[(u64, u8)],
) -> (Volume, Arc<FaultyStorage<MemoryStorage>>) {
    let storage = Arc::new(storage);
    for &(id, byte) in stored {
        storage.inner().write_block(BlockId(id), &[byte; BS]).unwrap();
    }
    let v = Volume::new(storage.clone(), Geometry::new(blocks * BS as u64, BS).unwrap(), config).unwrap();
    (v, storage)
}

fn roomy() -> VolumeConfig {
    VolumeConfig { cache_bytes: 1 << 20, max_dirty_bytes: 1 << 20, concurrency: 4, writeback_delay: None }
}

fn stored(s: &FaultyStorage<MemoryStorage>, id: u64) -> Option<Vec<u8>> {
    let mut buf = BlockBuf::zeroed(BS);
    s.inner().read_block(BlockId(id), &mut buf).unwrap().then(|| buf.to_vec())
}

#[test]
fn writes_stay_in_memory_until_flush() {
    let (v, s) = volume(16, roomy());
    v.write(&[7; 100], 5000, false).unwrap();
    assert_eq!(stored(&s, 1), None, "written before flush");
    let mut buf = [0; 100];
    v.read(&mut buf, 5000).unwrap();
    assert_eq!(buf, [7; 100], "a dirty block reads back");
    v.flush().unwrap();
    let block = stored(&s, 1).expect("flushed");
    assert_eq!(&block[904..1004], &[7; 100][..]);
    assert_eq!(s.flushes.load(Relaxed), 1);
}

#[test]
fn fua_writes_are_durable_before_they_return() {
    let (v, s) = volume(16, roomy());
    v.write(&[1; BS], 0, false).unwrap();
    v.write(&[9; 10], 3 * BS as u64, true).unwrap();
    assert!(stored(&s, 3).is_some(), "the FUA block");
    assert_eq!(stored(&s, 0), None, "FUA flushes only its own blocks");
    assert_eq!(s.flushes.load(Relaxed), 1);
}

#[test]
fn reads_span_blocks_and_see_dirty_clean_and_stored_data() {
    let (v, _) = stored_volume(16, roomy(), &[(2, 2)]);
    v.write(&[1; BS], BS as u64, false).unwrap();
    let mut buf = vec![0; 3 * BS];
    v.read(&mut buf, 0).unwrap();
    assert_eq!(&buf[..BS], &[0; BS][..], "never written");
    assert_eq!(&buf[BS..2 * BS], &[1; BS][..], "dirty");
    assert_eq!(&buf[2 * BS..], &[2; BS][..], "only in storage");
}

#[test]
fn a_whole_block_write_never_reads_storage() {
    let (v, s) = volume(16, roomy());
    v.write(&[3; 2 * BS], 0, false).unwrap();
    assert_eq!(s.reads.load(Relaxed), 0);
    v.write(&[3; 10], 5 * BS as u64, false).unwrap();
    assert_eq!(s.reads.load(Relaxed), 0, "a partial write over a hole reads nothing");
    v.flush().unwrap();
    let (v, s) = stored_volume(16, roomy(), &[(5, 9)]);
    v.write(&[3; 10], 5 * BS as u64, false).unwrap();
    v.write(&[4; 10], 5 * BS as u64 + 100, false).unwrap();
    let mut buf = [0; 10];
    v.read(&mut buf, 5 * BS as u64 + 100).unwrap();
    assert_eq!(buf, [4; 10], "a read of written bytes needs no storage read");
    assert_eq!(s.reads.load(Relaxed), 0, "partial writes over a stored block read nothing yet");
    v.flush().unwrap();
    assert_eq!(s.reads.load(Relaxed), 1, "write-back completes the block with one read");
    assert_eq!(v.cache().stats.read_modify_writes.load(Relaxed), 1);
    let block = stored(&s, 5).unwrap();
    assert_eq!(
        (&block[..10], &block[10..100], &block[100..110], &block[110..]),
        (&[3; 10][..], &[9; 90][..], &[4; 10][..], &[9; BS - 110][..])
    );
}

#[test]
fn a_read_of_unwritten_bytes_completes_a_partial_block() {
    let (v, s) = stored_volume(16, roomy(), &[(2, 7)]);
    v.write(&[1; 100], 2 * BS as u64 + 50, false).unwrap();
    let mut buf = vec![0; 200];
    v.read(&mut buf, 2 * BS as u64).unwrap();
    assert_eq!((&buf[..50], &buf[50..150], &buf[150..]), (&[7; 50][..], &[1; 100][..], &[7; 50][..]));
    assert_eq!(s.reads.load(Relaxed), 1);
    v.write(&[2; 10], 2 * BS as u64, false).unwrap();
    v.flush().unwrap();
    assert_eq!(s.reads.load(Relaxed), 1, "completed once");
}

#[test]
fn holes_cost_no_requests_and_show_in_extents() {
    let (v, s) = stored_volume(1 << 20, roomy(), &[(3, 1), (4, 1), (9, 1)]);
    let mut buf = vec![1; 64 * BS];
    v.read(&mut buf, 0).unwrap();
    assert_eq!(s.reads.load(Relaxed), 3, "only stored blocks are read");
    v.write(&[2; 10], 20 * BS as u64, false).unwrap();
    let bs = BS as u64;
    assert_eq!(
        v.extents(30 * bs, 2 * bs + 100).unwrap(),
        vec![
            (2 * bs + 100, bs - 100, false),
            (3 * bs, 2 * bs, true),
            (5 * bs, 4 * bs, false),
            (9 * bs, bs, true),
            (10 * bs, 10 * bs, false),
            (20 * bs, bs, true),
            (21 * bs, 11 * bs + 100, false),
        ]
    );
    assert_eq!(v.extents(bs, (1 << 20) * bs - bs).unwrap().last(), Some(&((1 << 20) * bs - bs, bs, false)));
}

#[test]
fn trimming_a_huge_device_costs_requests_per_stored_block_only() {
    let stored: Vec<(u64, u8)> = (0..2500).map(|b| (b * 1000, 7)).collect();
    let (v, s) = stored_volume(1 << 30, roomy(), &stored);
    let size = v.geometry().size();
    v.zero(size, 0, false, true).unwrap();
    assert_eq!(s.reads.load(Relaxed), 0);
    assert_eq!(s.writes.load(Relaxed), 0);
    assert_eq!(s.inner().list_blocks().unwrap(), vec![], "large trims delete while they run");
    assert_eq!(s.deletes.load(Relaxed), 2500);
    v.flush().unwrap();
    assert_eq!(v.extents(size.min(u32::MAX as u64), 0).unwrap(), vec![(0, size.min(u32::MAX as u64), false)]);
}

#[test]
fn zeros_over_a_stored_block_delete_it() {
    let (v, s) = volume(16, roomy());
    v.write(&[5; BS], 0, false).unwrap();
    v.write(&[5; 20], BS as u64 + 100, false).unwrap();
    v.flush().unwrap();
    assert!(stored(&s, 0).is_some() && stored(&s, 1).is_some());
    v.write(&[0; BS], 0, false).unwrap();
    v.write(&[0; 20], BS as u64 + 100, false).unwrap();
    v.flush().unwrap();
    assert_eq!(s.inner().list_blocks().unwrap(), vec![], "all-zero blocks are deleted, never stored");
    assert_eq!(s.writes.load(Relaxed), 2, "zeros were never PUT");
}

#[test]
fn zero_drops_whole_blocks_without_reading_and_rmw_the_edges() {
    let (v, s) = stored_volume(16, roomy(), &[(0, 1), (1, 2), (2, 3), (3, 4)]);
    v.zero(2 * BS as u64, BS as u64, false, false).unwrap();
    assert_eq!(s.reads.load(Relaxed), 0);
    v.zero(10, 10, false, false).unwrap();
    v.flush().unwrap();
    assert_eq!(s.inner().list_blocks().unwrap(), vec![BlockId(0), BlockId(3)]);
    let mut buf = vec![0xff; 30];
    v.read(&mut buf, 0).unwrap();
    assert_eq!(&buf[..10], &[1; 10]);
    assert_eq!(&buf[10..20], &[0; 10]);
    assert_eq!(&buf[20..], &[1; 10]);
}

#[test]
fn fast_zero_refuses_partial_blocks_without_touching_anything() {
    let (v, s) = volume(16, roomy());
    v.write(&[4; BS], 0, false).unwrap();
    let e = v.zero(100, 10, false, true).unwrap_err();
    assert!(matches!(e, Error::FastZeroUnsupported));
    let mut buf = vec![0; BS];
    v.read(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![4; BS]);
    v.zero(BS as u64, 0, false, true).unwrap();
    v.read(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0; BS]);
    assert_eq!(s.reads.load(Relaxed), 0);
}

#[test]
fn out_of_range_requests_fail() {
    let (v, _) = volume(4, roomy());
    assert!(matches!(v.read(&mut [0; 2], 4 * BS as u64 - 1), Err(Error::OutOfRange { .. })));
    assert!(matches!(v.write(&[0; 1], 4 * BS as u64, false), Err(Error::OutOfRange { .. })));
    assert!(matches!(v.zero(1, u64::MAX, false, false), Err(Error::OutOfRange { .. })));
    v.read(&mut [], 4 * BS as u64).unwrap();
}

/// Many threads write disjoint byte ranges of one block at once; every range must survive.
/// (s3backer and nbdkit's S3 plugin both once lost updates here.)
#[test]
fn concurrent_partial_writes_to_one_block_lose_nothing() {
    for round in 0..20 {
        let config = VolumeConfig { cache_bytes: 0, max_dirty_bytes: BS as u64, concurrency: 2, writeback_delay: None };
        let (v, s) = stored_volume(4, config, &[(1, 0xaa)]);
        let chunk = BS / 32;
        std::thread::scope(|scope| {
            for t in 0..32 {
                let v = &v;
                scope.spawn(move || {
                    let offset = (BS + t * chunk) as u64;
                    v.write(&vec![t as u8; chunk], offset, t % 7 == 0).unwrap();
                });
            }
        });
        v.flush().unwrap();
        let block = stored(&s, 1).unwrap();
        for t in 0..32 {
            assert!(block[t * chunk..(t + 1) * chunk].iter().all(|&b| b == t as u8), "round {round} range {t}");
        }
    }
}

#[test]
fn clean_cache_is_bounded() {
    let all: Vec<(u64, u8)> = (0..64).map(|b| (b, b as u8 + 1)).collect();
    let (v, s) = stored_volume(
        64,
        VolumeConfig { cache_bytes: 8 * BS as u64, max_dirty_bytes: 1 << 20, concurrency: 1, writeback_delay: None },
        &all,
    );
    let mut buf = vec![0; BS];
    for b in 0..64 {
        v.read(&mut buf, b * BS as u64).unwrap();
        assert_eq!(buf[0], b as u8 + 1);
        assert!(v.cache().clean_blocks() <= 8, "{} clean blocks", v.cache().clean_blocks());
    }
    let reads = s.reads.load(Relaxed);
    v.read(&mut buf, 63 * BS as u64).unwrap();
    assert_eq!(s.reads.load(Relaxed), reads, "the most recent block is still cached");
    v.read(&mut buf, 0).unwrap();
    assert_eq!(s.reads.load(Relaxed), reads + 1, "the oldest was evicted");
}

#[test]
fn a_block_read_again_outlives_older_ones() {
    // Blocks 32 apart, so that no read looks sequential and none is read ahead.
    let at = |i: u64| i * 32 * BS as u64;
    let all: Vec<(u64, u8)> = (0..16).map(|i| (i * 32, i as u8 + 1)).collect();
    let (v, s) = stored_volume(
        16 * 32,
        VolumeConfig { cache_bytes: 8 * BS as u64, max_dirty_bytes: 1 << 20, concurrency: 1, writeback_delay: None },
        &all,
    );
    let mut buf = vec![0; BS];
    for i in 0..8 {
        v.read(&mut buf, at(i)).unwrap();
    }
    v.read(&mut buf, at(0)).unwrap();
    for i in 8..12 {
        v.read(&mut buf, at(i)).unwrap();
    }
    let reads = s.reads.load(Relaxed);
    v.read(&mut buf, at(0)).unwrap();
    assert_eq!(buf[0], 1);
    assert_eq!(s.reads.load(Relaxed), reads, "the first block, read again, is still cached");
    v.read(&mut buf, at(1)).unwrap();
    assert_eq!(buf[0], 2);
    assert_eq!(s.reads.load(Relaxed), reads + 1, "the second, read once before that, was evicted");
    assert!(v.cache().clean_blocks() <= 8, "{} clean blocks", v.cache().clean_blocks());
}

#[test]
fn dirty_data_is_bounded_by_early_write_back() {
    let (v, s) = volume(
        256,
        VolumeConfig { cache_bytes: 0, max_dirty_bytes: 16 * BS as u64, concurrency: 4, writeback_delay: None },
    );
    for b in 0..256u64 {
        v.write(&[b as u8 | 1; BS], b * BS as u64, false).unwrap();
        // The limit is checked before a write, so the write in flight may pass it by its size.
        assert!(v.cache().dirty_blocks() <= 17, "{} dirty blocks", v.cache().dirty_blocks());
    }
    assert!(s.writes.load(Relaxed) >= 239, "the oldest blocks were written back early");
    v.flush().unwrap();
    assert_eq!(s.inner().list_blocks().unwrap().len(), 256);
    assert_eq!(s.writes.load(Relaxed), 256, "exactly one PUT per dirty block");
}

#[test]
fn a_failed_flush_keeps_data_dirty_for_the_next_one() {
    let (v, s) = volume(16, roomy());
    v.write(&[8; 3 * BS], 0, false).unwrap();
    s.fail_writes.store(true, Relaxed);
    assert!(v.flush().is_err());
    assert_eq!(v.cache().dirty_blocks(), 3);
    let mut buf = vec![0; 3 * BS];
    v.read(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![8; 3 * BS], "still readable while storage fails");
    s.fail_writes.store(false, Relaxed);
    v.flush().unwrap();
    assert_eq!(s.inner().list_blocks().unwrap().len(), 3);
    assert_eq!(v.cache().dirty_blocks(), 0);
}

#[test]
fn a_failed_read_is_an_error_and_is_retried_next_time() {
    let (v, s) = stored_volume(16, roomy(), &[(0, 6)]);
    s.fail_reads.store(true, Relaxed);
    assert!(v.read(&mut [0; 10], 0).is_err());
    v.write(&[1; 10], 0, false).unwrap();
    assert!(v.flush().is_err(), "write-back cannot complete the partial block without its bytes");
    s.fail_reads.store(false, Relaxed);
    let mut buf = [0; 20];
    v.read(&mut buf, 0).unwrap();
    assert_eq!((&buf[..10], &buf[10..]), (&[1; 10][..], &[6; 10][..]));
    v.flush().unwrap();
}

#[test]
fn storage_with_another_block_size_is_refused() {
    let storage = Arc::new(MemoryStorage::new(512));
    let e = Volume::new(storage, Geometry::new(1 << 20, BS).unwrap(), roomy()).unwrap_err();
    assert!(e.to_string().starts_with("block-size: "), "{e}");
}

#[test]
fn sequential_reads_load_ahead_in_the_background() {
    let stored: Vec<(u64, u8)> = (0..256).map(|b| (b, 5)).collect();
    let (v, s) = remote_volume(256, roomy(), &stored);
    let v = Arc::new(v);
    let mut buf = vec![0; BS];
    v.read_sequentially(&mut buf, 0).unwrap();
    v.read_sequentially(&mut buf, BS as u64).unwrap();
    v.read_sequentially(&mut buf, 2 * BS as u64).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.reads.load(Relaxed) < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(s.reads.load(Relaxed) >= 4, "{} blocks read for 3 sequential reads", s.reads.load(Relaxed));
    // The workers go on through the window; wait until they are done.
    let before = settled_reads(&s);
    v.read(&mut buf, 3 * BS as u64).unwrap();
    assert_eq!(s.reads.load(Relaxed), before, "the next block was already loaded");
    assert_eq!(buf, vec![5; BS]);
    // A random read resets the window: nothing more is loaded.
    v.read_sequentially(&mut buf, 200 * BS as u64).unwrap();
    assert_eq!(s.reads.load(Relaxed), before + 1);
}

/// What storage is, not the request concurrency, decides read-ahead and sliced listing: S3 at
/// `s3-concurrency=1` reads ahead (it used to not), RAM does neither at any concurrency.
#[test]
fn read_ahead_and_sliced_listing_follow_what_storage_is_not_the_concurrency() {
    // Waits up to `wait` for reads past the four asked for.
    let lists_and_reads = |(v, s): (Volume, Arc<FaultyStorage<MemoryStorage>>), wait| {
        let v = Arc::new(v);
        let mut buf = vec![0; BS];
        for b in 0..4 {
            v.read_sequentially(&mut buf, b * BS as u64).unwrap();
        }
        let deadline = std::time::Instant::now() + wait;
        while s.reads.load(Relaxed) <= 4 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let lists = v.counters().into_iter().find(|(name, _)| *name == "lists").unwrap().1;
        (lists, s.reads.load(Relaxed))
    };
    let stored: Vec<(u64, u8)> = (0..64).map(|b| (b, 5)).collect();
    let one_at_a_time = VolumeConfig { concurrency: 1, ..roomy() };
    let (lists, reads) = lists_and_reads(remote_volume(64, one_at_a_time, &stored), Duration::from_secs(5));
    assert_eq!(lists, 8, "a remote store is listed in slices");
    assert!(reads > 4, "a remote store is read ahead of a sequential reader: {reads} blocks read");
    let many_at_a_time = VolumeConfig { concurrency: 16, ..roomy() };
    let (lists, reads) = lists_and_reads(stored_volume(64, many_at_a_time, &stored), Duration::from_millis(200));
    assert_eq!((lists, reads), (1, 4), "RAM is listed at once and never read ahead");
}

#[test]
fn sequential_reads_longer_than_the_read_ahead_bound_are_served() {
    // A 4-block cache bounds read-ahead to one block; each read is 8 (this used to panic).
    let config =
        VolumeConfig { cache_bytes: 4 * BS as u64, max_dirty_bytes: 1 << 20, concurrency: 4, writeback_delay: None };
    let (v, _) = remote_volume(64, config, &[(9, 2), (20, 3)]);
    let v = Arc::new(v);
    let mut buf = vec![0; 8 * BS];
    for i in 0..4u64 {
        v.read_sequentially(&mut buf, i * 8 * BS as u64).unwrap();
    }
    v.read_sequentially(&mut buf, 16 * BS as u64).unwrap();
    assert_eq!((buf[0], buf[4 * BS], buf[5 * BS]), (0, 3, 0));
}

/// Waits until the read-ahead workers of `s`'s volume have stopped reading, and returns how many
/// blocks were read.
fn settled_reads(s: &FaultyStorage<MemoryStorage>) -> u64 {
    let mut before = s.reads.load(Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = s.reads.load(Relaxed);
        if now == before {
            return now;
        }
        before = now;
    }
}

#[test]
fn a_long_sequential_read_leaves_the_blocks_cached_before_it() {
    // A 128-block cache (read-ahead bound: 32 blocks), 16 blocks in use, then a scan of eight
    // times the cache.
    let hot = 2000..2016u64;
    let byte = |b: u64| (b % 250) as u8 + 1;
    let stored: Vec<(u64, u8)> = (0..1024).chain(hot.clone()).map(|b| (b, byte(b))).collect();
    let config =
        VolumeConfig { cache_bytes: 128 * BS as u64, max_dirty_bytes: 1 << 20, concurrency: 4, writeback_delay: None };
    let (v, s) = remote_volume(2048, config, &stored);
    let v = Arc::new(v);
    let mut buf = vec![0; BS];
    for b in hot.clone() {
        v.read(&mut buf, b * BS as u64).unwrap();
    }
    for b in 0..1024 {
        v.read_sequentially(&mut buf, b * BS as u64).unwrap();
        assert_eq!(buf[0], byte(b));
    }
    assert!(v.cache().clean_blocks() <= 128, "{} clean blocks", v.cache().clean_blocks());
    let reads = settled_reads(&s);
    for b in hot {
        v.read(&mut buf, b * BS as u64).unwrap();
        assert_eq!(buf[0], byte(b));
    }
    assert_eq!(s.reads.load(Relaxed) - reads, 0, "blocks read from storage again after the scan");
}

#[test]
fn a_region_read_once_sequentially_stays_cached_while_it_fits() {
    // 96 blocks, three times the read-ahead bound, into a 128-block cache.
    let stored: Vec<(u64, u8)> = (0..96).map(|b| (b, b as u8 + 1)).collect();
    let config =
        VolumeConfig { cache_bytes: 128 * BS as u64, max_dirty_bytes: 1 << 20, concurrency: 4, writeback_delay: None };
    let (v, s) = remote_volume(256, config, &stored);
    let v = Arc::new(v);
    let mut buf = vec![0; BS];
    for b in 0..96 {
        v.read_sequentially(&mut buf, b * BS as u64).unwrap();
    }
    let reads = settled_reads(&s);
    for b in (0..96).rev() {
        v.read(&mut buf, b * BS as u64).unwrap();
        assert_eq!(buf[0], b as u8 + 1);
    }
    assert_eq!(s.reads.load(Relaxed) - reads, 0, "blocks of the warmed-up region read from storage again");
}

#[test]
fn sequential_writes_are_written_back_behind_the_writer_and_random_ones_wait_for_flush() {
    let (v, s) = remote_volume(256, roomy(), &[]);
    let v = Arc::new(v);
    for b in [200u64, 90, 170, 240, 130] {
        v.write_sequentially(&[3; BS], b * BS as u64, false).unwrap();
    }
    for b in 0..64u64 {
        v.write_sequentially(&[b as u8 | 1; BS], b * BS as u64, false).unwrap();
    }
    // All but the last 16 blocks (the requests a client may still have in flight) are behind
    // the writer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.writes.load(Relaxed) < 48 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(s.writes.load(Relaxed), 48, "blocks written back before any FLUSH");
    assert_eq!(v.cache().dirty_blocks(), 16 + 5, "the stream's head and the random writes");
    v.flush().unwrap();
    assert_eq!(s.writes.load(Relaxed), 64 + 5, "one PUT per block");
}

#[test]
fn rewriting_dirty_blocks_at_the_limit_writes_nothing_back() {
    let config = VolumeConfig { cache_bytes: 0, max_dirty_bytes: 8 * BS as u64, concurrency: 2, writeback_delay: None };
    let (v, s) = volume(64, config);
    v.write(&vec![1; 8 * BS], 0, false).unwrap();
    for round in 0..50u64 {
        v.write(&[round as u8 | 1; 100], (round % 8) * BS as u64 + 7, false).unwrap();
    }
    assert_eq!(s.writes.load(Relaxed), 0, "a full dirty set that is only rewritten stays in memory");
}

#[test]
fn partial_writes_count_only_their_pages_against_max_dirty() {
    const BIG: usize = 64 * 1024;
    let storage = Arc::new(FaultyStorage::new(MemoryStorage::new(BIG)));
    for id in 0..32 {
        storage.inner().write_block(BlockId(id), &[1; BIG]).unwrap();
    }
    let config = VolumeConfig { cache_bytes: 0, max_dirty_bytes: 16 * 4096, concurrency: 2, writeback_delay: None };
    let v = Volume::new(storage.clone(), Geometry::new(32 * BIG as u64, BIG).unwrap(), config).unwrap();
    for id in 0..10u64 {
        v.write(&[2; 4096], id * BIG as u64 + 8192, false).unwrap();
    }
    assert_eq!(v.cache().dirty_bytes(), 10 * 4096);
    assert_eq!((storage.reads.load(Relaxed), storage.writes.load(Relaxed)), (0, 0), "nothing written back yet");
    v.flush().unwrap();
    assert_eq!(v.cache().dirty_bytes(), 0);
    assert_eq!((storage.reads.load(Relaxed), storage.writes.load(Relaxed)), (10, 10));
    let mut buf = vec![0; BIG];
    v.read(&mut buf, 3 * BIG as u64).unwrap();
    assert_eq!(
        (&buf[..8192], &buf[8192..12288], &buf[12288..]),
        (&[1; 8192][..], &[2; 4096][..], &[1; BIG - 12288][..])
    );
}

/// Polls `op` (at most 5 s) until it fails, and returns its error.
fn first_error(op: impl Fn() -> Result<()>) -> Error {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match op() {
            Err(e) => return e,
            Ok(()) => assert!(std::time::Instant::now() < deadline, "still no error"),
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What a client of a volume whose background thread panicked sees: writes, zeroes and FLUSH fail
/// with EIO naming the thread and the panic (`died`, up to the block it names), reads go on (of
/// block `readable`, filled with `expected` and never stored), and the log says it once at error
/// level.
fn assert_failed_by(v: &Volume, died: &str, readable: u64, expected: u8) {
    let e = first_error(|| v.write(&[6; BS], 15 * BS as u64, false));
    assert_eq!(e.errno(), libc::EIO);
    let message = e.to_string();
    assert!(message.starts_with(&format!("FaultyStorage(MemoryStorage): {died}")), "{message}");
    assert!(message.ends_with("; writes and FLUSH fail until nbdkit restarts"), "{message}");
    assert_eq!(v.flush().unwrap_err().to_string(), message);
    assert_eq!(v.zero(BS as u64, 0, false, false).unwrap_err().to_string(), message);
    let mut buf = vec![0; BS];
    v.read(&mut buf, readable * BS as u64).unwrap();
    assert!(buf.iter().all(|&b| b == expected), "block {readable}, dirty, reads back as written");
    let logged = crate::background::captured_log::lines_with(died);
    assert_eq!(logged.len(), 1, "{logged:?}");
    let what = message.split("; ").next().unwrap();
    assert!(logged[0].starts_with(&format!("ERROR {what}; writes and FLUSH fail with EIO")), "{logged:?}");
}

#[test]
fn a_panic_in_the_background_writer_fails_writes_and_flush_but_not_reads() {
    crate::background::captured_log::start();
    let config = VolumeConfig { writeback_delay: Some(std::time::Duration::from_millis(20)), ..roomy() };
    let (v, s) = volume(16, config);
    let v = Arc::new(v);
    v.write(&[4; BS], 3 * BS as u64, false).unwrap();
    s.panic_instead.store(true, Relaxed);
    s.fail_writes.store(true, Relaxed);
    v.start_background_writer();
    // Block 3, or the block the first probing write dirtied, whichever the writer tries first.
    assert_failed_by(&v, "thread nbds3-writeback panicked: injected panic in write of block ", 3, 4);
}

#[test]
fn a_panic_in_a_stream_worker_fails_writes_and_flush_but_not_reads() {
    crate::background::captured_log::start();
    let (v, s) = remote_volume(256, roomy(), &[]);
    let v = Arc::new(v);
    s.panic_instead.store(true, Relaxed);
    s.fail_writes.store(true, Relaxed);
    // Blocks 100.. are written behind the writer by the stream workers, which panic on the
    // first they take (each worker on its own block; only the first death is said).
    for b in 100..164u64 {
        if v.write_sequentially(&[b as u8; BS], b * BS as u64, false).is_err() {
            break;
        }
    }
    assert_failed_by(&v, "thread nbds3-streams panicked: injected panic in write of block ", 100, 100);
}
