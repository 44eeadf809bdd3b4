//! kv: the only module that names `rocksdb`.
//!
//! The store is one RocksDB database with one column family per record kind (see
//! docs/FORMAT.md). Every filesystem operation is one [`Batch`] written with [`Kv::write`].
//! A failed write poisons the handle: every later write is refused until the store is
//! reopened, because after a failed write or fsync the engine's state cannot be trusted.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use crate::memory::MemoryBudget;

#[derive(Debug, Error)]
pub enum KvError {
    #[error("store is locked by another process (is it mounted?)")]
    Locked,
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("store was poisoned by an earlier failed write; remount to recover")]
    Poisoned,
    #[error("no space left on the device that holds the store")]
    NoSpace,
}

impl KvError {
    fn from_engine(e: rocksdb::Error) -> KvError {
        let text = e.into_string();
        if text.contains("No space left") {
            KvError::NoSpace
        } else if text.contains("lock") && text.contains("LOCK") {
            KvError::Locked
        } else {
            KvError::Engine(text)
        }
    }
}

pub type Result<T> = std::result::Result<T, KvError>;

/// A key and its value, as a scan yields them.
pub type Entry = (Box<[u8]>, Box<[u8]>);

/// Column families, one per record kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cf {
    Chunk,
    Refcount,
    Inode,
    Dirent,
    Extent,
    Xattr,
    Deadlist,
    Meta,
}

impl Cf {
    pub const ALL: [Cf; 8] = [
        Cf::Chunk,
        Cf::Refcount,
        Cf::Inode,
        Cf::Dirent,
        Cf::Extent,
        Cf::Xattr,
        Cf::Deadlist,
        Cf::Meta,
    ];

    /// On-disk names: part of the format, do not change.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Chunk => "chunk",
            Cf::Refcount => "refcount",
            Cf::Inode => "inode",
            Cf::Dirent => "dirent",
            Cf::Extent => "extent",
            Cf::Xattr => "xattr",
            Cf::Deadlist => "deadlist",
            Cf::Meta => "meta",
        }
    }
}

/// Writes that commit together or not at all.
#[derive(Default)]
pub struct Batch {
    inner: rocksdb::WriteBatch,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn put(&mut self, kv: &Kv, cf: Cf, key: &[u8], value: &[u8]) {
        self.inner.put_cf(kv.cf(cf), key, value);
    }

    pub fn delete(&mut self, kv: &Kv, cf: Cf, key: &[u8]) {
        self.inner.delete_cf(kv.cf(cf), key);
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

pub struct Kv {
    db: rocksdb::DB,
    poisoned: AtomicBool,
    faults: Faults,
}

/// Fault injection, for tests of what a failing disk does: read from the environment at
/// open. `DEDUPFS_FAIL_WRITES_AFTER=N`: writes after the first N fail as an I/O error
/// would; `DEDUPFS_FAIL_SYNC=1`: every WAL sync fails, and so does every write that must
/// reach the disk before it returns (fsync).
struct Faults {
    /// Writes still allowed; negative when no fault is armed.
    writes_left: std::sync::atomic::AtomicI64,
    fail_sync: bool,
}

impl Faults {
    fn from_env() -> Faults {
        let writes_left = std::env::var("DEDUPFS_FAIL_WRITES_AFTER")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1);
        Faults {
            writes_left: std::sync::atomic::AtomicI64::new(writes_left),
            fail_sync: std::env::var_os("DEDUPFS_FAIL_SYNC").is_some_and(|v| v == "1"),
        }
    }

    /// An injected failure for this write, if one is due.
    fn write(&self) -> Option<KvError> {
        if self.writes_left.load(Ordering::Relaxed) < 0 {
            return None;
        }
        (self.writes_left.fetch_sub(1, Ordering::Relaxed) <= 0)
            .then(|| KvError::Engine("IO error: injected write failure".into()))
    }
}

/// See [`Kv::cursor`].
pub struct Cursor<'a> {
    it: rocksdb::DBRawIterator<'a>,
}

impl Cursor<'_> {
    /// Every entry from `start` on whose key begins with `prefix`, in key order, to `f`
    /// until it returns false.
    pub fn scan(
        &mut self,
        prefix: &[u8],
        start: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.it.seek(start);
        while self.it.valid() {
            match (self.it.key(), self.it.value()) {
                (Some(k), Some(v)) if k.starts_with(prefix) => {
                    if !f(k, v) {
                        return Ok(());
                    }
                }
                _ => break,
            }
            self.it.next();
        }
        self.it.status().map_err(KvError::from_engine)
    }
}

/// Durability of one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    /// In the WAL, which survives a crash of the process but not of the machine.
    Process,
    /// In the WAL and fsynced before the call returns.
    Disk,
}

impl Kv {
    /// Opens (or with `create`, creates) the database in `dir`, with the default memory
    /// budget.
    pub fn open(dir: &Path, create: bool) -> Result<Kv> {
        Kv::open_with(dir, create, &MemoryBudget::default())
    }

    /// Opens the database with its write buffers and block cache sized from `memory`.
    pub fn open_with(dir: &Path, create: bool, memory: &MemoryBudget) -> Result<Kv> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(create);
        opts.create_missing_column_families(create);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        // Flushes and compactions write blob files with O_DIRECT: chunk payloads already
        // went through the page cache once on their way into the WAL, and copying them into
        // it a second time cost the flush thread more than the disk write (measured: a
        // sequential write of new data 1.3x faster). Reads stay buffered.
        if create {
            // (RocksDB would create it, but the probe below needs it first.)
            std::fs::create_dir_all(dir).map_err(|e| KvError::Engine(e.to_string()))?;
        }
        opts.set_use_direct_io_for_flush_and_compaction(direct_io_works(dir));
        // Chunks are laid out in blob files in the order they were written, and restores
        // and backups read them back in about that order: let the kernel read ahead
        // (RocksDB's default advises random access, which turns readahead off).
        opts.set_advise_random_on_open(false);
        // Bounded memory: every family's memtables together stay under the budget's share
        // (past it RocksDB flushes the biggest), two memtables per family at most.
        opts.set_db_write_buffer_size(memory.write_buffers() as usize);
        opts.set_write_buffer_size(memory.record_write_buffer() as usize);
        opts.set_max_write_buffer_number(2);
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        // Chunk payloads pass through the WAL: bound it, so that families with little
        // traffic (inodes, meta) are flushed and old logs deleted instead of every written
        // byte being kept twice on disk until they fill their write buffers.
        opts.set_max_total_wal_size(128 << 20);
        // One block cache for every family (by default each would get its own).
        let cache = rocksdb::Cache::new_lru_cache(memory.block_cache() as usize)
            .map_err(KvError::from_engine)?;
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        // Reference counts are read by key, and most lookups of a first ingest miss (a
        // chunk not stored yet): a bloom filter answers those without reading the table's
        // blocks. The other families are read by prefix scans, which filters do not serve.
        // (Held with the table readers, as index blocks are: 1.25 bytes a chunk.)
        let mut refcount_table = rocksdb::BlockBasedOptions::default();
        refcount_table.set_block_cache(&cache);
        refcount_table.set_bloom_filter(10.0, false);
        let descriptors = Cf::ALL.iter().map(|cf| {
            let mut cf_opts = rocksdb::Options::default();
            cf_opts.set_block_based_table_factory(if *cf == Cf::Refcount {
                &refcount_table
            } else {
                &table
            });
            cf_opts.set_write_buffer_size(if *cf == Cf::Chunk {
                memory.chunk_write_buffer() as usize
            } else {
                memory.record_write_buffer() as usize
            });
            cf_opts.set_max_write_buffer_number(2);
            cf_opts.set_compression_type(rocksdb::DBCompressionType::None);
            if *cf == Cf::Chunk {
                // Chunk payloads are large and already compressed: keep them out of the LSM
                // tree so compactions move only keys.
                cf_opts.set_enable_blob_files(true);
                cf_opts.set_min_blob_size(1024);
                // Garbage collection starts off: the namespace turns it on while enough
                // of the blob bytes are garbage (see `Namespace::adjust_blob_gc`), because
                // it relocates the live chunks of old blob files at every compaction,
                // garbage or not. When on, compactions relocate the live chunks of the
                // older half of blob files, and a blob file more than a quarter garbage
                // gets a compaction of its own even if nothing else is written.
                cf_opts.set_enable_blob_gc(false);
                cf_opts.set_blob_gc_age_cutoff(0.5);
                cf_opts.set_blob_gc_force_threshold(0.25);
                // Relocation reads blob files in order (with O_DIRECT when flushes use it).
                cf_opts.set_blob_compaction_readahead_size(2 << 20);
            }
            rocksdb::ColumnFamilyDescriptor::new(cf.name(), cf_opts)
        });
        let db = rocksdb::DB::open_cf_descriptors(&opts, dir, descriptors)
            .map_err(KvError::from_engine)?;
        Ok(Kv {
            db,
            poisoned: AtomicBool::new(false),
            faults: Faults::from_env(),
        })
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        // Every family is created at open, so the handle always exists.
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(cf.name())
            .expect("column family opened at start")
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf(self.cf(cf), key)
            .map_err(KvError::from_engine)
    }

    /// Runs `f` on the value of `key`, read without RocksDB's checksum of it: for values
    /// the caller verifies itself (chunk payloads, checked against their BLAKE3 hash). That
    /// check is a CRC32C over every byte, which Debian's portable build computes in
    /// software: measured, a third of the daemon's CPU time on a cold sequential read.
    /// The value is not copied out of RocksDB's buffer.
    pub fn get_checked_by_caller<T>(
        &self,
        cf: Cf,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>> {
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_verify_checksums(false);
        let value = self
            .db
            .get_pinned_cf_opt(self.cf(cf), key, &opts)
            .map_err(KvError::from_engine)?;
        Ok(value.map(|v| f(&v)))
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Marks the store untrustworthy: later writes are refused.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    pub fn write(&self, batch: Batch, sync: Sync) -> Result<()> {
        if self.is_poisoned() {
            return Err(KvError::Poisoned);
        }
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(sync == Sync::Disk);
        let injected = self.faults.write().or_else(|| {
            (self.faults.fail_sync && sync == Sync::Disk)
                .then(|| KvError::Engine("IO error: injected sync failure".into()))
        });
        let written = match injected {
            Some(injected) => Err(injected),
            None => self
                .db
                .write_opt(batch.inner, &opts)
                .map_err(KvError::from_engine),
        };
        written.map_err(|err| {
            // After a failed write RocksDB's log writer is in an error state (Debian's build
            // even aborts on the next append), so stop writing, whatever the cause. The
            // namespace keeps a free-space reserve so that a full disk is refused before it
            // gets here.
            self.poison();
            tracing::error!("store write failed, turning read-only until remounted: {err}");
            err
        })
    }

    /// Makes every write so far durable (fsync of the WAL).
    pub fn sync_wal(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(KvError::Poisoned);
        }
        let synced = if self.faults.fail_sync {
            Err(KvError::Engine("IO error: injected sync failure".into()))
        } else {
            self.db.flush_wal(true).map_err(KvError::from_engine)
        };
        synced.map_err(|err| {
            // After a failed fsync the kernel may have dropped the dirty pages: what the
            // log holds cannot be trusted any more (the fsyncgate lesson).
            self.poison();
            tracing::error!("store sync failed, turning read-only until remounted: {err}");
            err
        })
    }

    /// Flushes memtables to table files (used at clean shutdown so reopening is quick).
    pub fn flush(&self) -> Result<()> {
        for cf in Cf::ALL {
            self.db
                .flush_cf(self.cf(cf))
                .map_err(KvError::from_engine)?;
        }
        Ok(())
    }

    /// Gives the space of deleted records back to the filesystem now: flushes memtables
    /// (so old log files go) and compacts the chunk family, which drops deleted chunks and
    /// garbage-collects blob files. Costs I/O proportional to the chunk index, not the data.
    pub fn reclaim_space(&self) -> Result<()> {
        self.flush()?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(self.cf(Cf::Chunk), None::<&[u8]>, None::<&[u8]>, &opts);
        Ok(())
    }

    /// Stops background flushes and compactions, a running manual compaction included, and
    /// waits for them: for a clean shutdown only, the database writes nothing after it.
    pub fn cancel_background_work(&self) {
        self.db.cancel_all_background_work(true);
    }

    /// Turns the relocation of live chunks out of old blob files on or off (it starts off).
    /// Relocation writes before it frees, so on a nearly full disk it could itself run
    /// RocksDB out of space; blob files whose chunks are all deleted are dropped either way.
    pub fn set_blob_gc(&self, enabled: bool) -> Result<()> {
        let value = if enabled { "true" } else { "false" };
        self.db
            .set_options_cf(
                self.cf(Cf::Chunk),
                &[("enable_blob_garbage_collection", value)],
            )
            .map_err(KvError::from_engine)
    }

    /// Bytes of the chunk family's blob files, and how many of them hold deleted chunks
    /// (counted once a compaction has dropped their keys).
    pub fn blob_space(&self) -> BlobSpace {
        let int = |name: &str| {
            self.db
                .property_int_value_cf(self.cf(Cf::Chunk), name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        BlobSpace {
            bytes: int("rocksdb.live-blob-file-size"),
            garbage: int("rocksdb.live-blob-file-garbage-size"),
        }
    }

    /// Key-value pairs whose key starts with `prefix`, from `start` (which must itself start
    /// with `prefix`) onwards, in key order.
    pub fn scan_from<'a>(
        &'a self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
    ) -> impl Iterator<Item = Result<Entry>> + 'a {
        let mut opts = rocksdb::ReadOptions::default();
        if let Some(upper) = prefix_upper_bound(prefix) {
            opts.set_iterate_upper_bound(upper);
        }
        let mode = rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward);
        self.db
            .iterator_cf_opt(self.cf(cf), opts, mode)
            .map(|item| item.map_err(KvError::from_engine))
    }

    /// A cursor over `cf` for many lookups in a row: one iterator, sought again for each
    /// key, instead of one iterator per lookup (creating one is most of a lookup's cost).
    /// It sees the database as it was when it was made.
    pub fn cursor(&self, cf: Cf) -> Cursor<'_> {
        Cursor {
            it: self.db.raw_iterator_cf(self.cf(cf)),
        }
    }

    pub fn scan_prefix<'a>(
        &'a self,
        cf: Cf,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<Entry>> + 'a {
        self.scan_from(cf, prefix, prefix)
    }

    /// Approximate bytes on disk, for statfs and stats.
    pub fn live_files_size(&self) -> u64 {
        self.db
            .property_int_value("rocksdb.total-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0)
            + self
                .db
                .property_int_value("rocksdb.total-blob-file-size")
                .ok()
                .flatten()
                .unwrap_or(0)
    }
}

/// Whether files in `dir` can be written with O_DIRECT (tmpfs before Linux 6.6 and some
/// FUSE filesystems refuse it), found by writing one aligned block to a scratch file.
fn direct_io_works(dir: &Path) -> bool {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 4096;
    let probe = dir.join("direct-io-probe");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let works = file.is_ok_and(|mut file| {
        // An aligned buffer: a Vec of u64 blocks is aligned to 8 only, so take a
        // BLOCK-aligned window of a bigger one.
        let raw = vec![0u8; 2 * BLOCK];
        let skip = raw.as_ptr().align_offset(BLOCK);
        skip.checked_add(BLOCK)
            .and_then(|end| raw.get(skip..end))
            .is_some_and(|block| file.write_all(block).is_ok())
    });
    let _ = std::fs::remove_file(&probe);
    works
}

/// Space of the blob files that hold chunk payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlobSpace {
    pub bytes: u64,
    /// Bytes of deleted chunks still in those files.
    pub garbage: u64,
}

/// The smallest key greater than every key starting with `prefix`, if there is one.
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last != 0xff {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn upper_bound_of_prefix() {
        assert_eq!(prefix_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_upper_bound(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_upper_bound(&[0xff, 0xff]), None);
    }

    #[test]
    fn batch_is_atomic_and_prefix_scan_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Kv::open(dir.path(), true).unwrap();
        let mut batch = Batch::new();
        batch.put(&kv, Cf::Meta, b"a1", b"x");
        batch.put(&kv, Cf::Meta, b"a2", b"y");
        batch.put(&kv, Cf::Meta, b"b1", b"z");
        kv.write(batch, Sync::Disk).unwrap();
        let keys: Vec<_> = kv
            .scan_prefix(Cf::Meta, b"a")
            .map(|r| r.unwrap().0.to_vec())
            .collect();
        assert_eq!(keys, vec![b"a1".to_vec(), b"a2".to_vec()]);
    }
    #[test]
    fn direct_io_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        direct_io_works(dir.path());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(!direct_io_works(&dir.path().join("missing")));
    }

    #[test]
    fn blob_garbage_is_counted_and_collected_when_turned_on() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Kv::open(dir.path(), true).unwrap();
        // Two blob files' worth of payloads, then every other one deleted: both files are
        // half garbage, so neither can be dropped whole.
        let value = |i: u32| vec![i as u8; 64 << 10];
        for round in 0..2u32 {
            let mut batch = Batch::new();
            for i in round * 64..(round + 1) * 64 {
                batch.put(&kv, Cf::Chunk, &i.to_be_bytes(), &value(i));
            }
            kv.write(batch, Sync::Process).unwrap();
            kv.flush().unwrap();
        }
        let mut batch = Batch::new();
        for i in (0..128u32).step_by(2) {
            batch.delete(&kv, Cf::Chunk, &i.to_be_bytes());
        }
        kv.write(batch, Sync::Process).unwrap();
        let full = kv.blob_space();
        assert!(full.bytes >= 128 * (64 << 10), "{full:?}");

        // Collection off: a compaction counts the garbage but keeps the files.
        kv.reclaim_space().unwrap();
        let counted = kv.blob_space();
        assert_eq!(counted.bytes, full.bytes, "{counted:?}");
        assert!(counted.garbage * 2 >= full.bytes * 9 / 10, "{counted:?}");

        // Collection on: each compaction relocates the live chunks of the older half of
        // the blob files, whose old files then go.
        kv.set_blob_gc(true).unwrap();
        kv.reclaim_space().unwrap();
        kv.reclaim_space().unwrap();
        let collected = kv.blob_space();
        assert!(collected.bytes * 2 <= full.bytes * 11 / 10, "{collected:?}");
        assert!(collected.garbage < counted.garbage / 10, "{collected:?}");
        for i in 0..128u32 {
            let got = kv.get(Cf::Chunk, &i.to_be_bytes()).unwrap();
            assert_eq!(got, (i % 2 == 1).then(|| value(i)), "key {i}");
        }
    }
}
