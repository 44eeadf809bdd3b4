//! Scrub: read every stored chunk, verify it against its hash, quarantine the damaged ones
//! and name the files (and offsets) that reference them.
//!
//! A quarantined chunk keeps its stored bytes (the evidence) and gets a `quarantine/` meta
//! record, which survives remounts: reads of it fail with EIO, and the next write of the same
//! content stores verified bytes in its place instead of deduplicating onto it (the record
//! goes in that batch). fsck keeps reporting the chunk until then.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{FsResult, Namespace, Txn};
use crate::format::{self, key, ExtentRecord};
use crate::ids::ChunkId;
use crate::kv::{Cf, Sync};
use crate::store::now_ns;

/// How far a scrub has come.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ScrubProgress {
    pub chunks: u64,
    pub total_chunks: u64,
    pub bytes: u64,
    pub total_bytes: u64,
    pub bad: u64,
    pub elapsed_ms: u64,
}

/// A chunk that failed verification, with what references it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BadChunk {
    pub chunk: String,
    pub problem: String,
    /// "PATH (inode N) at offset X" for each extent version naming the chunk; versions
    /// only snapshots see say so.
    pub references: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    pub chunks: u64,
    pub bytes: u64,
    pub bad: Vec<BadChunk>,
    pub elapsed_ms: u64,
}

/// How often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

impl Namespace {
    /// Chunks quarantined by earlier scrubs (or reads), to seed the suspect set at open.
    pub(crate) fn load_quarantine(&self) -> FsResult<()> {
        for item in self
            .kv
            .scan_prefix(Cf::Meta, format::meta::QUARANTINE_PREFIX)
        {
            let (k, _) = item?;
            if let Some(id) = key::parse_quarantine(&k) {
                self.chunks.mark_quarantined(&id);
            }
        }
        Ok(())
    }

    /// Verifies every stored chunk; see the module documentation.
    pub fn scrub(&self, progress: &mut dyn FnMut(&ScrubProgress)) -> FsResult<ScrubReport> {
        let started = Instant::now();
        let counters = self.counters();
        let mut p = ScrubProgress {
            total_chunks: counters.chunks,
            total_bytes: counters.stored_bytes,
            ..ScrubProgress::default()
        };
        let mut bad: HashMap<ChunkId, String> = HashMap::new();
        let mut last = Instant::now();
        for item in self.kv.scan_prefix(Cf::Chunk, b"") {
            let (k, v) = item?;
            p.chunks += 1;
            p.bytes += v.len() as u64;
            let Some(id) = ChunkId::from_slice(&k) else {
                bad.insert(
                    ChunkId([0; 32]),
                    format!("chunk key {} is not a hash", hex::encode(&k)),
                );
                continue;
            };
            if let Err(e) = self.chunks.verify(&id, &v) {
                tracing::error!("scrub: chunk {}: {e}", id.to_hex());
                bad.insert(id, e.to_string());
                p.bad += 1;
            }
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                p.elapsed_ms = started.elapsed().as_millis() as u64;
                progress(&p);
            }
        }
        p.elapsed_ms = started.elapsed().as_millis() as u64;
        progress(&p);
        let mut references: HashMap<ChunkId, Vec<String>> = HashMap::new();
        if !bad.is_empty() {
            let ids: HashSet<ChunkId> = bad.keys().copied().collect();
            for item in self.kv.scan_prefix(Cf::Extent, b"") {
                let (k, v) = item?;
                let (Some((ino, offset, birth)), Some(ext)) =
                    (key::parse_extent(&k), ExtentRecord::decode(&v))
                else {
                    continue;
                };
                if !ids.contains(&ext.chunk) {
                    continue;
                }
                let live = self
                    .read_newest(Cf::Extent, &key::extent_offset_prefix(ino, offset))?
                    .is_some_and(|(_, b)| b == birth);
                let mut what = format!("{} at offset {offset}", self.describe(ino));
                if !live {
                    what.push_str(&format!(
                        " (version born at epoch {}, kept for a snapshot)",
                        birth.0
                    ));
                }
                references.entry(ext.chunk).or_default().push(what);
            }
            let mut txn = Txn::new(Sync::Disk);
            let now = now_ns();
            for (id, problem) in &bad {
                let record = serde_json::json!({ "found_ns": now, "problem": problem });
                txn.batch.put(
                    &self.kv,
                    Cf::Meta,
                    &key::quarantine(id),
                    &serde_json::to_vec(&record).unwrap_or_default(),
                );
                self.chunks.mark_quarantined(id);
            }
            let mut st = self.commit.lock();
            self.apply(&mut st, txn, &|_| None)?;
        }
        let mut bad: Vec<BadChunk> = bad
            .into_iter()
            .map(|(id, problem)| BadChunk {
                chunk: id.to_hex(),
                problem,
                references: references.remove(&id).unwrap_or_default(),
            })
            .collect();
        bad.sort_by(|a, b| a.chunk.cmp(&b.chunk));
        Ok(ScrubReport {
            chunks: p.chunks,
            bytes: p.bytes,
            bad,
            elapsed_ms: p.elapsed_ms,
        })
    }
}
