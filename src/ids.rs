//! Identifier types. Ids are types, never bare integers or byte arrays in a signature.

use std::fmt;

/// BLAKE3-256 hash of a chunk's uncompressed bytes: the chunk's address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<ChunkId> {
        <[u8; 32]>::try_from(bytes).ok().map(ChunkId)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    /// The first 8 bytes in hex: enough to name a chunk in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(&self.0[..8]))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self)
    }
}

/// Inode number. Stable for the life of the store and never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct InodeNo(pub u64);

impl InodeNo {
    /// The mount root: its entries are the containers.
    pub const ROOT: InodeNo = InodeNo(1);
}

impl fmt::Display for InodeNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inode {}", self.0)
    }
}

/// A container: a top-level directory of the mount.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ContainerId(pub u32);

impl ContainerId {
    /// Owner of the mount root, which belongs to no container.
    pub const NONE: ContainerId = ContainerId(0);
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "container {}", self.0)
    }
}

/// Birth time of a versioned key. A container's live writes are born at its live epoch;
/// a snapshot freezes an epoch (see DESIGN.md, "Snapshots: epochs and dead lists").
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch of the mount root's own records, which no snapshot covers.
    pub const ROOT: Epoch = Epoch(0);
    /// The first live epoch of a new container.
    pub const FIRST: Epoch = Epoch(1);
}

/// A snapshot, numbered once per store and never reused: the number appears in the inode
/// numbers of the snapshot's view, which must stay stable across remounts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SnapshotId(pub u32);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "snapshot {}", self.0)
    }
}
