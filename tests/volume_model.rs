//! Model-based tests of the `Volume`: thousands of random unaligned reads, writes, zeroes and
//! flushes against a plain `Vec<u8>`, on every local backend, with a tiny cache so evictions and
//! early write-backs happen all the time, and with injected storage faults. Half of the
//! operations go on from where the last one ended, so read-ahead and write-behind workers run
//! alongside.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use nbds3::storage::faulty::FaultyStorage;
use nbds3::storage::{DirObjects, MemoryStorage, PlainStorage, Storage};
use nbds3::{ExportName, Geometry, Volume, VolumeConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: usize = 512;
const BLOCKS: u64 = 64;
const SIZE: u64 = BLOCKS * BS as u64;

fn small_cache() -> VolumeConfig {
    VolumeConfig { cache_bytes: 4 * BS as u64, max_dirty_bytes: 6 * BS as u64, concurrency: 3, writeback_delay: None }
}

/// A random range: half the time starting where `last` (the previous range) ended.
fn random_range(rng: &mut StdRng, last: &mut u64) -> (u64, usize) {
    let offset = if rng.random_bool(0.5) && *last < SIZE { *last } else { rng.random_range(0..SIZE) };
    let max = (SIZE - offset).min(5 * BS as u64) as usize;
    let len = if rng.random_bool(0.2) { (BS - (offset as usize % BS)).min(max) } else { rng.random_range(0..=max) };
    *last = offset + len as u64;
    (offset, len)
}

/// Runs `ops` random operations on a volume over `storage`, checking every read against the model.
fn run_model(storage: Arc<dyn Storage>, seed: u64, ops: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let volume = Arc::new(Volume::new(storage, Geometry::new(SIZE, BS).unwrap(), small_cache()).unwrap());
    let mut model = vec![0u8; SIZE as usize];
    let mut last = 0;
    for step in 0..ops {
        let (offset, len) = random_range(&mut rng, &mut last);
        let range = offset as usize..offset as usize + len;
        match rng.random_range(0..10) {
            0..=3 => {
                let fill: u8 = if rng.random_bool(0.2) { 0 } else { rng.random() };
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8 % 3)).collect();
                volume.write_sequentially(&data, offset, rng.random_bool(0.1)).unwrap();
                model[range].copy_from_slice(&data);
            }
            4 => {
                volume.zero(len as u64, offset, rng.random_bool(0.1), false).unwrap();
                model[range].fill(0);
            }
            5 => volume.flush().unwrap(),
            _ => {
                let mut buf = vec![0xee; len];
                volume.read_sequentially(&mut buf, offset).unwrap();
                assert!(buf == model[range], "seed {seed} step {step}: read of {len} at {offset} differs");
            }
        }
    }
    volume.flush().unwrap();
    let mut all = vec![0; SIZE as usize];
    volume.read(&mut all, 0).unwrap();
    assert!(all == model, "seed {seed}: final contents differ");
    model
}

#[test]
fn memory_backend_matches_the_model() {
    for seed in 0..8 {
        run_model(Arc::new(MemoryStorage::new(BS)), seed, 1500);
    }
}

#[test]
fn file_backend_matches_the_model_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let export = ExportName::new("model").unwrap();
    let model =
        run_model(Arc::new(PlainStorage::new(Arc::new(DirObjects::new(dir.path()).unwrap()), &export, BS)), 100, 1500);
    // A fresh volume on the same directory sees exactly what the last one flushed.
    let again = Volume::new(
        Arc::new(PlainStorage::new(Arc::new(DirObjects::new(dir.path()).unwrap()), &export, BS)),
        Geometry::new(SIZE, BS).unwrap(),
        small_cache(),
    )
    .unwrap();
    let mut all = vec![0u8; SIZE as usize];
    again.read(&mut all, 0).unwrap();
    assert!(all == model, "the reopened device differs from the model");
    assert!(model.iter().any(|&b| b != 0));
}

/// With storage failing one call in `n`, operations may fail, but nothing that a successful flush
/// covered is ever lost or mixed up: after faults stop and a final flush succeeds, a new volume on
/// the same storage reads exactly what a model of the successful writes says.
#[test]
fn storage_faults_surface_as_errors_and_never_corrupt_flushed_data() {
    for seed in 0..6 {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let storage = Arc::new(FaultyStorage::new(MemoryStorage::new(BS)));
        storage.fail_one_in.store(rng.random_range(3..9), Relaxed);
        let volume = Arc::new(Volume::new(storage.clone(), Geometry::new(SIZE, BS).unwrap(), small_cache()).unwrap());
        // Bytes a failed write may or may not have changed, until the next successful write there.
        let mut model = vec![0u8; SIZE as usize];
        let mut uncertain = vec![false; SIZE as usize];
        let mut errors = 0;
        let mut last = 0;
        for step in 0..1500 {
            let (offset, len) = random_range(&mut rng, &mut last);
            let range = offset as usize..offset as usize + len;
            match rng.random_range(0..6) {
                0..=2 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    let ok = volume.write_sequentially(&data, offset, rng.random_bool(0.1)).is_ok();
                    model[range.clone()].copy_from_slice(&data);
                    uncertain[range].fill(!ok);
                    errors += usize::from(!ok);
                }
                3 => errors += usize::from(volume.flush().is_err()),
                _ => {
                    let mut buf = vec![0; len];
                    if volume.read_sequentially(&mut buf, offset).is_ok() {
                        for (i, b) in buf.iter().enumerate() {
                            let at = offset as usize + i;
                            assert!(uncertain[at] || *b == model[at], "seed {seed} step {step}: byte {at}");
                        }
                    } else {
                        errors += 1;
                    }
                }
            }
        }
        assert!(errors > 0, "seed {seed}: no fault was injected");
        storage.fail_one_in.store(0, Relaxed);
        volume.flush().unwrap();
        let reopened = Volume::new(storage.clone(), Geometry::new(SIZE, BS).unwrap(), small_cache()).unwrap();
        let mut all = vec![0; SIZE as usize];
        reopened.read(&mut all, 0).unwrap();
        for at in 0..SIZE as usize {
            assert!(uncertain[at] || all[at] == model[at], "seed {seed}: byte {at} lost after the final flush");
        }
    }
}
