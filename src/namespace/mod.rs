//! The namespace: inodes, directory entries, extent maps and xattrs of every container.
//!
//! The filesystem core knows no protocol. Every mutating operation builds one [`Txn`] and
//! commits it with [`Namespace::apply`] while holding the commit lock, so metadata,
//! extents and reference counts change together in one RocksDB batch.
//!
//! Locking: a file's state lock (`file::OpenFile`) is taken before the commit lock, never
//! after. Chunking, hashing and compression run holding only the file's lock.

mod container;
mod dataset;
mod file;
mod ops;
mod scrub;
mod snapshot;
mod source;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

pub use container::{ContainerInfo, ContainerRecord, SnapshotSchedule, AUTO_PREFIX};
pub use dataset::{Invalidation, RolledBack};
pub use file::OpenFile;
pub use ops::{DirEntry, SetAttr, StatFs, WholeFile, LINK_MAX};
pub use scrub::{BadChunk, ScrubProgress, ScrubReport};
pub(crate) use snapshot::View;
pub use snapshot::{
    check_snapshot_name, is_snapshot_ino, SnapshotDeleted, SnapshotInfo, SnapshotRecord,
    SNAPSHOTS_DIR,
};
pub use source::SnapshotSource;

use crate::chunk_store::{ChunkError, ChunkStore};
use crate::chunking;
use crate::format::{self, key, InodeRecord, Kind};
use crate::ids::{ChunkId, ContainerId, Epoch, InodeNo};
use crate::kv::{Batch, BlobSpace, Cf, Kv, KvError, Sync};
use crate::store::{now_ns, Store};

/// Errors of filesystem operations. Closed and `Copy`; [`FsError::errno`] is the one place
/// that maps them to errno values. Context is logged where the error arises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("permission denied")]
    Access,
    #[error("invalid argument")]
    Invalid,
    #[error("name too long")]
    NameTooLong,
    #[error("no space left on device")]
    NoSpace,
    #[error("input/output error")]
    Io,
    #[error("read-only file system")]
    ReadOnly,
    #[error("no such attribute")]
    NoAttr,
    #[error("result too large")]
    Range,
    #[error("cross-container link or rename")]
    CrossDevice,
    #[error("resource busy")]
    Busy,
    #[error("file too large")]
    TooBig,
    #[error("too many links")]
    TooManyLinks,
    /// SEEK_DATA at or past the last data, or SEEK_DATA/SEEK_HOLE at or past the end.
    #[error("no such device or address")]
    NoDataAfter,
}

impl FsError {
    pub fn errno(self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NotPermitted => libc::EPERM,
            FsError::Access => libc::EACCES,
            FsError::Invalid => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoSpace => libc::ENOSPC,
            FsError::Io => libc::EIO,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::CrossDevice => libc::EXDEV,
            FsError::Busy => libc::EBUSY,
            FsError::TooBig => libc::EFBIG,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NoDataAfter => libc::ENXIO,
        }
    }
}

impl From<KvError> for FsError {
    fn from(e: KvError) -> FsError {
        match e {
            KvError::NoSpace => FsError::NoSpace,
            KvError::Poisoned => FsError::ReadOnly,
            other => {
                tracing::error!("storage error: {other}");
                FsError::Io
            }
        }
    }
}

impl From<ChunkError> for FsError {
    fn from(e: ChunkError) -> FsError {
        match e {
            ChunkError::Kv(kv) => kv.into(),
            other => {
                tracing::error!("{other}");
                FsError::Io
            }
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// Who asks: the credentials of the calling process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller { uid: 0, gid: 0 };

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// An inode's attributes as the namespace reports them (pending writes included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: InodeNo,
    pub rec: InodeRecord,
}

impl Attr {
    pub fn kind(&self) -> Kind {
        self.rec.kind
    }

    /// 512-byte blocks holding data, for st_blocks (holes hold none).
    pub fn blocks(&self) -> u64 {
        self.rec.data_bytes.div_ceil(512)
    }
}

/// Store-wide counters, kept exact in the same batches that change them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Bytes of file data referenced by extents (holes excluded), all containers.
    pub logical_bytes: u64,
    /// Bytes of stored chunk payloads, after compression.
    pub stored_bytes: u64,
    /// Bytes of unique chunks before compression.
    pub unique_bytes: u64,
    pub chunks: u64,
    pub files: u64,
    pub dirs: u64,
}

/// Throughput counters of this process (not persisted).
#[derive(Default)]
pub struct IoCounters {
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    pub started_ns: AtomicU64,
}

/// State changed only under the commit lock.
pub(crate) struct CommitState {
    pub counters: Counters,
    pub next_ino: u64,
    pub next_container: u32,
    pub next_snapshot: u32,
}

/// Tells the kernel to forget inodes and names (see [`Namespace::set_invalidator`]).
pub type Invalidator = Box<dyn Fn(&[Invalidation]) + Send + std::marker::Sync>;

/// Default size of the decompressed-chunk cache.
pub const DEFAULT_CACHE_BYTES: u64 = 128 << 20;

/// An open file: its state, its open handles, and the last releases still committing it.
/// The entry stays until both counts are zero, so that an open in between finds the state
/// with every write in it rather than the store's copy.
pub(crate) struct OpenEntry {
    pub(crate) file: Arc<OpenFile>,
    pub(crate) handles: u32,
    pub(crate) releasing: u32,
}

pub struct Namespace {
    pub(crate) kv: Arc<Kv>,
    pub(crate) store: Store,
    pub chunks: ChunkStore,
    pub(crate) commit: Mutex<CommitState>,
    pub(crate) containers: RwLock<HashMap<ContainerId, ContainerRecord>>,
    /// Every snapshot, by container and epoch.
    pub(crate) snapshots: RwLock<std::collections::BTreeMap<(ContainerId, Epoch), SnapshotRecord>>,
    /// Tells the kernel to forget what a rollback changed (set by the FUSE adapter).
    pub(crate) invalidator: std::sync::OnceLock<Invalidator>,
    /// Snapshots served by a restore mount, with the number of mounts: they cannot be
    /// deleted meanwhile.
    pub(crate) mounted_snapshots: Mutex<HashMap<crate::ids::SnapshotId, u32>>,
    /// Snapshot files open for reading, by view inode, with their handle counts.
    pub(crate) snap_files: Mutex<HashMap<InodeNo, (Arc<snapshot::SnapFile>, u32)>>,
    /// Snapshot files last read without an open (a restore mount's kernel sends none), by view
    /// inode, newest first; see [`Namespace::snap_file`].
    pub(crate) snap_recent: Mutex<std::collections::VecDeque<(InodeNo, Arc<snapshot::SnapFile>)>>,
    /// Open files, by inode.
    pub(crate) open_files: Mutex<HashMap<InodeNo, OpenEntry>>,
    pub io: IoCounters,
    /// This namespace, for work handed to other threads (background commits).
    pub(crate) me: std::sync::OnceLock<std::sync::Weak<Namespace>>,
    /// Background commit threads still running; [`Namespace::shutdown`] waits for none, so
    /// that no thread holds the store when it is reopened.
    pub(crate) jobs: Arc<(Mutex<usize>, parking_lot::Condvar)>,
    /// The first failure of a commit nobody waited for (a release after close): reported
    /// by the next [`Namespace::sync_all`], as a syncfs reports lost writeback.
    pub(crate) lost_commit: Mutex<Option<FsError>>,
    /// Pending bytes of one file that start a background commit.
    pub(crate) dirty_limit: std::sync::atomic::AtomicUsize,
    /// Pending bytes of all open files together: shared out, each open file commits at
    /// its share when that is below `dirty_limit`.
    pub(crate) pending_budget: std::sync::atomic::AtomicUsize,
    /// Free space of the filesystem holding the store, sampled now and then.
    space: SpaceGuard,
}

/// Keeps the store from filling its filesystem: new data is refused with ENOSPC while less
/// than a reserve is free, so RocksDB itself never runs out (a failed write poisons the
/// store) and deleting files, which needs little space, still works to free some.
struct SpaceGuard {
    free_bytes: AtomicU64,
    total_bytes: AtomicU64,
    sampled_ns: AtomicU64,
    /// When the last space reclaim (flush + compaction) started, in ns; one at a time.
    reclaim_ns: AtomicU64,
    reclaiming: std::sync::atomic::AtomicBool,
    /// Stored bytes of chunks deleted since the last reclaim: a reclaim with nothing to
    /// give back would only cost space.
    reclaimable_bytes: AtomicU64,
    /// Whether blob garbage collection is on (see [`blob_gc_wanted`]).
    blob_gc: std::sync::atomic::AtomicBool,
    /// When data was last written, in ns: housekeeping compactions wait for a pause.
    last_write_ns: AtomicU64,
    /// Blob space when the last housekeeping reclaim ended: another one is only worth it
    /// once that changed.
    after_reclaim: Mutex<BlobSpace>,
    /// Held while deciding and setting the collection setting, so that the timer and a
    /// reclaim thread cannot leave the flag and RocksDB disagreeing.
    gc_setting: Mutex<()>,
    /// Set by shutdown: no reclaim starts, a running one stops after its compaction.
    stopping: std::sync::atomic::AtomicBool,
}

/// Whether blob garbage collection should run. It relocates the live chunks of old blob
/// files at every compaction of the chunk index, garbage or not: always on, it spent 40 %
/// of the daemon's CPU rewriting chunks just written during a sequential write of new data,
/// which ran 1.6x slower for it. So it runs while there is garbage worth the copying: on
/// once a quarter of the blob bytes are deleted chunks, off again below an eighth. And only
/// with room for what it writes before it frees (a compaction relocates up to the live
/// bytes of the older half of the blob files): on above eight reserves plus half the live
/// bytes, off again below four reserves plus a quarter.
fn blob_gc_wanted(on: bool, free: u64, reserve: u64, blobs: BlobSpace) -> bool {
    let live = blobs.bytes.saturating_sub(blobs.garbage);
    let room = if on {
        free >= reserve.saturating_mul(4).saturating_add(live / 4)
    } else {
        free > reserve.saturating_mul(8).saturating_add(live / 2)
    };
    let garbage = blobs.garbage > 0
        && if on {
            blobs.garbage.saturating_mul(8) >= blobs.bytes
        } else {
            blobs.garbage.saturating_mul(4) >= blobs.bytes
        };
    room && garbage
}

/// Why a space reclaim starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reclaim {
    /// Free space is down to the reserve.
    LowSpace,
    /// Chunks were deleted or blob files hold garbage: a compaction counts the one and
    /// collects the other.
    Garbage,
}

/// How long writes must pause before housekeeping compacts (see
/// [`Namespace::maintain_space`]), in nanoseconds.
const WRITE_PAUSE_NS: u64 = 5_000_000_000;

/// Least time between two housekeeping reclaims, in nanoseconds: each compacts the whole
/// chunk index.
const GARBAGE_RECLAIM_INTERVAL_NS: u64 = 30_000_000_000;

/// Compactions one space reclaim runs at most.
const RECLAIM_ROUNDS: usize = 4;

/// Least time between two space reclaims, in nanoseconds.
const RECLAIM_INTERVAL_NS: u64 = 2_000_000_000;

/// How often free space is sampled (statvfs), in nanoseconds.
const SPACE_SAMPLE_NS: u64 = 200_000_000;

/// The reserve: room for memtable flushes (up to ~100 MiB of write buffers), compactions and
/// the deletes that free space; a quarter of the filesystem when that is smaller.
const SPACE_RESERVE: u64 = 256 << 20;

impl SpaceGuard {
    fn new() -> SpaceGuard {
        SpaceGuard {
            free_bytes: AtomicU64::new(u64::MAX),
            total_bytes: AtomicU64::new(u64::MAX),
            sampled_ns: AtomicU64::new(0),
            reclaim_ns: AtomicU64::new(0),
            reclaiming: std::sync::atomic::AtomicBool::new(false),
            reclaimable_bytes: AtomicU64::new(0),
            // The store opens with collection off (see `Kv::open_with`).
            blob_gc: std::sync::atomic::AtomicBool::new(false),
            last_write_ns: AtomicU64::new(0),
            after_reclaim: Mutex::new(BlobSpace::default()),
            gc_setting: Mutex::new(()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Samples free space unless it was sampled very recently; returns the time it
    /// looked at, in ns.
    fn sample(&self, path: &std::path::Path) -> u64 {
        let now = now_ns().max(0) as u64;
        if now.saturating_sub(self.sampled_ns.load(Ordering::Relaxed)) < SPACE_SAMPLE_NS {
            return now;
        }
        self.sampled_ns.store(now, Ordering::Relaxed);
        let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return now;
        };
        // SAFETY: statvfs writes into the zeroed struct; the path is NUL-terminated.
        let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c_path.as_ptr(), &mut vfs) } == 0 {
            let frsize = vfs.f_frsize.max(1);
            self.free_bytes
                .store(vfs.f_bavail.saturating_mul(frsize), Ordering::Relaxed);
            self.total_bytes
                .store(vfs.f_blocks.saturating_mul(frsize), Ordering::Relaxed);
        }
        now
    }

    /// The blob garbage collection setting that free space and `blobs` call for, when it
    /// differs from the current one.
    fn blob_gc_change(&self, blobs: BlobSpace) -> Option<bool> {
        let on = self.blob_gc.load(Ordering::Relaxed);
        let free = self.free_bytes.load(Ordering::Relaxed);
        let wanted = blob_gc_wanted(on, free, self.reserve(), blobs);
        (wanted != on).then_some(wanted)
    }

    fn reserve(&self) -> u64 {
        SPACE_RESERVE.min(self.total_bytes.load(Ordering::Relaxed) / 4)
    }

    /// ENOSPC unless `adding` more bytes leave the reserve free.
    fn check(&self, path: &std::path::Path, adding: u64) -> FsResult<()> {
        let now = self.sample(path);
        self.last_write_ns.store(now, Ordering::Relaxed);
        let free = self.free_bytes.load(Ordering::Relaxed);
        if free.saturating_sub(adding) < self.reserve() {
            return Err(FsError::NoSpace);
        }
        Ok(())
    }

    /// True when free space is within twice the reserve: deleted chunks should then give
    /// their space back at once rather than at RocksDB's next compaction.
    fn is_low(&self, path: &std::path::Path) -> bool {
        self.sample(path);
        self.free_bytes.load(Ordering::Relaxed) < self.reserve().saturating_mul(2)
    }
}

/// The writes of one operation, committed together by [`Namespace::apply`].
pub(crate) struct Txn {
    pub batch: Batch,
    /// Reference-count changes by chunk.
    pub refs: HashMap<ChunkId, i64>,
    /// Encoded payloads of chunks that may be new to the store.
    pub payloads: HashMap<ChunkId, Vec<u8>>,
    pub delta: CounterDelta,
    /// Containers whose records (counters) this transaction rewrites, with their deltas.
    pub container_delta: HashMap<ContainerId, CounterDelta>,
    pub sync: Sync,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CounterDelta {
    pub logical_bytes: i64,
    pub files: i64,
    pub dirs: i64,
}

impl CounterDelta {
    fn is_zero(&self) -> bool {
        self.logical_bytes == 0 && self.files == 0 && self.dirs == 0
    }
}

fn add(v: u64, d: i64) -> u64 {
    (v as i64).saturating_add(d).max(0) as u64
}

impl Txn {
    pub fn new(sync: Sync) -> Txn {
        Txn {
            batch: Batch::new(),
            refs: HashMap::new(),
            payloads: HashMap::new(),
            delta: CounterDelta::default(),
            container_delta: HashMap::new(),
            sync,
        }
    }

    pub fn reference(&mut self, id: ChunkId, payload: Option<Vec<u8>>) {
        *self.refs.entry(id).or_insert(0) += 1;
        if let Some(p) = payload {
            self.payloads.insert(id, p);
        }
    }

    pub fn release(&mut self, id: ChunkId) {
        *self.refs.entry(id).or_insert(0) -= 1;
    }

    pub fn count(&mut self, container: ContainerId, f: impl Fn(&mut CounterDelta)) {
        f(&mut self.delta);
        f(self.container_delta.entry(container).or_default());
    }
}

impl Namespace {
    /// Opens the namespace of an open store, creating the root on first use and reclaiming
    /// orphans that a crashed process left behind.
    pub fn new(store: Store, cache_bytes: u64) -> FsResult<Arc<Namespace>> {
        let kv = store.kv.clone();
        let counters = match kv.get(Cf::Meta, format::meta::STORE_COUNTERS)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| {
                tracing::error!("store counters record is unreadable: {e}");
                FsError::Io
            })?,
            None => Counters::default(),
        };
        let read_u64 = |name: &[u8], default: u64| -> FsResult<u64> {
            Ok(kv
                .get(Cf::Meta, name)?
                .and_then(|v| format::decode_count(&v))
                .unwrap_or(default))
        };
        let next_ino = read_u64(format::meta::NEXT_INODE, 2)?;
        let next_container = read_u64(format::meta::NEXT_CONTAINER, 1)? as u32;
        let ns = Namespace {
            chunks: ChunkStore::new(kv.clone(), cache_bytes),
            kv,
            store,
            commit: Mutex::new(CommitState {
                counters,
                next_ino,
                next_container,
                next_snapshot: 1,
            }),
            containers: RwLock::new(HashMap::new()),
            snapshots: RwLock::new(std::collections::BTreeMap::new()),
            snap_files: Mutex::new(HashMap::new()),
            snap_recent: Mutex::new(std::collections::VecDeque::new()),
            mounted_snapshots: Mutex::new(HashMap::new()),
            invalidator: std::sync::OnceLock::new(),
            open_files: Mutex::new(HashMap::new()),
            io: IoCounters::default(),
            me: std::sync::OnceLock::new(),
            jobs: Arc::new((Mutex::new(0), parking_lot::Condvar::new())),
            lost_commit: Mutex::new(None),
            dirty_limit: std::sync::atomic::AtomicUsize::new(file::DIRTY_LIMIT),
            pending_budget: std::sync::atomic::AtomicUsize::new(
                crate::memory::MemoryBudget::default().pending_writes() as usize,
            ),
            space: SpaceGuard::new(),
        };
        let ns = Arc::new(ns);
        let _ = ns.me.set(Arc::downgrade(&ns));
        ns.io
            .started_ns
            .store(now_ns().max(0) as u64, Ordering::Relaxed);
        ns.load_containers()?;
        ns.commit.lock().next_snapshot = ns.load_snapshots()?;
        ns.load_quarantine()?;
        ns.ensure_root()?;
        ns.reclaim_orphans()?;
        Ok(ns)
    }

    /// Sets how many pending bytes of one file start a commit (tests use small values to
    /// exercise background commits).
    pub fn set_dirty_limit(&self, bytes: usize) {
        self.dirty_limit.store(bytes.max(1), Ordering::Relaxed);
    }

    /// Sets how many pending bytes all open files may hold together (see
    /// [`crate::memory::MemoryBudget::pending_writes`]).
    pub fn set_pending_budget(&self, bytes: usize) {
        self.pending_budget.store(bytes.max(1), Ordering::Relaxed);
    }

    /// Pending bytes at which one file commits: its share of the pending budget among the
    /// open files, never more than the dirty limit, never less than a few chunks (so that
    /// thousands of open files still commit whole chunks).
    pub(crate) fn file_dirty_limit(&self) -> usize {
        const FLOOR: usize = 512 << 10;
        let open = self.open_files.lock().len().max(1);
        let share = (self.pending_budget.load(Ordering::Relaxed) / open).max(FLOOR);
        share.min(self.dirty_limit.load(Ordering::Relaxed))
    }

    /// ENOSPC when the store's filesystem is down to its reserve (see [`SpaceGuard`]).
    /// Then the space of deleted chunks, which RocksDB gives back only at compaction, is
    /// reclaimed on another thread, so writes succeed again once files are deleted.
    pub(crate) fn check_space(&self, adding: u64) -> FsResult<()> {
        let result = self.space.check(&self.store.path, adding);
        if result.is_err() {
            self.reclaim_space_later(Reclaim::LowSpace);
        }
        result
    }

    /// Space housekeeping, which the mount runs every half second: turns blob garbage
    /// collection on or off as free space and the garbage in blob files call for (see
    /// [`blob_gc_wanted`]), and starts a compaction when that is what it waits for.
    /// RocksDB counts a deleted chunk as garbage only once a compaction has dropped its
    /// key, which writes alone may not start for a long time after a big delete; and
    /// collection, once on, happens in compactions too.
    ///
    /// While data is being written, compactions happen anyway (and collect, when collection
    /// is on): a compaction of the whole chunk index on top of them would only slow the
    /// writes down (a 4 KiB random overwrite, which turns a chunk into garbage at every
    /// write, ran at 0.6x). So the compaction waits for a pause in the writes.
    pub fn maintain_space(&self) {
        if self.space.stopping.load(Ordering::Acquire) {
            return;
        }
        let (blobs, turned_on) = self.update_blob_gc();
        let now = now_ns().max(0) as u64;
        let writing =
            now.saturating_sub(self.space.last_write_ns.load(Ordering::Relaxed)) < WRITE_PAUSE_NS;
        let deleted = self.space.reclaimable_bytes.load(Ordering::Relaxed);
        let deleted_a_lot = deleted > 0 && deleted.saturating_mul(4) >= blobs.bytes;
        // Collection is on and a quarter is garbage, and a reclaim could change that: not
        // when the last one ended with the blob files as they are (RocksDB relocates only
        // the older half of the files, so one file's garbage, say, stays).
        let collecting = self.space.blob_gc.load(Ordering::Relaxed)
            && blobs.garbage > 0
            && blobs.garbage.saturating_mul(4) >= blobs.bytes
            && blobs != *self.space.after_reclaim.lock();
        if !writing && (deleted_a_lot || turned_on || collecting) {
            self.reclaim_space_later(Reclaim::Garbage);
        }
    }

    /// Sets blob garbage collection as [`blob_gc_wanted`] says; returns the blob space it
    /// decided on, and true when it turned collection on.
    fn update_blob_gc(&self) -> (BlobSpace, bool) {
        let _setting = self.space.gc_setting.lock();
        self.space.sample(&self.store.path);
        let blobs = self.kv.blob_space();
        let change = self.space.blob_gc_change(blobs);
        if let Some(enabled) = change {
            self.set_blob_gc(enabled, blobs);
        }
        (blobs, change == Some(true))
    }

    fn set_blob_gc(&self, enabled: bool, blobs: BlobSpace) {
        match self.kv.set_blob_gc(enabled) {
            Ok(()) => {
                self.space.blob_gc.store(enabled, Ordering::Relaxed);
                tracing::info!(
                    "{}: blob garbage collection {} ({} MiB of {} MiB in blob files are deleted chunks, {} MiB free)",
                    self.store.path.display(),
                    if enabled { "on" } else { "off" },
                    blobs.garbage >> 20,
                    blobs.bytes >> 20,
                    self.space.free_bytes.load(Ordering::Relaxed) >> 20,
                );
            }
            Err(e) => tracing::error!("setting blob garbage collection: {e}"),
        }
    }

    /// Starts a space reclaim (flush and a compaction of the chunk index, see
    /// [`Kv::reclaim_space`]) on another thread, unless one ran very recently or there is
    /// nothing to reclaim.
    fn reclaim_space_later(&self, why: Reclaim) {
        let now = now_ns().max(0) as u64;
        let space = &self.space;
        // Low space asks again at every refused write: at most one reclaim per interval,
        // and only with something to give back. Housekeeping asks every half second
        // while there is garbage: at most one reclaim per longer interval.
        let since = now.saturating_sub(space.reclaim_ns.load(Ordering::Relaxed));
        let too_soon = match why {
            Reclaim::LowSpace => {
                space.reclaimable_bytes.load(Ordering::Relaxed) == 0 || since < RECLAIM_INTERVAL_NS
            }
            Reclaim::Garbage => since < GARBAGE_RECLAIM_INTERVAL_NS,
        };
        if too_soon
            || space.stopping.load(Ordering::Acquire)
            || space.reclaiming.swap(true, Ordering::AcqRel)
        {
            return;
        }
        space.reclaimable_bytes.store(0, Ordering::Relaxed);
        space.reclaim_ns.store(now, Ordering::Relaxed);
        let Some(ns) = self.me.get().and_then(|w| w.upgrade()) else {
            space.reclaiming.store(false, Ordering::Release);
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || {
                match why {
                    Reclaim::LowSpace => tracing::warn!(
                        "{}: free space is down to the reserve; reclaiming the space of deleted chunks",
                        ns.store.path.display()
                    ),
                    Reclaim::Garbage => tracing::info!(
                        "{}: collecting the space of deleted chunks in blob files",
                        ns.store.path.display()
                    ),
                }
                let mut blobs = ns.kv.blob_space();
                for _ in 0..RECLAIM_ROUNDS {
                    let before = blobs;
                    if let Err(e) = ns.kv.reclaim_space() {
                        tracing::error!("reclaiming space: {e}");
                        break;
                    }
                    // Sample again at once: the next write sees the space given back.
                    ns.space.sampled_ns.store(0, Ordering::Relaxed);
                    // The compaction counted the garbage of the deleted chunks, which may
                    // turn collection on. With it on, each compaction relocates the live
                    // chunks of the older half of the blob files: go on while a quarter
                    // of the blob bytes is still garbage.
                    blobs = ns.update_blob_gc().0;
                    *ns.space.after_reclaim.lock() = blobs;
                    if ns.space.stopping.load(Ordering::Acquire)
                        || !ns.space.blob_gc.load(Ordering::Relaxed)
                        || blobs.garbage == 0
                        || blobs.garbage.saturating_mul(4) < blobs.bytes
                        || blobs == before
                    {
                        break;
                    }
                }
                tracing::info!(
                    "{}: reclaim done: blob files hold {} MiB, {} MiB of it deleted chunks",
                    ns.store.path.display(),
                    blobs.bytes >> 20,
                    blobs.garbage >> 20
                );
                ns.space.reclaiming.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            space.reclaiming.store(false, Ordering::Release);
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    pub fn config(&self) -> &crate::store::StoreConfig {
        &self.store.config
    }

    pub fn counters(&self) -> Counters {
        self.commit.lock().counters
    }

    fn ensure_root(&self) -> FsResult<()> {
        if self.read_inode(InodeNo::ROOT)?.is_some() {
            return Ok(());
        }
        let now = now_ns();
        let rec = InodeRecord {
            kind: Kind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            data_bytes: 0,
            parent: InodeNo::ROOT,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            nlink: 2,
            rdev: 0,
            generation: 0,
            container: ContainerId::NONE,
            target: Vec::new(),
        };
        let mut st = self.commit.lock();
        let mut txn = Txn::new(Sync::Disk);
        txn.batch.put(
            &self.kv,
            Cf::Inode,
            &key::inode(InodeNo::ROOT, Epoch::ROOT),
            &rec.encode(),
        );
        self.apply(&mut st, txn, &|_| None)
    }

    /// Allocates an inode number. Numbers are never reused, so a stale kernel or NFS handle
    /// can never name a different file.
    pub(crate) fn alloc_ino(&self, st: &mut CommitState, txn: &mut Txn) -> InodeNo {
        let ino = InodeNo(st.next_ino);
        st.next_ino += 1;
        txn.batch.put(
            &self.kv,
            Cf::Meta,
            format::meta::NEXT_INODE,
            &format::encode_count(st.next_ino),
        );
        ino
    }

    /// Commits `txn`: applies reference-count changes (storing chunks that become
    /// referenced and deleting chunks that drop to zero), counters, then writes the batch.
    /// `encode_missing` supplies the payload of a chunk that was thought present when it
    /// was prepared but has been reclaimed since.
    pub(crate) fn apply(
        &self,
        st: &mut CommitState,
        mut txn: Txn,
        encode_missing: &dyn Fn(&ChunkId) -> Option<Vec<u8>>,
    ) -> FsResult<()> {
        let new_bytes: u64 = txn.payloads.values().map(|p| p.len() as u64).sum();
        if new_bytes > 0 {
            self.check_space(new_bytes)?;
        }
        let mut counters = st.counters;
        let mut reclaimed = Vec::new();
        let mut repaired = Vec::new();
        for (id, delta) in &txn.refs {
            // A chunk released and referenced again in one batch (a file replaced by one
            // that shares it) is untouched, unless its stored copy is damaged and the batch
            // brings verified bytes: the repair below must not be skipped.
            if *delta == 0 && !(txn.payloads.contains_key(id) && self.chunks.is_suspect(id)) {
                continue;
            }
            let old = self.chunks.refcount(id)?;
            let new = old as i64 + delta;
            if new < 0 {
                tracing::error!("chunk {id}: reference count would go below zero ({old}{delta:+})");
                return Err(FsError::Io);
            }
            if new == 0 {
                let stored_len = self
                    .kv
                    .get(Cf::Chunk, &id.0)?
                    .map(|v| (v.len() as u64, chunking::stored_raw_len(&v).unwrap_or(0)));
                txn.batch.delete(&self.kv, Cf::Chunk, &id.0);
                txn.batch.delete(&self.kv, Cf::Refcount, &id.0);
                if self.chunks.is_suspect(id) {
                    txn.batch.delete(&self.kv, Cf::Meta, &key::quarantine(id));
                }
                if let Some((stored, raw)) = stored_len {
                    self.space
                        .reclaimable_bytes
                        .fetch_add(stored, Ordering::Relaxed);
                    counters.stored_bytes = counters.stored_bytes.saturating_sub(stored);
                    counters.unique_bytes = counters.unique_bytes.saturating_sub(raw as u64);
                    counters.chunks = counters.chunks.saturating_sub(1);
                }
                reclaimed.push(*id);
                continue;
            }
            if old > 0 && self.chunks.is_suspect(id) {
                // The stored copy failed verification; these bytes hashed to `id` just now.
                if let Some(payload) = txn.payloads.remove(id) {
                    let old_len = self.kv.get(Cf::Chunk, &id.0)?.map(|v| v.len() as u64);
                    counters.stored_bytes =
                        counters.stored_bytes.saturating_sub(old_len.unwrap_or(0))
                            + payload.len() as u64;
                    txn.batch.put(&self.kv, Cf::Chunk, &id.0, &payload);
                    txn.batch.delete(&self.kv, Cf::Meta, &key::quarantine(id));
                    tracing::warn!(
                        "chunk {}: damaged copy replaced by a verified write",
                        id.to_hex()
                    );
                    repaired.push(*id);
                }
            }
            if old == 0 {
                let payload = match txn.payloads.remove(id) {
                    Some(p) => p,
                    None => encode_missing(id).ok_or_else(|| {
                        tracing::error!("chunk {id}: referenced but neither stored nor supplied");
                        FsError::Io
                    })?,
                };
                counters.stored_bytes += payload.len() as u64;
                counters.unique_bytes += chunking::stored_raw_len(&payload).unwrap_or(0) as u64;
                counters.chunks += 1;
                txn.batch.put(&self.kv, Cf::Chunk, &id.0, &payload);
            }
            txn.batch.put(
                &self.kv,
                Cf::Refcount,
                &id.0,
                &format::encode_count(new as u64),
            );
        }
        counters.logical_bytes = add(counters.logical_bytes, txn.delta.logical_bytes);
        counters.files = add(counters.files, txn.delta.files);
        counters.dirs = add(counters.dirs, txn.delta.dirs);
        if counters != st.counters {
            let encoded = serde_json::to_vec(&counters).unwrap_or_default();
            txn.batch
                .put(&self.kv, Cf::Meta, format::meta::STORE_COUNTERS, &encoded);
        }
        let mut updated = Vec::new();
        {
            let containers = self.containers.read();
            for (cid, d) in &txn.container_delta {
                if d.is_zero() || *cid == ContainerId::NONE {
                    continue;
                }
                if let Some(rec) = containers.get(cid) {
                    let mut rec = rec.clone();
                    rec.logical_bytes = add(rec.logical_bytes, d.logical_bytes);
                    rec.files = add(rec.files, d.files);
                    rec.dirs = add(rec.dirs, d.dirs);
                    txn.batch
                        .put(&self.kv, Cf::Meta, &key::container(*cid), &rec.encode());
                    updated.push(rec);
                }
            }
        }
        self.kv.write(txn.batch, txn.sync)?;
        st.counters = counters;
        let mut containers = self.containers.write();
        for rec in updated {
            containers.insert(rec.id, rec);
        }
        if !reclaimed.is_empty() && self.space.is_low(&self.store.path) {
            self.reclaim_space_later(Reclaim::LowSpace);
        }
        for id in reclaimed {
            self.chunks.forget(&id);
        }
        for id in repaired {
            self.chunks.repaired(&id);
        }
        Ok(())
    }

    /// Newest version of the object `prefix` in `cf` (the live view), with its birth epoch.
    /// `None` when there is none or the newest is a tombstone.
    pub(crate) fn read_newest(&self, cf: Cf, prefix: &[u8]) -> FsResult<Option<(Vec<u8>, Epoch)>> {
        self.read_at(cf, prefix, None)
    }

    pub(crate) fn read_inode(&self, ino: InodeNo) -> FsResult<Option<(InodeRecord, Epoch)>> {
        match self.read_newest(Cf::Inode, &key::inode_prefix(ino))? {
            None => Ok(None),
            Some((v, birth)) => match InodeRecord::decode(&v) {
                Some(rec) => Ok(Some((rec, birth))),
                None => {
                    tracing::error!("{ino}: inode record does not decode");
                    Err(FsError::Io)
                }
            },
        }
    }

    /// Live records of many inodes, in the order of `inos`, read with one cursor (see
    /// [`Kv::cursor`]): a directory's worth of lookups for the price of a few. An inode open
    /// with pending writes, or of a snapshot view, is read as [`Namespace::getattr`] does.
    pub(crate) fn inodes_live(&self, inos: &[InodeNo]) -> Vec<FsResult<InodeRecord>> {
        let mut cursor = self.kv.cursor(Cf::Inode);
        inos.iter()
            .map(|&ino| {
                if is_snapshot_ino(ino) || self.open_file(ino).is_some() {
                    return self.getattr(ino).map(|a| a.rec);
                }
                let prefix = key::inode_prefix(ino);
                let mut newest: Option<Vec<u8>> = None;
                cursor.scan(&prefix, &prefix, |k, v| {
                    // Versions newest first; longer keys belong to other objects.
                    if k.len() != prefix.len() + 8 || key::split_versioned(k).is_none() {
                        return true;
                    }
                    newest = (!format::is_tombstone(v)).then(|| v.to_vec());
                    false
                })?;
                let v = newest.ok_or(FsError::NotFound)?;
                InodeRecord::decode(&v).ok_or_else(|| {
                    tracing::error!("{ino}: inode record does not decode");
                    FsError::Io
                })
            })
            .collect()
    }

    /// A cursor over the xattr records, for [`Namespace::live_xattr_names`].
    pub(crate) fn xattr_cursor(&self) -> crate::kv::Cursor<'_> {
        self.kv.cursor(Cf::Xattr)
    }

    /// The inode's stored record, or ENOENT.
    pub(crate) fn inode(&self, ino: InodeNo) -> FsResult<InodeRecord> {
        self.read_inode(ino)?
            .map(|(r, _)| r)
            .ok_or(FsError::NotFound)
    }

    /// Live epoch of a container: the birth epoch of every version written now.
    pub(crate) fn live_epoch(&self, container: ContainerId) -> Epoch {
        if container == ContainerId::NONE {
            return Epoch::ROOT;
        }
        self.containers
            .read()
            .get(&container)
            .map(|c| c.live_epoch)
            .unwrap_or(Epoch::FIRST)
    }

    /// Stages `rec` as the live version of `ino`, superseding the current one.
    pub(crate) fn put_inode(&self, txn: &mut Txn, ino: InodeNo, rec: &InodeRecord) -> FsResult<()> {
        self.stage_version(
            txn,
            Cf::Inode,
            &key::inode_prefix(ino),
            rec.container,
            Some(&rec.encode()),
        )?;
        Ok(())
    }

    /// The root of snapshot `name` of `container`, as the inode a restore mount shows as its
    /// root; the snapshot cannot be deleted until [`Namespace::release_snapshot`].
    pub fn hold_snapshot(
        &self,
        container: &str,
        name: &str,
    ) -> FsResult<(InodeNo, crate::ids::SnapshotId)> {
        let c = self.container_by_name(container).ok_or(FsError::NotFound)?;
        // Under the commit lock, so that no deletion slips in between.
        let _st = self.commit.lock();
        let s = self.snapshot_by_name(c.id, name).ok_or(FsError::NotFound)?;
        *self.mounted_snapshots.lock().entry(s.id).or_insert(0) += 1;
        Ok((View::Snapshot(s.id, c.root).ino(), s.id))
    }

    /// Sets what tells the kernel to forget changed inodes and names (one per namespace:
    /// the main mount's).
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidator.set(f);
    }

    /// Tells the kernel (through the main mount, if any) to forget `items`. Never call
    /// it from a FUSE request: the kernel may wait on that request.
    pub(crate) fn invalidate(&self, items: &[Invalidation]) {
        if let Some(f) = self.invalidator.get() {
            f(items);
        }
    }

    pub fn release_snapshot(&self, id: crate::ids::SnapshotId) {
        let mut held = self.mounted_snapshots.lock();
        if let Some(n) = held.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&id);
                self.forget_snap_files(id);
            }
        }
    }

    /// True for directories whose entries change through the control socket rather than
    /// this mount (the mount root, `.snapshots`): the kernel must not cache them long.
    pub fn changes_outside_mount(ino: InodeNo) -> bool {
        ino == InodeNo::ROOT || matches!(View::of(ino), View::SnapshotsDir(_))
    }

    /// Attributes including pending writes of an open file.
    pub fn getattr(&self, ino: InodeNo) -> FsResult<Attr> {
        if is_snapshot_ino(ino) {
            return self.view_getattr(View::of(ino));
        }
        let open = self.open_file(ino);
        let rec = match open {
            Some(f) => f.attr_with_pending(|| self.inode(ino))?,
            None => self.inode(ino)?,
        };
        Ok(Attr { ino, rec })
    }

    pub fn io_counters(&self) -> (u64, u64, i64) {
        (
            self.io.bytes_written.load(Ordering::Relaxed),
            self.io.bytes_read.load(Ordering::Relaxed),
            self.io.started_ns.load(Ordering::Relaxed) as i64,
        )
    }

    /// Commits every pending write and flushes the database (clean shutdown). A space
    /// reclaim still compacting is cancelled, and waited for, so that the database closes.
    pub fn shutdown(&self) -> FsResult<()> {
        self.space.stopping.store(true, Ordering::Release);
        let open: Vec<Arc<OpenFile>> = self.open_file_list();
        let mut result = Ok(());
        for f in open {
            if let Err(e) = self.commit_open_file(&f, Sync::Process) {
                result = Err(e);
            }
        }
        {
            let (count, done) = &*self.jobs;
            let mut running = count.lock();
            while *running > 0 {
                done.wait(&mut running);
            }
        }
        self.kv.sync_wal()?;
        self.kv.flush()?;
        if self.space.reclaiming.load(Ordering::Acquire) {
            self.kv.cancel_background_work();
            while self.space.reclaiming.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        result
    }
}

/// EROFS for an inode of a snapshot view: snapshots are immutable.
pub(crate) fn writable(ino: InodeNo) -> FsResult<()> {
    if is_snapshot_ino(ino) {
        return Err(FsError::ReadOnly);
    }
    Ok(())
}

/// Checks a name for a directory entry or container.
pub fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid);
    }
    if name.len() > format::NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_gc_runs_while_there_is_garbage_and_room() {
        const R: u64 = 256 << 20;
        let blobs = |bytes: u64, garbage: u64| BlobSpace { bytes, garbage };
        let plenty = 100 * R;
        // Off: on at a quarter garbage, not before, and not for an empty store.
        assert!(!blob_gc_wanted(false, plenty, R, blobs(0, 0)));
        assert!(!blob_gc_wanted(false, plenty, R, blobs(1000, 249)));
        assert!(blob_gc_wanted(false, plenty, R, blobs(1000, 250)));
        // On: stays on down to an eighth, and not once nothing is garbage.
        assert!(blob_gc_wanted(true, plenty, R, blobs(1000, 125)));
        assert!(!blob_gc_wanted(true, plenty, R, blobs(1000, 124)));
        assert!(!blob_gc_wanted(true, plenty, R, blobs(0, 0)));
        // Free space: off below four reserves plus a quarter of the live bytes, on again
        // only above eight reserves plus half of them.
        let live = 400 * R;
        let b = blobs(live + 300 * R, 300 * R);
        assert!(!blob_gc_wanted(true, 4 * R + live / 4 - 1, R, b));
        assert!(blob_gc_wanted(true, 4 * R + live / 4, R, b));
        assert!(!blob_gc_wanted(false, 8 * R + live / 2, R, b));
        assert!(blob_gc_wanted(false, 8 * R + live / 2 + 1, R, b));
    }
}
