//! dedupfs: a deduplicating filesystem for backup and secondary storage.
//!
//! Layers, bottom up (docs/ARCHITECTURE.md has the whole picture):
//! - [`kv`]: RocksDB column families; one batch per operation.
//! - [`chunking`]: FastCDC chunker, BLAKE3 hasher, zstd codec.
//! - [`chunk_store`]: chunks by hash with exact reference counts; verified reads.
//! - [`namespace`]: inodes, directory entries, extent maps, xattrs, containers.
//! - [`fuse`]: the FUSE adapter; [`daemon`] and [`control`]: a running mount.
//! - [`fsck`] and [`stats`] sit beside the namespace.
#![deny(clippy::unwrap_used)]

pub mod chunk_store;
pub mod chunking;
pub mod control;
pub mod daemon;
pub mod format;
pub mod fsck;
pub mod fuse;
pub mod ids;
pub mod ingest;
pub mod kv;
pub mod memory;
pub mod namespace;
pub mod restore;
pub mod retention;
pub mod stats;
pub mod store;
