//! Chunk store: content-addressed chunks with exact reference counts.
//!
//! Reads are verified: the decompressed bytes are hashed again and compared with the
//! address. Reference counts change only inside a namespace commit (see
//! `namespace::commit`), which holds the commit lock while it reads and rewrites them, so
//! that a count reaching zero deletes the chunk in the same batch.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

use crate::chunking::{self, DecodeError};
use crate::format;
use crate::ids::ChunkId;
use crate::kv::{Cf, Kv, KvError};

#[derive(Debug, Error)]
pub enum ChunkError {
    #[error("chunk {0} is missing from the store")]
    Missing(ChunkId),
    #[error("chunk {0} does not decode: {1}")]
    Undecodable(ChunkId, DecodeError),
    #[error("chunk {0}: hash mismatch")]
    HashMismatch(ChunkId),
    #[error(transparent)]
    Kv(#[from] KvError),
}

#[derive(Clone)]
struct ChunkWeight;

impl quick_cache::Weighter<ChunkId, Arc<Vec<u8>>> for ChunkWeight {
    fn weight(&self, _key: &ChunkId, val: &Arc<Vec<u8>>) -> u64 {
        val.len() as u64 + 64
    }
}

pub struct ChunkStore {
    kv: Arc<Kv>,
    cache: quick_cache::sync::Cache<ChunkId, Arc<Vec<u8>>, ChunkWeight>,
    /// Reads that found a chunk whose bytes do not match its hash.
    pub corrupt_reads: AtomicU64,
    /// Chunks that failed verification since the store was opened. A write of the same
    /// content stores its bytes again instead of deduplicating onto the damaged copy.
    suspect: parking_lot::Mutex<HashSet<ChunkId>>,
}

impl ChunkStore {
    pub fn new(kv: Arc<Kv>, cache_bytes: u64) -> ChunkStore {
        let items = (cache_bytes / (64 * 1024)).max(16) as usize;
        ChunkStore {
            kv,
            cache: quick_cache::sync::Cache::with_weighter(items, cache_bytes, ChunkWeight),
            corrupt_reads: AtomicU64::new(0),
            suspect: parking_lot::Mutex::new(HashSet::new()),
        }
    }

    pub fn refcount(&self, id: &ChunkId) -> Result<u64, KvError> {
        Ok(self
            .kv
            .get(Cf::Refcount, &id.0)?
            .and_then(|v| format::decode_count(&v))
            .unwrap_or(0))
    }

    /// The chunk's bytes, verified against its hash.
    pub fn read(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>, ChunkError> {
        if let Some(hit) = self.cache.get(id) {
            return Ok(hit);
        }
        // Verified against the hash below, so RocksDB's own checksum is skipped.
        let raw = self
            .kv
            .get_checked_by_caller(Cf::Chunk, &id.0, |stored| self.verify(id, stored))?
            .ok_or(ChunkError::Missing(*id))??;
        let raw = Arc::new(raw);
        self.cache.insert(*id, raw.clone());
        Ok(raw)
    }

    /// Decodes stored bytes and checks them against `id`.
    pub fn verify(&self, id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>, ChunkError> {
        let raw = chunking::decode(stored).map_err(|e| {
            self.mark_suspect(id);
            ChunkError::Undecodable(*id, e)
        })?;
        if ChunkId::of(&raw) != *id {
            self.mark_suspect(id);
            return Err(ChunkError::HashMismatch(*id));
        }
        Ok(raw)
    }

    fn mark_suspect(&self, id: &ChunkId) {
        self.corrupt_reads.fetch_add(1, Ordering::Relaxed);
        self.suspect.lock().insert(*id);
    }

    /// Marks a chunk quarantined (by scrub, or at open from its record) without counting a
    /// read: a later write of its content stores verified bytes in its place.
    pub fn mark_quarantined(&self, id: &ChunkId) {
        self.suspect.lock().insert(*id);
    }

    /// True when the stored copy of `id` failed verification: its bytes must be stored
    /// again by the next write that produces them.
    pub fn is_suspect(&self, id: &ChunkId) -> bool {
        self.suspect.lock().contains(id)
    }

    /// The stored copy of `id` was replaced by verified bytes.
    pub fn repaired(&self, id: &ChunkId) {
        self.suspect.lock().remove(id);
        self.cache.remove(id);
    }

    /// Drops every cached chunk, so that the next reads verify stored bytes again.
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// Drops a chunk from the cache and the suspect set (after it was reclaimed).
    pub fn forget(&self, id: &ChunkId) {
        self.cache.remove(id);
        self.suspect.lock().remove(id);
    }
}
