//! Snapshots: epochs and dead lists (DESIGN.md, "Snapshots: epochs and dead lists").
//!
//! A container's live writes are born at its live epoch L. Taking a snapshot records L and
//! moves the container to L+1; nothing is copied. When a live write supersedes (or deletes)
//! a version born at b, the version goes at once, releasing its chunks, if no snapshot sees
//! it (b later than the newest snapshot); otherwise it stays and is entered on the dead
//! list of epoch L. What must hold, and what fsck checks:
//! - of the versions of one object, only the newest may be born after the container's
//!   newest snapshot; every other version is on exactly one dead list;
//! - a dead-list entry of kill epoch k names an existing version born at b < k that some
//!   snapshot s with b <= s < k sees;
//! - a container without snapshots holds only newest versions and no tombstones.
//!
//! Every function that stages versions runs under the commit lock, so that the epochs it
//! reads cannot change before its batch is applied.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{check_name, Attr, FsError, FsResult, Namespace, Txn};
use crate::format::{self, family, key, DirentRecord, ExtentRecord, InodeRecord, Kind};
use crate::ids::{ChunkId, ContainerId, Epoch, InodeNo, SnapshotId};
use crate::kv::{Cf, Sync};
use crate::store::now_ns;

/// A snapshot: a container frozen at an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub container: ContainerId,
    pub name: String,
    pub epoch: Epoch,
    pub created_ns: i64,
    /// The container's live counters when the snapshot was taken.
    pub logical_bytes: u64,
    pub files: u64,
    pub dirs: u64,
}

/// What `snapshot list` shows for one snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotInfo {
    pub container: String,
    pub name: String,
    pub id: u32,
    pub created_ns: i64,
    pub logical_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    /// Bytes of file data that only this snapshot sees (before deduplication).
    pub exclusive_logical_bytes: u64,
    /// Stored bytes that deleting this snapshot would give back now.
    pub reclaimable_bytes: u64,
}

/// What deleting a snapshot removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotDeleted {
    /// Object versions that only the snapshot saw.
    pub versions: u64,
    /// Stored bytes of chunks that no version references any more.
    pub reclaimed_bytes: u64,
}

/// The epochs a live write in a container needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epochs {
    pub live: Epoch,
    /// Epoch of the container's newest snapshot.
    pub newest_snapshot: Option<Epoch>,
}

impl Epochs {
    /// True when no snapshot sees a version born at `birth` (it may go at once).
    fn unseen(&self, birth: Epoch) -> bool {
        self.newest_snapshot.is_none_or(|s| birth > s)
    }
}

/// Inode numbers of snapshot views: the snapshot's id in the high bits, the inode it shows
/// in the low ones. Live inode numbers stay below 2^40 (a trillion inodes), so the two
/// ranges never meet, and both parts are stored, so a view's numbers survive remounts.
const VIEW_SHIFT: u32 = 40;
const INO_MASK: u64 = (1 << VIEW_SHIFT) - 1;
/// The view id of `.snapshots` directories; no snapshot gets it.
const SNAPDIR_VIEW: u64 = (1 << (64 - VIEW_SHIFT)) - 1;
/// Largest snapshot id.
const SNAPSHOT_ID_MAX: u32 = (SNAPDIR_VIEW - 1) as u32;

/// Name under a container root that holds its snapshots (hidden from listings, as ZFS's
/// `.zfs`, so that `cp -a`, `rsync --delete` and `du` of a container do not walk them).
pub const SNAPSHOTS_DIR: &[u8] = b".snapshots";

/// What an inode number seen by the FUSE adapter addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum View {
    Live(InodeNo),
    /// `<container>/.snapshots`, named by the container's root inode.
    SnapshotsDir(InodeNo),
    Snapshot(SnapshotId, InodeNo),
}

impl View {
    pub fn of(ino: InodeNo) -> View {
        let view = ino.0 >> VIEW_SHIFT;
        let inner = InodeNo(ino.0 & INO_MASK);
        match view {
            0 => View::Live(ino),
            SNAPDIR_VIEW => View::SnapshotsDir(inner),
            id => View::Snapshot(SnapshotId(id as u32), inner),
        }
    }

    pub fn ino(self) -> InodeNo {
        match self {
            View::Live(ino) => ino,
            View::SnapshotsDir(root) => InodeNo((SNAPDIR_VIEW << VIEW_SHIFT) | root.0),
            View::Snapshot(id, ino) => InodeNo(((id.0 as u64) << VIEW_SHIFT) | ino.0),
        }
    }
}

/// True when `ino` belongs to a read-only snapshot view.
pub fn is_snapshot_ino(ino: InodeNo) -> bool {
    ino.0 >> VIEW_SHIFT != 0
}

/// A snapshot file opened for reading: its extents at the snapshot's epoch.
/// Snapshot files up to this size read without an open have their whole extent map loaded
/// and kept (at most ~16k extents at the smallest chunks); bigger ones are read a range of
/// extents at a time.
const WHOLE_MAP_MAX_BYTES: u64 = 256 << 20;
/// Snapshot files read without an open whose extent maps stay in memory, at most.
const RECENT_SNAP_FILES: usize = 8;
/// Extents those maps hold together, at most (~50 MiB; 64 GiB of file data at 64 KiB chunks),
/// unless the newest alone holds more.
const RECENT_SNAP_EXTENTS: usize = 1 << 20;

pub(crate) struct SnapFile {
    pub size: u64,
    pub extents: BTreeMap<u64, ExtentRecord>,
}

pub(crate) fn family_of(cf: Cf) -> u8 {
    match cf {
        Cf::Inode => family::INODE,
        Cf::Dirent => family::DIRENT,
        Cf::Extent => family::EXTENT,
        _ => family::XATTR,
    }
}

pub(crate) fn cf_of_family(f: u8) -> Option<Cf> {
    Some(match f {
        family::INODE => Cf::Inode,
        family::DIRENT => Cf::Dirent,
        family::EXTENT => Cf::Extent,
        family::XATTR => Cf::Xattr,
        _ => return None,
    })
}

/// Checks a snapshot name: a file name that the `CONTAINER@NAME:PATH` syntax can carry.
pub fn check_snapshot_name(name: &str) -> FsResult<()> {
    check_name(name.as_bytes())?;
    if name.contains('@') || name.contains(':') {
        return Err(FsError::Invalid);
    }
    Ok(())
}

/// A snapshot's default name: its creation time in UTC, e.g. `2026-11-22T15:04:05Z`.
pub fn default_snapshot_name(ns: i64) -> String {
    crate::retention::format_utc(ns).replace(':', "")
}

impl Namespace {
    pub(crate) fn load_snapshots(&self) -> FsResult<u32> {
        let mut map = self.snapshots.write();
        for item in self.kv.scan_prefix(Cf::Meta, format::meta::SNAPSHOT_PREFIX) {
            let (k, v) = item?;
            let rec: SnapshotRecord = serde_json::from_slice(&v).map_err(|e| {
                tracing::error!("snapshot record {} does not decode: {e}", hex::encode(&k));
                FsError::Io
            })?;
            map.insert((rec.container, rec.epoch), rec);
        }
        let next = self
            .kv
            .get(Cf::Meta, format::meta::NEXT_SNAPSHOT)?
            .and_then(|v| format::decode_count(&v))
            .unwrap_or(1);
        Ok(next.min(SNAPSHOT_ID_MAX as u64 + 1) as u32)
    }

    pub(crate) fn epochs(&self, container: ContainerId) -> Epochs {
        let newest_snapshot = self
            .snapshots
            .read()
            .range((container, Epoch(0))..=(container, Epoch(u64::MAX)))
            .next_back()
            .map(|(_, s)| s.epoch);
        Epochs {
            live: self.live_epoch(container),
            newest_snapshot,
        }
    }

    /// Snapshots of a container, oldest first.
    pub fn snapshots_of(&self, container: ContainerId) -> Vec<SnapshotRecord> {
        self.snapshots
            .read()
            .range((container, Epoch(0))..=(container, Epoch(u64::MAX)))
            .map(|(_, s)| s.clone())
            .collect()
    }

    pub fn snapshot_by_name(&self, container: ContainerId, name: &str) -> Option<SnapshotRecord> {
        self.snapshots_of(container)
            .into_iter()
            .find(|s| s.name == name)
    }

    fn snapshot_by_id(&self, id: SnapshotId) -> Option<SnapshotRecord> {
        self.snapshots.read().values().find(|s| s.id == id).cloned()
    }

    /// Retires version `vkey` born at `birth`, which a live write supersedes: removed when
    /// no snapshot sees it, else entered on the dead list of the live epoch. True when
    /// removed (the caller releases what it referenced).
    fn retire(
        &self,
        txn: &mut Txn,
        cf: Cf,
        vkey: &[u8],
        birth: Epoch,
        container: ContainerId,
        ep: Epochs,
    ) -> bool {
        if ep.unseen(birth) {
            txn.batch.delete(&self.kv, cf, vkey);
            true
        } else {
            let entry = key::deadlist(container, ep.live, birth, family_of(cf), vkey);
            txn.batch.put(&self.kv, Cf::Deadlist, &entry, b"");
            false
        }
    }

    /// Versions of object `prefix`, newest first.
    fn versions(
        &self,
        cf: Cf,
        prefix: &[u8],
    ) -> impl Iterator<Item = FsResult<(Vec<u8>, Vec<u8>)>> + '_ {
        let len = prefix.len() + 8;
        self.kv
            .scan_prefix(cf, prefix)
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(FsError::from)
            })
            .filter(move |item| item.as_ref().map_or(true, |(k, _)| k.len() == len))
    }

    /// Stages `value` as the live version of object `prefix` of `cf` in `container`, or
    /// with `None` its deletion. Returns the superseded version's value when it was
    /// removed rather than kept for a snapshot, so that the caller releases its chunk.
    pub(crate) fn stage_version(
        &self,
        txn: &mut Txn,
        cf: Cf,
        prefix: &[u8],
        container: ContainerId,
        value: Option<&[u8]>,
    ) -> FsResult<Option<Vec<u8>>> {
        let ep = self.epochs(container);
        let mut versions = self.versions(cf, prefix);
        let Some((old_key, old_value)) = versions.next().transpose()? else {
            if let Some(v) = value {
                txn.batch
                    .put(&self.kv, cf, &key::versioned(prefix, ep.live), v);
            }
            return Ok(None);
        };
        if value.is_none() && format::is_tombstone(&old_value) {
            return Ok(None);
        }
        let birth = key::split_versioned(&old_key)
            .map(|(_, e)| e)
            .ok_or(FsError::Io)?;
        let new_key = key::versioned(prefix, ep.live);
        let removed = if value.is_some() && old_key == new_key && ep.unseen(birth) {
            // Rewritten in the epoch it was born in: the put below replaces it, and a delete
            // of the same key first would only cost the memtable another entry.
            true
        } else {
            self.retire(txn, cf, &old_key, birth, container, ep)
        };
        match value {
            Some(v) => txn.batch.put(&self.kv, cf, &new_key, v),
            None => {
                // A tombstone hides the versions that snapshots still see.
                if !removed || versions.next().transpose()?.is_some() {
                    txn.batch.put(&self.kv, cf, &new_key, &[format::TOMBSTONE]);
                }
            }
        }
        Ok(removed.then_some(old_value))
    }

    /// Retires a file's extent at `offset` born at `birth` (a commit replaces or drops
    /// it). `replaced`: a new extent starts at the same offset in the same batch. Returns
    /// true when the version was removed and its chunk must be released.
    pub(crate) fn retire_extent(
        &self,
        txn: &mut Txn,
        ino: InodeNo,
        offset: u64,
        birth: Epoch,
        container: ContainerId,
        replaced: bool,
    ) -> FsResult<bool> {
        let ep = self.epochs(container);
        let vkey = key::extent(ino, offset, birth);
        let removed = self.retire(txn, Cf::Extent, &vkey, birth, container, ep);
        if !replaced && ep.newest_snapshot.is_some() {
            // Older versions exist only while a snapshot does; hide them from the live view.
            let prefix = key::extent_offset_prefix(ino, offset);
            let older = self
                .versions(Cf::Extent, &prefix)
                .filter_map(|v| v.ok())
                .any(|(k, _)| key::split_versioned(&k).is_some_and(|(_, e)| e < birth));
            if !removed || older {
                txn.batch.put(
                    &self.kv,
                    Cf::Extent,
                    &key::extent(ino, offset, ep.live),
                    &[format::TOMBSTONE],
                );
            }
        }
        Ok(removed)
    }

    /// Stages a new extent at `offset`, retiring a tombstone there (possible only while
    /// the container has snapshots).
    pub(crate) fn put_extent(
        &self,
        txn: &mut Txn,
        ino: InodeNo,
        offset: u64,
        container: ContainerId,
        rec: &ExtentRecord,
        replaced: bool,
    ) -> FsResult<()> {
        let ep = self.epochs(container);
        if replaced || ep.newest_snapshot.is_none() {
            txn.batch.put(
                &self.kv,
                Cf::Extent,
                &key::extent(ino, offset, ep.live),
                &rec.encode(),
            );
            return Ok(());
        }
        let prefix = key::extent_offset_prefix(ino, offset);
        let removed =
            self.stage_version(txn, Cf::Extent, &prefix, container, Some(&rec.encode()))?;
        if let Some(old) = removed.as_deref().and_then(ExtentRecord::decode) {
            // Only a tombstone may stand at an offset that the commit did not retire.
            tracing::error!("{ino}: extent at {offset} replaced without being retired");
            txn.release(old.chunk);
        }
        Ok(())
    }

    /// Stages the removal of an unlinked inode from the live view: the record gets a
    /// tombstone; the newest version of every extent and xattr is retired (its chunk
    /// released when removed). Older versions are already on dead lists.
    pub(crate) fn stage_purge_versions(
        &self,
        txn: &mut Txn,
        ino: InodeNo,
        container: ContainerId,
    ) -> FsResult<i64> {
        let ep = self.epochs(container);
        self.stage_version(txn, Cf::Inode, &key::inode_prefix(ino), container, None)?;
        let mut logical = 0i64;
        for cf in [Cf::Extent, Cf::Xattr] {
            let mut last: Option<Vec<u8>> = None;
            for item in self.kv.scan_prefix(cf, &key::inode_prefix(ino)) {
                let (k, v) = item?;
                let Some((object, birth)) = key::split_versioned(&k) else {
                    continue;
                };
                if last.as_deref() == Some(object) {
                    continue;
                }
                last = Some(object.to_vec());
                if format::is_tombstone(&v) {
                    // Already gone from the live view; it stays, the newest version, until
                    // the older versions it hides go with their snapshots (a tombstone on a
                    // dead list could be dropped as hiding nothing while still listed).
                    continue;
                }
                let removed = self.retire(txn, cf, &k, birth, container, ep);
                if cf == Cf::Extent {
                    if let Some(ext) = ExtentRecord::decode(&v) {
                        logical += ext.len as i64;
                        if removed {
                            txn.release(ext.chunk);
                        }
                    }
                }
            }
        }
        Ok(logical)
    }

    /// Takes a snapshot of a container. Pending writes of its open files are committed
    /// first, so the snapshot holds everything written before the call.
    pub fn create_snapshot(&self, container: &str, name: Option<&str>) -> FsResult<SnapshotRecord> {
        let c = self.container_by_name(container).ok_or(FsError::NotFound)?;
        let now = now_ns();
        let name = match name {
            Some(n) => n.to_string(),
            None => default_snapshot_name(now),
        };
        check_snapshot_name(&name)?;
        self.commit_container_files(c.id)?;
        let mut st = self.commit.lock();
        let c = self.container(c.id).ok_or(FsError::NotFound)?;
        if self.snapshot_by_name(c.id, &name).is_some() {
            return Err(FsError::Exists);
        }
        if st.next_snapshot > SNAPSHOT_ID_MAX {
            tracing::error!("no snapshot ids left in this store");
            return Err(FsError::NoSpace);
        }
        let rec = SnapshotRecord {
            id: SnapshotId(st.next_snapshot),
            container: c.id,
            name,
            epoch: c.live_epoch,
            created_ns: now,
            logical_bytes: c.logical_bytes,
            files: c.files,
            dirs: c.dirs,
        };
        let mut moved = c.clone();
        moved.live_epoch = Epoch(c.live_epoch.0 + 1);
        let mut txn = Txn::new(Sync::Disk);
        txn.batch.put(
            &self.kv,
            Cf::Meta,
            &key::snapshot(c.id, rec.epoch),
            &serde_json::to_vec(&rec).unwrap_or_default(),
        );
        txn.batch
            .put(&self.kv, Cf::Meta, &key::container(c.id), &moved.encode());
        txn.batch.put(
            &self.kv,
            Cf::Meta,
            format::meta::NEXT_SNAPSHOT,
            &format::encode_count(st.next_snapshot as u64 + 1),
        );
        self.apply(&mut st, txn, &|_| None)?;
        st.next_snapshot += 1;
        self.containers.write().insert(c.id, moved);
        self.snapshots
            .write()
            .insert((c.id, rec.epoch), rec.clone());
        drop(st);
        self.forget_snapshot_name(c.root, &rec.name);
        Ok(rec)
    }

    /// Commits the pending writes of every open file of a container.
    pub(crate) fn commit_container_files(&self, container: ContainerId) -> FsResult<()> {
        let open: Vec<Arc<super::OpenFile>> = self.open_file_list();
        for f in open {
            if self
                .read_inode(f.ino)?
                .is_some_and(|(r, _)| r.container == container)
            {
                self.commit_open_file(&f, Sync::Process)?;
            }
        }
        Ok(())
    }

    /// Deletes a snapshot: removes every version that only it saw (releasing chunks) and
    /// hands its dead list to the next snapshot (or the live head). Costs what the
    /// snapshot alone holds, in one batch.
    pub fn delete_snapshot(&self, container: &str, name: &str) -> FsResult<SnapshotDeleted> {
        let c = self.container_by_name(container).ok_or(FsError::NotFound)?;
        let mut st = self.commit.lock();
        let s = self.snapshot_by_name(c.id, name).ok_or(FsError::NotFound)?;
        if self.mounted_snapshots.lock().contains_key(&s.id) {
            return Err(FsError::Busy);
        }
        if self
            .snap_files
            .lock()
            .keys()
            .any(|ino| match View::of(*ino) {
                View::Snapshot(id, _) => id == s.id,
                _ => false,
            })
        {
            return Err(FsError::Busy);
        }
        let (prev, next) = self.neighbours(c.id, s.epoch);
        let prev = prev.unwrap_or(Epoch(0));
        let mut txn = Txn::new(Sync::Disk);
        let mut deleted = SnapshotDeleted::default();
        let mut removed: HashSet<Vec<u8>> = HashSet::new();
        let mut objects: Vec<(u8, Vec<u8>)> = Vec::new();
        // 1. Versions the next epoch killed that were born after the previous snapshot:
        //    this one alone saw them.
        let list = key::deadlist_prefix(c.id, next);
        let mut start = list.to_vec();
        start.extend_from_slice(&(prev.0 + 1).to_be_bytes());
        for item in self.kv.scan_from(Cf::Deadlist, &list, &start) {
            let (k, _) = item?;
            let (_, _, _, fam, vkey) = key::parse_deadlist(&k).ok_or(FsError::Io)?;
            let cf = cf_of_family(fam).ok_or(FsError::Io)?;
            if let Some(v) = self.kv.get(cf, vkey)? {
                if cf == Cf::Extent {
                    if let Some(ext) = ExtentRecord::decode(&v) {
                        txn.release(ext.chunk);
                    }
                }
            }
            txn.batch.delete(&self.kv, cf, vkey);
            txn.batch.delete(&self.kv, Cf::Deadlist, &k);
            removed.insert([&[fam][..], vkey].concat());
            if let Some((object, _)) = key::split_versioned(vkey) {
                objects.push((fam, object.to_vec()));
            }
            deleted.versions += 1;
        }
        // A tombstone left alone, hiding nothing, goes too.
        objects.sort();
        objects.dedup();
        for (fam, object) in objects {
            let cf = cf_of_family(fam).ok_or(FsError::Io)?;
            let remaining: Vec<(Vec<u8>, Vec<u8>)> = self
                .versions(cf, &object)
                .filter(|v| {
                    v.as_ref()
                        .map_or(true, |(k, _)| !removed.contains(&[&[fam][..], k].concat()))
                })
                .collect::<FsResult<_>>()?;
            if let [(k, v)] = remaining.as_slice() {
                if format::is_tombstone(v) {
                    txn.batch.delete(&self.kv, cf, k);
                }
            }
        }
        // 2. Versions older snapshots still see move to the next list.
        let own = key::deadlist_prefix(c.id, s.epoch);
        for item in self.kv.scan_prefix(Cf::Deadlist, &own) {
            let (k, _) = item?;
            let (_, _, birth, fam, vkey) = key::parse_deadlist(&k).ok_or(FsError::Io)?;
            txn.batch.delete(&self.kv, Cf::Deadlist, &k);
            txn.batch.put(
                &self.kv,
                Cf::Deadlist,
                &key::deadlist(c.id, next, birth, fam, vkey),
                b"",
            );
        }
        // 3. The record.
        txn.batch
            .delete(&self.kv, Cf::Meta, &key::snapshot(c.id, s.epoch));
        let stored_before = st.counters.stored_bytes;
        self.apply(&mut st, txn, &|_| None)?;
        deleted.reclaimed_bytes = stored_before.saturating_sub(st.counters.stored_bytes);
        self.snapshots.write().remove(&(c.id, s.epoch));
        // After the removal: a read loading a map meanwhile sees the snapshot gone.
        self.forget_snap_files(s.id);
        drop(st);
        self.forget_snapshot_name(c.root, &s.name);
        Ok(deleted)
    }

    /// The kernel must look `.snapshots/NAME` of a container up again: the name now
    /// names another snapshot, or none.
    fn forget_snapshot_name(&self, root: InodeNo, name: &str) {
        let dir = View::SnapshotsDir(root).ino();
        self.invalidate(&[
            super::Invalidation::Entry(dir, name.as_bytes().to_vec()),
            super::Invalidation::Inode(dir),
        ]);
    }

    /// Epochs of the snapshots before and after `epoch` (the live epoch when none after).
    fn neighbours(&self, container: ContainerId, epoch: Epoch) -> (Option<Epoch>, Epoch) {
        let snaps = self.snapshots.read();
        let prev = snaps
            .range((container, Epoch(0))..(container, epoch))
            .next_back()
            .map(|(_, s)| s.epoch);
        let next = snaps
            .range((container, Epoch(epoch.0 + 1))..=(container, Epoch(u64::MAX)))
            .next()
            .map(|(_, s)| s.epoch)
            .unwrap_or_else(|| self.live_epoch(container));
        (prev, next)
    }

    /// The snapshots of a container with what each one alone holds.
    pub fn list_snapshots(&self, container: &str) -> FsResult<Vec<SnapshotInfo>> {
        let c = self.container_by_name(container).ok_or(FsError::NotFound)?;
        let mut out = Vec::new();
        for s in self.snapshots_of(c.id) {
            let (prev, next) = self.neighbours(c.id, s.epoch);
            let (exclusive, reclaimable) =
                self.exclusive_bytes(c.id, prev.unwrap_or(Epoch(0)), next)?;
            out.push(SnapshotInfo {
                container: c.name.clone(),
                name: s.name,
                id: s.id.0,
                created_ns: s.created_ns,
                logical_bytes: s.logical_bytes,
                files: s.files,
                dirs: s.dirs,
                exclusive_logical_bytes: exclusive,
                reclaimable_bytes: reclaimable,
            });
        }
        Ok(out)
    }

    /// Logical bytes of the extent versions only the snapshot between `prev` and `next`
    /// sees, and the stored bytes of the chunks that only those versions reference.
    fn exclusive_bytes(
        &self,
        container: ContainerId,
        prev: Epoch,
        next: Epoch,
    ) -> FsResult<(u64, u64)> {
        let list = key::deadlist_prefix(container, next);
        let mut start = list.to_vec();
        start.extend_from_slice(&(prev.0 + 1).to_be_bytes());
        let mut logical = 0u64;
        let mut uses: std::collections::HashMap<ChunkId, u64> = std::collections::HashMap::new();
        for item in self.kv.scan_from(Cf::Deadlist, &list, &start) {
            let (k, _) = item?;
            let Some((_, _, _, family::EXTENT, vkey)) = key::parse_deadlist(&k) else {
                continue;
            };
            if let Some(ext) = self
                .kv
                .get(Cf::Extent, vkey)?
                .as_deref()
                .and_then(ExtentRecord::decode)
            {
                logical += ext.len as u64;
                *uses.entry(ext.chunk).or_insert(0) += 1;
            }
        }
        let mut reclaimable = 0u64;
        for (id, n) in uses {
            if self.chunks.refcount(&id)? == n {
                reclaimable += self.kv.get(Cf::Chunk, &id.0)?.map_or(0, |v| v.len() as u64);
            }
        }
        Ok((logical, reclaimable))
    }

    // ---- reading a snapshot view ----

    /// Newest version of object `prefix` born at or before `at` (any when `None`).
    pub(crate) fn read_at(
        &self,
        cf: Cf,
        prefix: &[u8],
        at: Option<Epoch>,
    ) -> FsResult<Option<(Vec<u8>, Epoch)>> {
        let start = match at {
            Some(e) => key::versioned(prefix, e),
            None => prefix.to_vec(),
        };
        for item in self.kv.scan_from(cf, prefix, &start) {
            let (k, v) = item?;
            // Longer keys with this prefix belong to other objects (other names).
            if k.len() != prefix.len() + 8 {
                continue;
            }
            let Some((_, birth)) = key::split_versioned(&k) else {
                continue;
            };
            if format::is_tombstone(&v) {
                return Ok(None);
            }
            return Ok(Some((v.to_vec(), birth)));
        }
        Ok(None)
    }

    pub(crate) fn snapshot_epoch(&self, id: SnapshotId) -> FsResult<Epoch> {
        Ok(self.snapshot_of_view(id)?.epoch)
    }

    fn snapshot_of_view(&self, id: SnapshotId) -> FsResult<SnapshotRecord> {
        self.snapshot_by_id(id).ok_or(FsError::NotFound)
    }

    /// The container whose root is `root`.
    fn container_of_root(&self, root: InodeNo) -> FsResult<super::ContainerRecord> {
        self.containers
            .read()
            .values()
            .find(|c| c.root == root)
            .cloned()
            .ok_or(FsError::NotFound)
    }

    /// Attributes of a view's inode: the stored record at the snapshot's epoch, with inode
    /// numbers translated into the view.
    pub(crate) fn view_getattr(&self, view: View) -> FsResult<Attr> {
        match view {
            View::Live(ino) => self.getattr(ino),
            View::SnapshotsDir(root) => {
                let c = self.container_of_root(root)?;
                let mut rec = self.inode(root)?;
                let snaps = self.snapshots_of(c.id);
                rec.perm = 0o555;
                rec.size = 0;
                rec.data_bytes = 0;
                rec.nlink = 2 + snaps.len() as u32;
                rec.parent = root;
                if let Some(t) = snaps.last().map(|s| s.created_ns) {
                    rec.mtime = t;
                    rec.ctime = t;
                }
                Ok(Attr {
                    ino: view.ino(),
                    rec,
                })
            }
            View::Snapshot(id, ino) => {
                let s = self.snapshot_of_view(id)?;
                let (mut rec, _) = self.inode_at(ino, s.epoch)?.ok_or(FsError::NotFound)?;
                if rec.kind == Kind::Dir {
                    rec.parent = if rec.parent == InodeNo::ROOT {
                        View::SnapshotsDir(ino).ino()
                    } else {
                        View::Snapshot(id, rec.parent).ino()
                    };
                }
                Ok(Attr {
                    ino: view.ino(),
                    rec,
                })
            }
        }
    }

    pub(crate) fn inode_at(
        &self,
        ino: InodeNo,
        at: Epoch,
    ) -> FsResult<Option<(InodeRecord, Epoch)>> {
        match self.read_at(Cf::Inode, &key::inode_prefix(ino), Some(at))? {
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

    pub(crate) fn view_lookup(&self, parent: View, name: &[u8]) -> FsResult<Attr> {
        match parent {
            View::Live(_) => Err(FsError::Invalid),
            View::SnapshotsDir(root) => {
                let c = self.container_of_root(root)?;
                let name = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
                let s = self.snapshot_by_name(c.id, name).ok_or(FsError::NotFound)?;
                self.view_getattr(View::Snapshot(s.id, root))
            }
            View::Snapshot(id, dir) => {
                let s = self.snapshot_of_view(id)?;
                let v = self
                    .read_at(Cf::Dirent, &key::dirent_prefix(dir, name), Some(s.epoch))?
                    .ok_or(FsError::NotFound)?;
                let d = DirentRecord::decode(&v.0).ok_or(FsError::Io)?;
                self.view_getattr(View::Snapshot(id, d.child))
            }
        }
    }

    pub(crate) fn view_readdir(&self, dir: View) -> FsResult<Vec<super::DirEntry>> {
        match dir {
            View::Live(ino) => self.readdir(ino),
            View::SnapshotsDir(root) => {
                let c = self.container_of_root(root)?;
                Ok(self
                    .snapshots_of(c.id)
                    .into_iter()
                    .map(|s| super::DirEntry {
                        name: s.name.into_bytes(),
                        ino: View::Snapshot(s.id, root).ino(),
                        kind: Kind::Dir,
                    })
                    .collect())
            }
            View::Snapshot(id, ino) => {
                let s = self.snapshot_of_view(id)?;
                let rec = self.inode_at(ino, s.epoch)?.ok_or(FsError::NotFound)?.0;
                if rec.kind != Kind::Dir {
                    return Err(FsError::NotDir);
                }
                let mut entries = self.readdir_at(ino, Some(s.epoch))?;
                for e in &mut entries {
                    e.ino = View::Snapshot(id, e.ino).ino();
                }
                Ok(entries)
            }
        }
    }

    pub(crate) fn view_xattr(&self, ino: InodeNo, at: Epoch, name: &[u8]) -> FsResult<Vec<u8>> {
        match self.read_at(Cf::Xattr, &key::xattr_prefix(ino, name), Some(at))? {
            Some((v, _)) => super::ops::xattr_value(ino, name, &v),
            None => Err(FsError::NoAttr),
        }
    }

    /// Opens a snapshot file for reading: its extent map at the snapshot's epoch stays in
    /// memory until the last release.
    pub(crate) fn view_open(
        &self,
        view_ino: InodeNo,
        id: SnapshotId,
        ino: InodeNo,
    ) -> FsResult<()> {
        if let Some(entry) = self.snap_files.lock().get_mut(&view_ino) {
            entry.1 += 1;
            return Ok(());
        }
        let file = Arc::new(self.load_snap_file(id, ino)?);
        let mut open = self.snap_files.lock();
        open.entry(view_ino).or_insert((file, 0)).1 += 1;
        Ok(())
    }

    pub(crate) fn view_release(&self, view_ino: InodeNo) {
        let mut open = self.snap_files.lock();
        if let Some(entry) = open.get_mut(&view_ino) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                open.remove(&view_ino);
            }
        }
    }

    fn load_snap_file(&self, id: SnapshotId, ino: InodeNo) -> FsResult<SnapFile> {
        self.load_snap_range(id, ino, 0, u64::MAX)
    }

    /// [`Namespace::load_snap_file`] with only the extents that start in `[from, to)`.
    pub(super) fn load_snap_range(
        &self,
        id: SnapshotId,
        ino: InodeNo,
        from: u64,
        to: u64,
    ) -> FsResult<SnapFile> {
        let (epoch, rec) = self.snap_record(id, ino)?;
        self.snap_range(ino, epoch, &rec, from, to)
    }

    /// The epoch of snapshot `id` and the record of regular file `ino` in it.
    fn snap_record(&self, id: SnapshotId, ino: InodeNo) -> FsResult<(Epoch, InodeRecord)> {
        let s = self.snapshot_of_view(id)?;
        let (rec, _) = self.inode_at(ino, s.epoch)?.ok_or(FsError::NotFound)?;
        super::file::regular(&rec)?;
        Ok((s.epoch, rec))
    }

    fn snap_range(
        &self,
        ino: InodeNo,
        epoch: Epoch,
        rec: &InodeRecord,
        from: u64,
        to: u64,
    ) -> FsResult<SnapFile> {
        Ok(SnapFile {
            size: rec.size,
            extents: self.extents_at(ino, epoch, from, to)?,
        })
    }

    /// The extents of `ino` as epoch `at` sees them (the newest version of each offset born
    /// at or before it; `Epoch(u64::MAX)` for the live file), of those starting in
    /// `[from, to)`.
    pub(super) fn extents_at(
        &self,
        ino: InodeNo,
        at: Epoch,
        from: u64,
        to: u64,
    ) -> FsResult<BTreeMap<u64, ExtentRecord>> {
        let mut extents = BTreeMap::new();
        let mut last = None;
        let start = key::extent_offset_prefix(ino, from);
        for item in self
            .kv
            .scan_from(Cf::Extent, &key::extents_prefix(ino), &start)
        {
            let (k, v) = item?;
            let Some((_, offset, birth)) = key::parse_extent(&k) else {
                tracing::error!("{ino}: malformed extent key {}", hex::encode(&k));
                return Err(FsError::Io);
            };
            if offset >= to {
                break;
            }
            // Versions of one offset are adjacent, newest first.
            if birth > at || last == Some(offset) {
                continue;
            }
            last = Some(offset);
            if format::is_tombstone(&v) {
                continue;
            }
            extents.insert(offset, ExtentRecord::decode(&v).ok_or(FsError::Io)?);
        }
        Ok(extents)
    }

    /// Drops the extent maps kept for reads without an open of snapshot `id` (deleted, or
    /// no longer served by a restore mount). Snapshot ids are never reused: this frees
    /// memory, it does not make anything true again.
    pub(crate) fn forget_snap_files(&self, id: SnapshotId) {
        self.snap_recent
            .lock()
            .retain(|(ino, _)| !matches!(View::of(*ino), View::Snapshot(of, _) if of == id));
    }

    /// The extent map of a snapshot file being read: its open state, or one of the last few
    /// loaded for reads without an open, so that the reads of one file load it once. Those
    /// are kept while they hold at most `RECENT_SNAP_EXTENTS` extents together; the newest
    /// is kept whatever its size, as an open file's map would be.
    pub(super) fn snap_file(
        &self,
        view_ino: InodeNo,
        id: SnapshotId,
        ino: InodeNo,
    ) -> FsResult<Arc<SnapFile>> {
        if let Some(file) = self.kept_snap_file(view_ino) {
            return Ok(file);
        }
        Ok(self.keep_snap_file(view_ino, id, self.load_snap_file(id, ino)?))
    }

    /// Keeps `file`, loaded without the lock (another thread's read of the same file may
    /// have loaded it too), among the last few read.
    fn keep_snap_file(&self, view_ino: InodeNo, id: SnapshotId, file: SnapFile) -> Arc<SnapFile> {
        let file = Arc::new(file);
        let mut recent = self.snap_recent.lock();
        let live = self.snapshot_of_view(id).is_ok(); // not deleted meanwhile
        if live && !recent.iter().any(|(v, _)| *v == view_ino) {
            recent.push_front((view_ino, file.clone()));
            let mut extents = 0;
            let keep = recent
                .iter()
                .position(|(_, f)| {
                    extents += f.extents.len().max(1);
                    extents > RECENT_SNAP_EXTENTS
                })
                .map_or(recent.len(), |i| i.max(1))
                .min(RECENT_SNAP_FILES);
            recent.truncate(keep);
        }
        file
    }

    /// lseek(2) SEEK_DATA or SEEK_HOLE in a snapshot file (see [`Namespace::seek`]).
    pub(crate) fn view_seek(
        &self,
        view_ino: InodeNo,
        id: SnapshotId,
        ino: InodeNo,
        offset: u64,
        hole: bool,
    ) -> FsResult<u64> {
        let file = self.snap_file(view_ino, id, ino)?;
        let before = file.extents.range(..=offset).next_back();
        let ranges = before
            .into_iter()
            .chain(file.extents.range(offset.saturating_add(1)..))
            .map(|(s, e)| (*s, *s + e.len as u64))
            .filter(|(_, end)| *end > offset);
        super::file::seek_in(ranges, offset, file.size, hole)
    }

    /// The extent map of a snapshot file open or kept, if it is.
    fn kept_snap_file(&self, view_ino: InodeNo) -> Option<Arc<SnapFile>> {
        if let Some(f) = self.snap_files.lock().get(&view_ino).map(|e| e.0.clone()) {
            return Some(f);
        }
        let mut recent = self.snap_recent.lock();
        let i = recent.iter().position(|(v, _)| *v == view_ino)?;
        let entry = recent.remove(i)?;
        let file = entry.1.clone();
        recent.push_front(entry);
        Some(file)
    }

    /// The extents a read of `[offset, offset+len)` needs: the file's whole map as
    /// [`Namespace::snap_file`] keeps it, but for a big file neither open nor kept only the
    /// extents around the range. Several big files read at once without an open (a restore
    /// mount) would otherwise push each other's maps out and load them whole for every read.
    fn snap_extents_for_read(
        &self,
        view_ino: InodeNo,
        id: SnapshotId,
        ino: InodeNo,
        offset: u64,
        len: u64,
    ) -> FsResult<Arc<SnapFile>> {
        if let Some(file) = self.kept_snap_file(view_ino) {
            return Ok(file);
        }
        let (epoch, rec) = self.snap_record(id, ino)?;
        if rec.size <= WHOLE_MAP_MAX_BYTES {
            let file = self.snap_range(ino, epoch, &rec, 0, u64::MAX)?;
            return Ok(self.keep_snap_file(view_ino, id, file));
        }
        let from = offset.saturating_sub(self.longest_extent());
        let range = self.snap_range(ino, epoch, &rec, from, offset.saturating_add(len))?;
        Ok(Arc::new(range))
    }

    /// Reads a snapshot file; every chunk is verified.
    pub(crate) fn view_read(
        &self,
        view_ino: InodeNo,
        id: SnapshotId,
        ino: InodeNo,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
        let file = self.snap_extents_for_read(view_ino, id, ino, offset, size as u64)?;
        let end = (offset.saturating_add(size as u64)).min(file.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let first = file
            .extents
            .range(..=offset)
            .next_back()
            .map(|(o, _)| *o)
            .unwrap_or(offset);
        for (&start, ext) in file.extents.range(first..end) {
            let ext_end = start + ext.len as u64;
            if ext_end <= offset {
                continue;
            }
            let data = self.chunks.read(&ext.chunk).map_err(|err| {
                tracing::error!(
                    "snapshot {}: {} at offset {start}: chunk {}: {err}",
                    id.0,
                    self.describe(ino),
                    ext.chunk.to_hex()
                );
                FsError::from(err)
            })?;
            if data.len() != ext.len as usize {
                tracing::error!("{ino} at offset {start}: chunk length differs from its extent");
                return Err(FsError::Io);
            }
            let from = offset.max(start);
            let to = end.min(ext_end);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
        self.io
            .bytes_read
            .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }
}
