//! The daemon's memory budget and how it is shared out.
//!
//! Everything that grows with the work a mount does is bounded by a share of one budget
//! (`dedupfs mount --memory`): the database's write buffers, its block cache, the cache of
//! decompressed chunks and the pending writes of open files. What is left over pays for
//! the FUSE buffers, commit batches in flight and the code itself, so the daemon's
//! resident size stays near the budget however big the data set is.

/// The memory budget of one open store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    total: u64,
}

impl MemoryBudget {
    /// The default: measured peak RSS stays under 512 MiB through a multi-GiB ingest.
    pub const DEFAULT_BYTES: u64 = 256 << 20;
    /// Below this the database cannot keep a write buffer per column family.
    pub const MIN_BYTES: u64 = 64 << 20;

    /// A budget of `total` bytes; `None` below [`MemoryBudget::MIN_BYTES`].
    pub fn new(total: u64) -> Option<MemoryBudget> {
        (total >= Self::MIN_BYTES).then_some(MemoryBudget { total })
    }

    /// Tunes glibc's allocator for this budget; call before the store opens.
    ///
    /// Write buffers and chunk batches are tens of MiB, allocated and freed at every commit.
    /// Keep freed memory in the heap instead of returning it to the kernel, which would fault
    /// every page in again (measured: ~12% of the daemon's CPU time went to page faults), but
    /// only a quarter of the budget of it. Two arenas: glibc's default of 8 per core let
    /// each committing thread keep its own freed batches (measured: peak RSS 506 MiB with
    /// the default arenas, 243 MiB with two, same throughput, five writers).
    pub fn tune_malloc(&self) {
        // SAFETY: mallopt only changes allocator tuning parameters.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            let keep = (self.total() / 4).min(i32::MAX as u64) as libc::c_int;
            libc::mallopt(libc::M_TRIM_THRESHOLD, keep);
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// All memtables of the database together (RocksDB's `db_write_buffer_size`: past it,
    /// the biggest is flushed).
    pub fn write_buffers(&self) -> u64 {
        self.total * 3 / 8
    }

    /// One memtable of the chunk family, whose values are chunk payloads.
    pub fn chunk_write_buffer(&self) -> u64 {
        (self.write_buffers() / 3).min(64 << 20)
    }

    /// One memtable of any other family (keys and small records).
    pub fn record_write_buffer(&self) -> u64 {
        (self.write_buffers() / 16).clamp(1 << 20, 16 << 20)
    }

    /// The block cache shared by every family (index and data blocks of SST files).
    pub fn block_cache(&self) -> u64 {
        self.total / 16
    }

    /// Decompressed chunks kept for reads.
    pub fn chunk_cache(&self) -> u64 {
        self.total / 4
    }

    /// Pending (written, not committed) bytes of all open files together.
    pub fn pending_writes(&self) -> u64 {
        self.total / 8
    }
}

impl Default for MemoryBudget {
    fn default() -> MemoryBudget {
        MemoryBudget {
            total: Self::DEFAULT_BYTES,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shares_fit_in_the_budget() {
        for mib in [64u64, 256, 1024, 16 << 10] {
            let b = MemoryBudget::new(mib << 20).unwrap();
            let memtables_max = 2 * b.chunk_write_buffer() + 12 * b.record_write_buffer();
            let bounded = b.write_buffers().min(memtables_max);
            let sum = bounded + b.block_cache() + b.chunk_cache() + b.pending_writes();
            assert!(sum <= b.total(), "{mib} MiB: shares add up to {sum}");
        }
        assert!(MemoryBudget::new(MemoryBudget::MIN_BYTES - 1).is_none());
    }
}
