//! The `Volume` over a `cas` store: random unaligned reads, writes, zeroes and flushes against a
//! `Vec<u8>` model, with a tiny block cache and tiny map limits so write-back, trims (which list
//! the map) and early page stores happen all the time; then a new volume on a new store reads
//! the last flushed state.

use std::sync::Arc;

use nbds3::storage::cas::{CasConfig, CasStorage};
use nbds3::storage::objects::MemoryObjects;
use nbds3::{ExportName, Geometry, Volume, VolumeConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: usize = 512;
/// Spans two map levels (1024 blocks a leaf), so pages split and the map grows.
const SIZE: u64 = 3000 * BS as u64;

fn volume(store: &Arc<MemoryObjects>, export: &ExportName) -> Volume {
    let config = CasConfig { cached_pages: 2, max_dirty_pages: 2, ..CasConfig::default() };
    let storage = Arc::new(CasStorage::open(store.clone(), export, BS, config).expect("open"));
    let cache = VolumeConfig {
        cache_bytes: 4 * BS as u64,
        max_dirty_bytes: 6 * BS as u64,
        concurrency: 3,
        writeback_delay: None,
    };
    Volume::new(storage, Geometry::new(SIZE, BS).expect("geometry"), cache).expect("volume")
}

#[test]
fn random_io_matches_the_model_and_survives_reopen() {
    for seed in 0..4 {
        let mut rng = StdRng::seed_from_u64(seed);
        let store = Arc::new(MemoryObjects::default());
        let export = ExportName::new("model").unwrap();
        let v = volume(&store, &export);
        let mut model = vec![0u8; SIZE as usize];
        let mut flushed = model.clone();
        for step in 0..1500 {
            let offset = rng.random_range(0..SIZE);
            let len = rng.random_range(0..=(SIZE - offset).min(6 * BS as u64)) as usize;
            let range = offset as usize..offset as usize + len;
            match rng.random_range(0..10) {
                0..=3 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.random_range(0..4u8)).collect();
                    // No FUA: a FUA write commits whatever was written back by then, which the model cannot tell.
                    v.write(&data, offset, false).expect("write");
                    model[range].copy_from_slice(&data);
                }
                4 => {
                    v.zero(len as u64, offset, false, false).expect("zero");
                    model[range].fill(0);
                }
                5 => {
                    v.flush().expect("flush");
                    flushed.clone_from(&model);
                }
                _ => {
                    let mut buf = vec![0xee; len];
                    v.read(&mut buf, offset).expect("read");
                    assert!(buf == model[range], "seed {seed} step {step}: read of {len} at {offset}");
                }
            }
        }
        drop(v);
        let again = volume(&store, &export);
        let mut all = vec![0u8; SIZE as usize];
        again.read(&mut all, 0).expect("read");
        assert!(all == flushed, "seed {seed}: after reopen the device is not its last flushed state");
    }
}
