//! A store directory: its marker file, lock, RocksDB database and configuration.
//!
//! Layout of STORE/:
//!   dedupfs-store   JSON marker: format version and store id (read before anything else)
//!   lock            flock'ed by the one process that has the store open; holds its pid
//!   db/             RocksDB
//!   control.sock    control socket of a running mount
//!   dedupfs.log     log of a background mount

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::chunking::{ChunkerParams, Compression};
use crate::format::{self, FORMAT_VERSION};
use crate::kv::{Batch, Cf, Kv, KvError, Sync};
use crate::memory::MemoryBudget;

pub const MARKER_FILE: &str = "dedupfs-store";
pub const LOCK_FILE: &str = "lock";
pub const DB_DIR: &str = "db";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const LOG_FILE: &str = "dedupfs.log";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0}: not a dedupfs store (no {MARKER_FILE} file); create one with `dedupfs init`")]
    NotAStore(PathBuf),
    #[error("{0}: no such directory")]
    Missing(PathBuf),
    #[error("{0}: directory is not empty and is not a dedupfs store")]
    NotEmpty(PathBuf),
    #[error("{0}: already a dedupfs store")]
    AlreadyAStore(PathBuf),
    #[error("{path}: store format version {found} is newer than this dedupfs supports ({FORMAT_VERSION}); upgrade dedupfs")]
    TooNew { path: PathBuf, found: u32 },
    #[error("{path}: store is in use by another dedupfs process{holder}")]
    InUse { path: PathBuf, holder: String },
    #[error("{path}: marker file is unreadable: {why}")]
    BadMarker { path: PathBuf, why: String },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Kv(#[from] KvError),
}

/// What `dedupfs init` records; fixed for the life of the store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoreConfig {
    pub format_version: u32,
    pub store_id: String,
    pub chunker: ChunkerParams,
    pub compression: Compression,
    pub created_ns: i64,
}

#[derive(Serialize, Deserialize)]
struct Marker {
    format_version: u32,
    store_id: String,
}

/// An open store: the lock is held for as long as this lives.
pub struct Store {
    pub path: PathBuf,
    pub kv: Arc<Kv>,
    pub config: StoreConfig,
    _lock: File,
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Creates a store in `path`, which must be missing or an empty directory.
    pub fn init(
        path: &Path,
        chunker: ChunkerParams,
        compression: Compression,
    ) -> Result<StoreConfig, StoreError> {
        let io = |e| StoreError::Io(path.to_path_buf(), e);
        if path.join(MARKER_FILE).exists() {
            return Err(StoreError::AlreadyAStore(path.to_path_buf()));
        }
        if path.exists() {
            if !path.is_dir() || fs::read_dir(path).map_err(io)?.next().is_some() {
                return Err(StoreError::NotEmpty(path.to_path_buf()));
            }
        } else {
            fs::create_dir_all(path).map_err(io)?;
        }
        let store_id = hex::encode(rand::random::<[u8; 16]>());
        let config = StoreConfig {
            format_version: FORMAT_VERSION,
            store_id: store_id.clone(),
            chunker,
            compression,
            created_ns: now_ns(),
        };
        let lock = lock(path)?;
        let kv = Kv::open(&path.join(DB_DIR), true)?;
        let mut batch = Batch::new();
        let encoded = serde_json::to_vec(&config).map_err(|e| StoreError::BadMarker {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        batch.put(&kv, Cf::Meta, format::meta::CONFIG, &encoded);
        kv.write(batch, Sync::Disk)?;
        drop(kv);
        // The marker goes last: a store without it was never fully created.
        let marker = serde_json::to_vec_pretty(&Marker {
            format_version: FORMAT_VERSION,
            store_id,
        })
        .unwrap_or_default();
        write_durably(&path.join(MARKER_FILE), &marker).map_err(io)?;
        drop(lock);
        Ok(config)
    }

    /// Reads the marker and checks the version, without locking or opening the database.
    pub fn check(path: &Path) -> Result<(), StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        let marker_path = path.join(MARKER_FILE);
        let text = match fs::read(&marker_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotAStore(path.to_path_buf()))
            }
            Err(e) => return Err(StoreError::Io(marker_path, e)),
        };
        let marker: Marker = serde_json::from_slice(&text).map_err(|e| StoreError::BadMarker {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        if marker.format_version > FORMAT_VERSION {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: marker.format_version,
            });
        }
        Ok(())
    }

    /// Opens the store for exclusive use by this process, with the default memory budget.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, &MemoryBudget::default())
    }

    /// Opens the store for exclusive use by this process; the database's buffers and
    /// caches take their shares of `memory`.
    pub fn open_with(path: &Path, memory: &MemoryBudget) -> Result<Store, StoreError> {
        Store::check(path)?;
        let lock = lock(path)?;
        let kv = Kv::open_with(&path.join(DB_DIR), false, memory)?;
        let config_bytes =
            kv.get(Cf::Meta, format::meta::CONFIG)?
                .ok_or_else(|| StoreError::BadMarker {
                    path: path.to_path_buf(),
                    why: "configuration record missing".into(),
                })?;
        let mut config: StoreConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| StoreError::BadMarker {
                path: path.to_path_buf(),
                why: format!("configuration record: {e}"),
            })?;
        if config.format_version < FORMAT_VERSION {
            // Every older format is a subset of this one (docs/FORMAT.md): record the new
            // version, so that an older dedupfs refuses a store that may now hold records
            // it does not know.
            config.format_version = FORMAT_VERSION;
            let mut batch = Batch::new();
            let encoded = serde_json::to_vec(&config).unwrap_or_default();
            batch.put(&kv, Cf::Meta, format::meta::CONFIG, &encoded);
            kv.write(batch, Sync::Disk)?;
            let marker = serde_json::to_vec_pretty(&Marker {
                format_version: FORMAT_VERSION,
                store_id: config.store_id.clone(),
            })
            .unwrap_or_default();
            write_durably(&path.join(MARKER_FILE), &marker)
                .map_err(|e| StoreError::Io(path.join(MARKER_FILE), e))?;
            tracing::info!(
                "{}: store format upgraded to version {FORMAT_VERSION}",
                path.display()
            );
        }
        Ok(Store {
            path: path.to_path_buf(),
            kv: Arc::new(kv),
            config,
            _lock: lock,
        })
    }

    pub fn control_socket(&self) -> PathBuf {
        self.path.join(CONTROL_SOCKET)
    }

    /// Records what holds the lock, for the message a second opener gets.
    pub fn set_holder(&mut self, what: &str) {
        let _ = self._lock.set_len(0);
        let _ = (&self._lock).write_all(format!("pid {} {}", std::process::id(), what).as_bytes());
    }
}

/// What holds the store's lock ("pid N mounted at M"), while something does.
pub fn holder(path: &Path) -> Option<String> {
    if !is_locked(path) {
        return None;
    }
    fs::read_to_string(path.join(LOCK_FILE))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The mountpoint of the daemon holding the store, if a mount holds it.
pub fn mounted_at(path: &Path) -> Option<PathBuf> {
    let holder = holder(path)?;
    let (_, at) = holder.split_once(" mounted at ")?;
    Some(PathBuf::from(at))
}

/// True while some process holds the store's lock.
pub fn is_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path.join(LOCK_FILE)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    rc != 0
}

fn lock(path: &Path) -> Result<File, StoreError> {
    let lock_path = path.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| StoreError::Io(lock_path.clone(), e))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = if holder.trim().is_empty() {
            String::new()
        } else {
            format!(" ({})", holder.trim())
        };
        return Err(StoreError::InUse {
            path: path.to_path_buf(),
            holder,
        });
    }
    file.set_len(0)
        .map_err(|e| StoreError::Io(lock_path.clone(), e))?;
    Ok(file)
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
