//! Savings figures of a store and of each container.
//!
//! Store-wide and per-container totals come from the counters the namespace keeps exact
//! in every batch, so they cost nothing. What a container holds after dedup depends on
//! which chunks it shares with others, so that figure comes from a scan of the inode and
//! extent families (the distinct chunks of each container, each counted once there).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::format::{self, key, ExtentRecord, InodeRecord};
use crate::ids::{ChunkId, ContainerId, InodeNo};
use crate::kv::{Cf, Kv, KvError};
use crate::namespace::{ContainerRecord, Counters};

#[derive(Debug, Error)]
pub enum StatsError {
    #[error("{what} does not decode: {why}")]
    Corrupt { what: String, why: String },
    #[error(transparent)]
    Kv(#[from] KvError),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Bytes of file data as the files present them (holes excluded).
    pub logical_bytes: u64,
    /// Bytes the chunks take in the store, after dedup and compression.
    pub stored_bytes: u64,
    /// Bytes of the distinct chunks before compression.
    pub unique_bytes: u64,
    /// logical / unique: what deduplication alone saves.
    pub dedup_ratio: f64,
    /// unique / stored: what compression saves on top.
    pub compression_ratio: f64,
    /// 1 - stored / logical, in percent.
    pub savings_percent: f64,
    pub chunks: u64,
    pub files: u64,
    pub dirs: u64,
    pub containers: Vec<ContainerStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerStats {
    pub name: String,
    pub id: u32,
    pub logical_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    /// Stored bytes of the distinct chunks the container references, each counted once
    /// even when other containers share it; the sum over containers can exceed the store's.
    pub referenced_stored_bytes: u64,
    pub chunks: u64,
}

/// a / b, or 1 when there is nothing to divide (an empty store saves nothing).
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Reads the counters and container records, then scans extents for per-container figures.
pub fn stats(kv: &Kv) -> Result<StoreStats, StatsError> {
    let counters: Counters = match kv.get(Cf::Meta, format::meta::STORE_COUNTERS)? {
        None => Counters::default(),
        Some(v) => serde_json::from_slice(&v).map_err(|e| StatsError::Corrupt {
            what: "store counters".into(),
            why: e.to_string(),
        })?,
    };
    let mut records: Vec<ContainerRecord> = Vec::new();
    for item in kv.scan_prefix(Cf::Meta, format::meta::CONTAINER_PREFIX) {
        let (k, v) = item?;
        records.push(serde_json::from_slice(&v).map_err(|e| StatsError::Corrupt {
            what: format!("container record {}", hex::encode(&k)),
            why: e.to_string(),
        })?);
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));

    let chunks_of = referenced_chunks(kv)?;
    let mut stored_len: HashMap<ChunkId, u64> = HashMap::new();
    let mut containers = Vec::with_capacity(records.len());
    for rec in records {
        let mut bytes = 0;
        let ids = chunks_of.get(&rec.id);
        for id in ids.into_iter().flatten() {
            let len = match stored_len.get(id) {
                Some(len) => *len,
                None => {
                    let len = kv
                        .get(Cf::Chunk, &id.0)?
                        .map(|v| v.len() as u64)
                        .unwrap_or(0);
                    stored_len.insert(*id, len);
                    len
                }
            };
            bytes += len;
        }
        containers.push(ContainerStats {
            name: rec.name,
            id: rec.id.0,
            logical_bytes: rec.logical_bytes,
            files: rec.files,
            dirs: rec.dirs,
            referenced_stored_bytes: bytes,
            chunks: ids.map(|s| s.len() as u64).unwrap_or(0),
        });
    }

    let c = counters;
    Ok(StoreStats {
        logical_bytes: c.logical_bytes,
        stored_bytes: c.stored_bytes,
        unique_bytes: c.unique_bytes,
        dedup_ratio: ratio(c.logical_bytes, c.unique_bytes),
        compression_ratio: ratio(c.unique_bytes, c.stored_bytes),
        savings_percent: if c.logical_bytes == 0 {
            0.0
        } else {
            (1.0 - c.stored_bytes as f64 / c.logical_bytes as f64) * 100.0
        },
        chunks: c.chunks,
        files: c.files,
        dirs: c.dirs,
        containers,
    })
}

/// The distinct chunks referenced by each container's extents (every stored version).
fn referenced_chunks(kv: &Kv) -> Result<HashMap<ContainerId, HashSet<ChunkId>>, KvError> {
    let mut owner: HashMap<InodeNo, ContainerId> = HashMap::new();
    for item in kv.scan_prefix(Cf::Inode, b"") {
        let (k, v) = item?;
        let Some((ino, _)) = key::parse_inode(&k) else {
            continue;
        };
        // Newest version first: it decides the owner.
        if owner.contains_key(&ino) {
            continue;
        }
        if let Some(rec) = InodeRecord::decode(&v) {
            owner.insert(ino, rec.container);
        }
    }
    let mut out: HashMap<ContainerId, HashSet<ChunkId>> = HashMap::new();
    for item in kv.scan_prefix(Cf::Extent, b"") {
        let (k, v) = item?;
        let (Some((ino, _, _)), Some(e)) = (key::parse_extent(&k), ExtentRecord::decode(&v)) else {
            continue;
        };
        if let Some(cid) = owner.get(&ino) {
            out.entry(*cid).or_default().insert(e.chunk);
        }
    }
    Ok(out)
}

/// "1.5 GiB", "512 B": binary units, one decimal above bytes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl StoreStats {
    /// The figures for a human, one per line, containers in a table.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "logical data:      {}",
            human_bytes(self.logical_bytes)
        );
        let _ = writeln!(out, "unique data:       {}", human_bytes(self.unique_bytes));
        let _ = writeln!(out, "stored:            {}", human_bytes(self.stored_bytes));
        let _ = writeln!(out, "dedup ratio:       {:.2}x", self.dedup_ratio);
        let _ = writeln!(out, "compression ratio: {:.2}x", self.compression_ratio);
        let _ = writeln!(out, "savings:           {:.1}%", self.savings_percent);
        let _ = writeln!(
            out,
            "chunks: {}   files: {}   directories: {}",
            self.chunks, self.files, self.dirs
        );
        if !self.containers.is_empty() {
            let width = self
                .containers
                .iter()
                .map(|c| c.name.chars().count())
                .max()
                .unwrap_or(0)
                .max("container".len());
            let _ = writeln!(
                out,
                "\n{:<width$}  {:>10}  {:>10}  {:>8}  {:>8}",
                "container", "logical", "stored", "files", "dirs"
            );
            for c in &self.containers {
                let _ = writeln!(
                    out,
                    "{:<width$}  {:>10}  {:>10}  {:>8}  {:>8}",
                    c.name,
                    human_bytes(c.logical_bytes),
                    human_bytes(c.referenced_stored_bytes),
                    c.files,
                    c.dirs
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_df_h() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn ratios_of_nothing_are_one() {
        assert_eq!(ratio(0, 0), 1.0);
        assert_eq!(ratio(3, 2), 1.5);
    }
}
