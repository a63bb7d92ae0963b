//! `Exports`: the open volumes of one nbdkit process, one per export name, shared by connections.
//!
//! Sharing one [`Volume`] per export is what makes FLUSH and FUA on one connection cover writes
//! made on another, so `can_multi_conn` can be true.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::config::{Config, StorageKind};
use crate::export::ExportName;
use crate::storage::{s3, FileStorage, MemoryStorage, S3Storage, Storage};
use crate::volume::{Geometry, Volume};
use crate::{lock, Error, Result};

/// The volumes of this process, opened on first use.
#[derive(Debug)]
pub struct Exports {
    config: Config,
    /// Open volumes by export; kept until the process exits so their caches outlive connections.
    volumes: Mutex<HashMap<ExportName, Arc<Volume>>>,
    /// One S3 client for all exports, built on first use (after nbdkit forks).
    s3_client: OnceLock<aws_sdk_s3::Client>,
}

impl Exports {
    /// The exports of a finished `config`.
    pub fn new(config: Config) -> Self {
        Exports {
            config,
            volumes: Mutex::new(HashMap::new()),
            s3_client: OnceLock::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The volume for the export a client asked for; `""` means the configured default.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid name, and any error opening its storage.
    pub fn open(&self, requested: &str) -> Result<Arc<Volume>> {
        let name = if requested.is_empty() {
            self.config.export.clone()
        } else {
            ExportName::new(requested)?
        };
        let mut volumes = lock(&self.volumes);
        if let Some(v) = volumes.get(&name) {
            return Ok(v.clone());
        }
        let size = self
            .config
            .size
            .ok_or_else(|| Error::config("size", "size=SIZE is required, e.g. size=1G"))?;
        let geometry = Geometry::new(size, self.config.block_size)?;
        let storage = self.open_storage(&name, geometry.block_size())?;
        log::info!(
            "export {name}: {size} bytes in {}-byte blocks on {storage}",
            geometry.block_size()
        );
        let volume = Arc::new(Volume::new(storage, geometry, self.config.volume_config())?);
        volumes.insert(name, volume.clone());
        Ok(volume)
    }

    fn open_storage(&self, name: &ExportName, block_size: usize) -> Result<Arc<dyn Storage>> {
        Ok(match self.config.storage_kind() {
            StorageKind::Memory => Arc::new(MemoryStorage::new(block_size)),
            StorageKind::File => {
                let dir = self
                    .config
                    .dir
                    .as_deref()
                    .ok_or_else(|| Error::config("dir", "storage=file needs dir=PATH"))?;
                Arc::new(FileStorage::open(dir, name, block_size)?)
            }
            StorageKind::S3 => {
                let s3 = &self.config.s3;
                let client = match self.s3_client.get() {
                    Some(c) => c.clone(),
                    None => {
                        let c = s3::runtime()?.block_on(s3::client(s3));
                        self.s3_client.get_or_init(|| c).clone()
                    }
                };
                Arc::new(S3Storage::new(client, s3, name, block_size))
            }
        })
    }

    /// Writes back every volume's dirty blocks (at unload); returns how many volumes failed.
    pub fn flush_all(&self) -> usize {
        let volumes: Vec<_> = lock(&self.volumes)
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let mut failed = 0;
        for (name, volume) in volumes {
            if let Err(e) = volume.flush() {
                log::error!("export {name}: writing back at shutdown failed, unflushed writes are lost: {e}");
                failed += 1;
            }
            let s = &volume.cache().stats;
            log::info!("export {name}: {s}");
        }
        failed
    }
}
