//! On-disk format: key layouts, value encodings and the constants they depend on.
//!
//! DO NOT MODIFY the byte layouts or constants here without bumping [`FORMAT_VERSION`] and
//! describing the change in docs/FORMAT.md. Integers are big-endian so that byte order is
//! numeric order; `!e` is the bitwise NOT of an epoch, so the newest version sorts first.
//!
//! | family   | key                                   | value                              |
//! |----------|---------------------------------------|------------------------------------|
//! | chunk    | hash(32)                              | codec(1) raw_len(4) payload        |
//! | refcount | hash(32)                              | count(8)                           |
//! | inode    | ino(8) !e(8)                          | tag(1) [attributes, symlink target]|
//! | dirent   | parent(8) name 0x00 !e(8)             | tag(1) [child ino(8) kind(1)]      |
//! | extent   | ino(8) offset(8) !e(8)                | tag(1) [hash(32) len(4)]           |
//! | xattr    | ino(8) name 0x00 !e(8)                | tag(1) [value]                     |
//! | deadlist | cid(4) kill(8) birth(8) family(1) key | empty                              |
//! | meta     | ascii name                            | see [`meta`]                       |
//!
//! A tag of [`TOMBSTONE`] hides the key at and after its epoch; [`LIVE`] carries a record.

use crate::ids::{ChunkId, ContainerId, Epoch, InodeNo};

/// Version of the layouts in this file. A store with a newer version is refused.
pub const FORMAT_VERSION: u32 = 2;

/// Oldest format this build opens. Version 1 had no snapshots; its records read unchanged.
pub const FORMAT_VERSION_MIN: u32 = 1;

pub const TOMBSTONE: u8 = 0;
pub const LIVE: u8 = 1;

/// Longest file or container name, as in Linux (NAME_MAX).
pub const NAME_MAX: usize = 255;

/// Names of records in the meta family.
pub mod meta {
    /// JSON [`crate::store::StoreConfig`]: format version, store id, chunking, compression.
    pub const CONFIG: &[u8] = b"config";
    /// Next inode number to hand out, u64. Numbers are never reused.
    pub const NEXT_INODE: &[u8] = b"next-inode";
    /// Next container id, u32.
    pub const NEXT_CONTAINER: &[u8] = b"next-container";
    /// Store-wide counters, JSON [`crate::namespace::Counters`].
    pub const STORE_COUNTERS: &[u8] = b"counters";
    /// Prefix of container records: `container/` id(4) -> JSON record.
    pub const CONTAINER_PREFIX: &[u8] = b"container/";
    /// Prefix of the orphan list: `orphan/` ino(8) -> empty. Inodes unlinked while open.
    pub const ORPHAN_PREFIX: &[u8] = b"orphan/";
    /// Prefix of snapshot records: `snapshot/` cid(4) epoch(8) -> JSON record.
    pub const SNAPSHOT_PREFIX: &[u8] = b"snapshot/";
    /// Prefix of quarantined chunks: `quarantine/` hash(32) -> JSON {found_ns, problem}.
    pub const QUARANTINE_PREFIX: &[u8] = b"quarantine/";
    /// Next snapshot id, u64 (ids fit in [`crate::ids::SnapshotId`]).
    pub const NEXT_SNAPSHOT: &[u8] = b"next-snapshot";
}

/// Family bytes of dead-list entries: which column family the dead version lives in.
pub mod family {
    pub const INODE: u8 = 1;
    pub const DIRENT: u8 = 2;
    pub const EXTENT: u8 = 3;
    pub const XATTR: u8 = 4;
}

fn not_epoch(e: Epoch) -> [u8; 8] {
    (!e.0).to_be_bytes()
}

fn epoch_of_suffix(key: &[u8]) -> Option<Epoch> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(Epoch(!u64::from_be_bytes(tail)))
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// Versioned keys: a prefix naming the object, then `!epoch`.
pub mod key {
    use super::*;

    pub fn versioned(prefix: &[u8], e: Epoch) -> Vec<u8> {
        let mut k = Vec::with_capacity(prefix.len() + 8);
        k.extend_from_slice(prefix);
        k.extend_from_slice(&not_epoch(e));
        k
    }

    /// Splits a versioned key into its object prefix and birth epoch.
    pub fn split_versioned(key: &[u8]) -> Option<(&[u8], Epoch)> {
        let e = epoch_of_suffix(key)?;
        Some((&key[..key.len() - 8], e))
    }

    pub fn inode_prefix(ino: InodeNo) -> [u8; 8] {
        ino.0.to_be_bytes()
    }

    pub fn inode(ino: InodeNo, e: Epoch) -> Vec<u8> {
        versioned(&inode_prefix(ino), e)
    }

    pub fn parse_inode(key: &[u8]) -> Option<(InodeNo, Epoch)> {
        if key.len() != 16 {
            return None;
        }
        Some((InodeNo(be_u64(key)?), epoch_of_suffix(key)?))
    }

    /// Prefix of every entry of directory `parent`.
    pub fn dir_prefix(parent: InodeNo) -> [u8; 8] {
        parent.0.to_be_bytes()
    }

    /// Prefix of every version of entry `name` in `parent`.
    pub fn dirent_prefix(parent: InodeNo, name: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(8 + name.len() + 1 + 8);
        k.extend_from_slice(&parent.0.to_be_bytes());
        k.extend_from_slice(name);
        k.push(0);
        k
    }

    pub fn dirent(parent: InodeNo, name: &[u8], e: Epoch) -> Vec<u8> {
        versioned(&dirent_prefix(parent, name), e)
    }

    /// (parent, name, epoch) of a dirent or xattr key (same shape).
    pub fn parse_named(key: &[u8]) -> Option<(InodeNo, &[u8], Epoch)> {
        if key.len() < 8 + 1 + 8 || key[key.len() - 9] != 0 {
            return None;
        }
        let owner = InodeNo(be_u64(key)?);
        let name = &key[8..key.len() - 9];
        if name.contains(&0) {
            return None;
        }
        Some((owner, name, epoch_of_suffix(key)?))
    }

    pub fn xattr_prefix(ino: InodeNo, name: &[u8]) -> Vec<u8> {
        dirent_prefix(ino, name)
    }

    pub fn xattr(ino: InodeNo, name: &[u8], e: Epoch) -> Vec<u8> {
        dirent(ino, name, e)
    }

    pub fn extents_prefix(ino: InodeNo) -> [u8; 8] {
        ino.0.to_be_bytes()
    }

    pub fn extent(ino: InodeNo, offset: u64, e: Epoch) -> Vec<u8> {
        let mut k = Vec::with_capacity(24);
        k.extend_from_slice(&ino.0.to_be_bytes());
        k.extend_from_slice(&offset.to_be_bytes());
        k.extend_from_slice(&not_epoch(e));
        k
    }

    /// Prefix of every version of the extent at `offset`.
    pub fn extent_offset_prefix(ino: InodeNo, offset: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&ino.0.to_be_bytes());
        k[8..].copy_from_slice(&offset.to_be_bytes());
        k
    }

    pub fn parse_extent(key: &[u8]) -> Option<(InodeNo, u64, Epoch)> {
        if key.len() != 24 {
            return None;
        }
        Some((
            InodeNo(be_u64(key)?),
            be_u64(&key[8..])?,
            epoch_of_suffix(key)?,
        ))
    }

    pub fn container(id: ContainerId) -> Vec<u8> {
        let mut k = meta::CONTAINER_PREFIX.to_vec();
        k.extend_from_slice(&id.0.to_be_bytes());
        k
    }

    pub fn orphan(ino: InodeNo) -> Vec<u8> {
        let mut k = meta::ORPHAN_PREFIX.to_vec();
        k.extend_from_slice(&ino.0.to_be_bytes());
        k
    }

    /// Prefix of every snapshot record of a container.
    pub fn snapshots_prefix(cid: ContainerId) -> Vec<u8> {
        let mut k = meta::SNAPSHOT_PREFIX.to_vec();
        k.extend_from_slice(&cid.0.to_be_bytes());
        k
    }

    pub fn snapshot(cid: ContainerId, e: Epoch) -> Vec<u8> {
        let mut k = snapshots_prefix(cid);
        k.extend_from_slice(&e.0.to_be_bytes());
        k
    }

    /// Prefix of the dead list of epoch `kill` of a container: the versions a write at
    /// that epoch superseded while an older snapshot still sees them.
    pub fn deadlist_prefix(cid: ContainerId, kill: Epoch) -> [u8; 12] {
        let mut k = [0u8; 12];
        k[..4].copy_from_slice(&cid.0.to_be_bytes());
        k[4..].copy_from_slice(&kill.0.to_be_bytes());
        k
    }

    /// A dead-list entry; sorted by birth within a list, so that the versions born after
    /// a given epoch are one range.
    pub fn deadlist(
        cid: ContainerId,
        kill: Epoch,
        birth: Epoch,
        family: u8,
        version: &[u8],
    ) -> Vec<u8> {
        let mut k = Vec::with_capacity(21 + version.len());
        k.extend_from_slice(&deadlist_prefix(cid, kill));
        k.extend_from_slice(&birth.0.to_be_bytes());
        k.push(family);
        k.extend_from_slice(version);
        k
    }

    /// (container, kill epoch, birth epoch, family, version key) of a dead-list key.
    pub fn parse_deadlist(key: &[u8]) -> Option<(ContainerId, Epoch, Epoch, u8, &[u8])> {
        if key.len() < 21 + 8 {
            return None;
        }
        Some((
            ContainerId(be_u32(key)?),
            Epoch(be_u64(&key[4..])?),
            Epoch(be_u64(&key[12..])?),
            key[20],
            &key[21..],
        ))
    }

    pub fn quarantine(id: &ChunkId) -> Vec<u8> {
        let mut k = meta::QUARANTINE_PREFIX.to_vec();
        k.extend_from_slice(&id.0);
        k
    }

    pub fn parse_quarantine(key: &[u8]) -> Option<ChunkId> {
        ChunkId::from_slice(key.strip_prefix(meta::QUARANTINE_PREFIX)?)
    }

    pub fn parse_orphan(key: &[u8]) -> Option<InodeNo> {
        let rest = key.strip_prefix(meta::ORPHAN_PREFIX)?;
        if rest.len() != 8 {
            return None;
        }
        Some(InodeNo(be_u64(rest)?))
    }
}

/// Kinds of inode, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn to_byte(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDev => 6,
            Kind::BlockDev => 7,
        }
    }

    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return None,
        })
    }

    /// The S_IFMT bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// Attributes of an inode: the `inode` family's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRecord {
    pub kind: Kind,
    /// Permission bits (07777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Bytes of the file covered by chunks (size minus holes), for st_blocks.
    pub data_bytes: u64,
    /// Parent directory of a directory (for ".."); 0 for other kinds, which may have many.
    pub parent: InodeNo,
    /// Times in nanoseconds since the Unix epoch.
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub crtime: i64,
    pub nlink: u32,
    pub rdev: u32,
    pub generation: u64,
    pub container: ContainerId,
    /// Target of a symlink; empty for other kinds.
    pub target: Vec<u8>,
}

/// Fixed part of an encoded inode record: tag, kind, perm(2), uid, gid, size(8),
/// data_bytes(8), parent(8), four times(8), nlink, rdev, generation(8), container.
const INODE_FIXED: usize = 1 + 1 + 2 + 4 + 4 + 8 + 8 + 8 + 8 * 4 + 4 + 4 + 8 + 4;

impl InodeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(INODE_FIXED + self.target.len());
        v.push(LIVE);
        v.push(self.kind.to_byte());
        v.extend_from_slice(&self.perm.to_be_bytes());
        v.extend_from_slice(&self.uid.to_be_bytes());
        v.extend_from_slice(&self.gid.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        v.extend_from_slice(&self.data_bytes.to_be_bytes());
        v.extend_from_slice(&self.parent.0.to_be_bytes());
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            v.extend_from_slice(&t.to_be_bytes());
        }
        v.extend_from_slice(&self.nlink.to_be_bytes());
        v.extend_from_slice(&self.rdev.to_be_bytes());
        v.extend_from_slice(&self.generation.to_be_bytes());
        v.extend_from_slice(&self.container.0.to_be_bytes());
        v.extend_from_slice(&self.target);
        v
    }

    /// Decodes a live record; `None` for a tombstone or malformed bytes.
    pub fn decode(v: &[u8]) -> Option<InodeRecord> {
        if v.len() < INODE_FIXED || v[0] != LIVE {
            return None;
        }
        let i64_at = |at: usize| be_u64(&v[at..]).map(|x| x as i64);
        Some(InodeRecord {
            kind: Kind::from_byte(v[1])?,
            perm: u16::from_be_bytes([v[2], v[3]]),
            uid: be_u32(&v[4..])?,
            gid: be_u32(&v[8..])?,
            size: be_u64(&v[12..])?,
            data_bytes: be_u64(&v[20..])?,
            parent: InodeNo(be_u64(&v[28..])?),
            atime: i64_at(36)?,
            mtime: i64_at(44)?,
            ctime: i64_at(52)?,
            crtime: i64_at(60)?,
            nlink: be_u32(&v[68..])?,
            rdev: be_u32(&v[72..])?,
            generation: be_u64(&v[76..])?,
            container: ContainerId(be_u32(&v[84..])?),
            target: v[INODE_FIXED..].to_vec(),
        })
    }
}

/// A directory entry's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirentRecord {
    pub child: InodeNo,
    pub kind: Kind,
}

impl DirentRecord {
    pub fn encode(&self) -> [u8; 10] {
        let mut v = [0u8; 10];
        v[0] = LIVE;
        v[1..9].copy_from_slice(&self.child.0.to_be_bytes());
        v[9] = self.kind.to_byte();
        v
    }

    pub fn decode(v: &[u8]) -> Option<DirentRecord> {
        if v.len() != 10 || v[0] != LIVE {
            return None;
        }
        Some(DirentRecord {
            child: InodeNo(be_u64(&v[1..])?),
            kind: Kind::from_byte(v[9])?,
        })
    }
}

/// The chunk that starts at an extent key's offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentRecord {
    pub chunk: ChunkId,
    pub len: u32,
}

impl ExtentRecord {
    pub fn encode(&self) -> [u8; 37] {
        let mut v = [0u8; 37];
        v[0] = LIVE;
        v[1..33].copy_from_slice(&self.chunk.0);
        v[33..37].copy_from_slice(&self.len.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<ExtentRecord> {
        if v.len() != 37 || v[0] != LIVE {
            return None;
        }
        Some(ExtentRecord {
            chunk: ChunkId::from_slice(&v[1..33])?,
            len: be_u32(&v[33..])?,
        })
    }
}

/// True when a versioned value is a tombstone.
pub fn is_tombstone(v: &[u8]) -> bool {
    v.first() == Some(&TOMBSTONE)
}

/// Refcount values: a u64.
pub fn encode_count(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn decode_count(v: &[u8]) -> Option<u64> {
    if v.len() != 8 {
        return None;
    }
    be_u64(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newer_epochs_sort_first() {
        let old = key::inode(InodeNo(5), Epoch(1));
        let new = key::inode(InodeNo(5), Epoch(2));
        let next_ino = key::inode(InodeNo(6), Epoch(9));
        assert!(new < old);
        assert!(old < next_ino);
    }

    #[test]
    fn dirent_names_sort_and_do_not_collide() {
        let a = key::dirent(InodeNo(2), b"a", Epoch(1));
        let ab = key::dirent(InodeNo(2), b"ab", Epoch(1));
        assert!(a < ab);
        assert!(!ab.starts_with(&key::dirent_prefix(InodeNo(2), b"a")));
        assert_eq!(
            key::parse_named(&ab),
            Some((InodeNo(2), &b"ab"[..], Epoch(1)))
        );
    }

    #[test]
    fn extent_keys_sort_by_offset() {
        let a = key::extent(InodeNo(3), 10, Epoch(1));
        let b = key::extent(InodeNo(3), 1 << 40, Epoch(1));
        assert!(a < b);
        assert_eq!(key::parse_extent(&b), Some((InodeNo(3), 1 << 40, Epoch(1))));
    }

    proptest! {
        #[test]
        fn inode_record_round_trips(perm in 0u16..0o7777, size: u64, mtime: i64, nlink: u32,
                                    target in proptest::collection::vec(any::<u8>(), 0..64)) {
            let rec = InodeRecord {
                kind: Kind::Symlink, perm, uid: 7, gid: 8, size, data_bytes: 1, parent: InodeNo(2), atime: -5, mtime, ctime: 3,
                crtime: 4, nlink, rdev: 9, generation: 1, container: ContainerId(3), target,
            };
            prop_assert_eq!(InodeRecord::decode(&rec.encode()), Some(rec));
        }

        #[test]
        fn extent_record_round_trips(bytes: [u8; 32], len: u32) {
            let rec = ExtentRecord { chunk: ChunkId(bytes), len };
            prop_assert_eq!(ExtentRecord::decode(&rec.encode()), Some(rec));
        }

        #[test]
        fn garbage_never_panics(v in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = InodeRecord::decode(&v);
            let _ = DirentRecord::decode(&v);
            let _ = ExtentRecord::decode(&v);
            let _ = key::parse_named(&v);
            let _ = key::parse_extent(&v);
            let _ = key::parse_inode(&v);
        }
    }
}
