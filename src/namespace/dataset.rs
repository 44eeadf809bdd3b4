//! Container-level operations on snapshots: clone a snapshot into a new writable
//! container, and roll a container back to its newest snapshot.

use std::collections::{HashMap, VecDeque};

use super::{check_name, ContainerRecord, FsError, FsResult, Namespace, Txn};
use crate::format::{self, key, DirentRecord, ExtentRecord, Kind};
use crate::ids::{ContainerId, Epoch, InodeNo};
use crate::kv::{Cf, Sync};
use crate::store::now_ns;

/// What a rollback undid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RolledBack {
    /// Versions written after the snapshot, removed.
    pub removed: u64,
    /// Versions the snapshot sees that were live again.
    pub restored: u64,
    /// Snapshots newer than the target, deleted first.
    pub snapshots_deleted: u64,
}

impl Namespace {
    /// Newest version born at or before `at` of every object under `owner` in `cf`
    /// (extents or xattrs of one inode): (object suffix after the owner, value).
    fn objects_at(&self, cf: Cf, owner: InodeNo, at: Epoch) -> FsResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        for item in self.kv.scan_prefix(cf, &key::inode_prefix(owner)) {
            let (k, v) = item?;
            let Some((object, birth)) = key::split_versioned(&k) else {
                continue;
            };
            if birth > at || last.as_deref() == Some(object) {
                continue;
            }
            last = Some(object.to_vec());
            if !format::is_tombstone(&v) {
                out.push((object[8..].to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Creates container `new_name` holding what snapshot `snapshot` of `source` holds.
    /// Metadata is copied under new inode numbers; file data is shared (chunk references
    /// are added), so the cost is the snapshot's metadata, in one batch.
    pub fn clone_container(
        &self,
        source: &str,
        snapshot: &str,
        new_name: &str,
    ) -> FsResult<ContainerRecord> {
        check_name(new_name.as_bytes())?;
        let mut st = self.commit.lock();
        if self.container_by_name(new_name).is_some() {
            return Err(FsError::Exists);
        }
        let c = self.container_by_name(source).ok_or(FsError::NotFound)?;
        let s = self
            .snapshot_by_name(c.id, snapshot)
            .ok_or(FsError::NotFound)?;
        let mut txn = Txn::new(Sync::Disk);
        let id = ContainerId(st.next_container);
        st.next_container += 1;
        txn.batch.put(
            &self.kv,
            Cf::Meta,
            format::meta::NEXT_CONTAINER,
            &format::encode_count(st.next_container as u64),
        );
        let first = Epoch::FIRST;
        let mut map: HashMap<InodeNo, InodeNo> = HashMap::new();
        let root = self.alloc_ino(&mut st, &mut txn);
        map.insert(c.root, root);
        let mut copy = CloneCopy {
            id,
            at: s.epoch,
            logical: 0,
            files: 0,
            dirs: 0,
        };
        let mut queue = VecDeque::from([c.root]);
        copy.inode(self, &mut txn, &map, c.root, root)?;
        while let Some(dir) = queue.pop_front() {
            let new_dir = map[&dir];
            for entry in self.readdir_at(dir, Some(s.epoch))? {
                let child = match map.get(&entry.ino) {
                    Some(n) => *n,
                    None => {
                        let n = self.alloc_ino(&mut st, &mut txn);
                        map.insert(entry.ino, n);
                        // Parents are mapped before their subdirectories (breadth first).
                        if copy.inode(self, &mut txn, &map, entry.ino, n)? == Kind::Dir {
                            copy.dirs += 1;
                            queue.push_back(entry.ino);
                        }
                        n
                    }
                };
                txn.batch.put(
                    &self.kv,
                    Cf::Dirent,
                    &key::dirent(new_dir, &entry.name, first),
                    &DirentRecord {
                        child,
                        kind: entry.kind,
                    }
                    .encode(),
                );
            }
        }
        let (logical, files, dirs) = (copy.logical, copy.files, copy.dirs);
        let now = now_ns();
        let record = ContainerRecord {
            id,
            name: new_name.to_string(),
            root,
            live_epoch: first,
            created_ns: now,
            logical_bytes: logical,
            files,
            dirs,
            schedule: None,
        };
        txn.batch
            .put(&self.kv, Cf::Meta, &key::container(id), &record.encode());
        txn.batch.put(
            &self.kv,
            Cf::Dirent,
            &key::dirent(InodeNo::ROOT, new_name.as_bytes(), Epoch::ROOT),
            &DirentRecord {
                child: root,
                kind: Kind::Dir,
            }
            .encode(),
        );
        let mut mount_root = self.inode(InodeNo::ROOT)?;
        mount_root.nlink += 1;
        mount_root.mtime = now;
        mount_root.ctime = now;
        txn.batch.put(
            &self.kv,
            Cf::Inode,
            &key::inode(InodeNo::ROOT, Epoch::ROOT),
            &mount_root.encode(),
        );
        txn.delta.logical_bytes += logical as i64;
        txn.delta.files += files as i64;
        txn.delta.dirs += dirs as i64 + 1;
        self.apply(&mut st, txn, &|_| None)?;
        self.containers.write().insert(id, record.clone());
        Ok(record)
    }
}

/// Copies inodes of a snapshot into a clone, counting what it copies.
struct CloneCopy {
    id: ContainerId,
    at: Epoch,
    logical: u64,
    files: u64,
    dirs: u64,
}

impl CloneCopy {
    /// Copies the record, xattrs and extents of `old` (at the snapshot's epoch) to `new`.
    fn inode(
        &mut self,
        ns: &Namespace,
        txn: &mut Txn,
        map: &HashMap<InodeNo, InodeNo>,
        old: InodeNo,
        new: InodeNo,
    ) -> FsResult<Kind> {
        let first = Epoch::FIRST;
        let (mut rec, _) = ns.inode_at(old, self.at)?.ok_or(FsError::Io)?;
        rec.container = self.id;
        if rec.kind == Kind::Dir && rec.parent != InodeNo::ROOT {
            rec.parent = *map.get(&rec.parent).ok_or(FsError::Io)?;
        }
        txn.batch
            .put(&ns.kv, Cf::Inode, &key::inode(new, first), &rec.encode());
        for (cf, is_extent) in [(Cf::Xattr, false), (Cf::Extent, true)] {
            for (suffix, v) in ns.objects_at(cf, old, self.at)? {
                let mut k = key::inode_prefix(new).to_vec();
                k.extend_from_slice(&suffix);
                txn.batch.put(&ns.kv, cf, &key::versioned(&k, first), &v);
                if is_extent {
                    let ext = ExtentRecord::decode(&v).ok_or(FsError::Io)?;
                    txn.reference(ext.chunk, None);
                    self.logical += ext.len as u64;
                }
            }
        }
        if rec.kind == Kind::File && rec.nlink > 0 {
            self.files += 1;
        }
        Ok(rec.kind)
    }
}

/// What the kernel must forget after a rollback changed state under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Attributes and cached data of an inode.
    Inode(InodeNo),
    /// A name in a directory.
    Entry(InodeNo, Vec<u8>),
}

impl Namespace {
    /// Rolls `container` back to its snapshot `snapshot`: every change made since is undone
    /// and the space of what was written since comes back. Snapshots newer than the target
    /// are deleted first when `destroy_newer`, else refused (NotEmpty). Files of the
    /// container that are open are refused (Busy) unless `force`: then their pending writes
    /// are dropped and open handles see the rolled-back files.
    pub fn rollback(
        &self,
        container: &str,
        snapshot: &str,
        force: bool,
        destroy_newer: bool,
    ) -> FsResult<RolledBack> {
        let c = self.container_by_name(container).ok_or(FsError::NotFound)?;
        let snaps = self.snapshots_of(c.id);
        let target = snaps
            .iter()
            .find(|s| s.name == snapshot)
            .cloned()
            .ok_or(FsError::NotFound)?;
        let newer: Vec<_> = snaps.iter().filter(|s| s.epoch > target.epoch).collect();
        if !newer.is_empty() && !destroy_newer {
            return Err(FsError::NotEmpty);
        }
        let open: Vec<std::sync::Arc<super::OpenFile>> = {
            let files: Vec<_> = self.open_file_list();
            let mut mine = Vec::new();
            for f in files {
                if self
                    .read_inode(f.ino)?
                    .is_some_and(|(r, _)| r.container == c.id)
                {
                    mine.push(f);
                }
            }
            mine
        };
        if !open.is_empty() && !force {
            return Err(FsError::Busy);
        }
        let mut done = RolledBack::default();
        for s in newer.iter().rev() {
            self.delete_snapshot(container, &s.name)?;
            done.snapshots_deleted += 1;
        }
        let mut invalidate = Vec::new();
        let (removed, restored) = self.with_files_replaced(&open, || {
            self.rollback_to_newest(c.id, &target, &mut invalidate)
        })?;
        done.removed = removed;
        done.restored = restored;
        // An inode unlinked while open at the snapshot is an orphan again; unless it is
        // open now, it goes at once.
        self.reclaim_orphans()?;
        self.invalidate(&invalidate);
        Ok(done)
    }

    /// Stages the removal of an object's versions born after `at` (newest first in
    /// `versions`); a tombstone left as its only version hides nothing and goes too.
    /// Returns the number of versions removed.
    fn roll_back_object(
        &self,
        txn: &mut Txn,
        cf: Cf,
        versions: &[(Vec<u8>, Vec<u8>, Epoch)],
        at: Epoch,
        invalidate: &mut Vec<Invalidation>,
    ) -> u64 {
        let mut removed = 0;
        for (k, v, birth) in versions {
            if *birth <= at {
                continue;
            }
            txn.batch.delete(&self.kv, cf, k);
            removed += 1;
            if cf == Cf::Extent {
                if let Some(ext) = ExtentRecord::decode(v) {
                    txn.release(ext.chunk);
                }
            }
            if cf == Cf::Dirent {
                if let Some((parent, name, _)) = key::parse_named(k) {
                    invalidate.push(Invalidation::Entry(parent, name.to_vec()));
                }
            }
        }
        let remaining: Vec<_> = versions.iter().filter(|(_, _, b)| *b <= at).collect();
        if removed > 0 {
            if let [(k, v, _)] = remaining.as_slice() {
                if format::is_tombstone(v) {
                    txn.batch.delete(&self.kv, cf, k);
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Undoes every change since `target`, the container's newest snapshot, in one batch.
    fn rollback_to_newest(
        &self,
        container: ContainerId,
        target: &super::SnapshotRecord,
        invalidate: &mut Vec<Invalidation>,
    ) -> FsResult<(u64, u64)> {
        let mut st = self.commit.lock();
        let c = self.container(container).ok_or(FsError::NotFound)?;
        if self.epochs(container).newest_snapshot != Some(target.epoch) {
            return Err(FsError::NotEmpty);
        }
        let at = target.epoch;
        let mut txn = Txn::new(Sync::Disk);
        // Every inode whose objects may hold versions born after the snapshot: the live
        // tree, and the owners of the versions on the live epoch's dead list (what was
        // superseded or removed since, including whole inodes).
        let mut owners: std::collections::BTreeSet<InodeNo> = std::collections::BTreeSet::new();
        let mut queue = VecDeque::from([c.root]);
        owners.insert(c.root);
        while let Some(dir) = queue.pop_front() {
            for entry in self.readdir_at(dir, None)? {
                if owners.insert(entry.ino) && entry.kind == Kind::Dir {
                    queue.push_back(entry.ino);
                }
            }
        }
        // Inodes unlinked while open, which no entry reaches.
        for item in self.kv.scan_prefix(Cf::Meta, format::meta::ORPHAN_PREFIX) {
            let (k, _) = item?;
            if let Some(ino) = key::parse_orphan(&k) {
                if self
                    .read_inode(ino)?
                    .is_some_and(|(r, _)| r.container == container)
                {
                    owners.insert(ino);
                }
            }
        }
        let mut restored = 0u64;
        for item in self
            .kv
            .scan_prefix(Cf::Deadlist, &key::deadlist_prefix(container, c.live_epoch))
        {
            let (k, _) = item?;
            let (_, _, _, _, vkey) = key::parse_deadlist(&k).ok_or(FsError::Io)?;
            if let Some(owner) = vkey.get(..8).and_then(|b| b.try_into().ok()) {
                owners.insert(InodeNo(u64::from_be_bytes(owner)));
            }
            txn.batch.delete(&self.kv, Cf::Deadlist, &k);
            restored += 1;
        }
        let mut removed = 0u64;
        for owner in &owners {
            invalidate.push(Invalidation::Inode(*owner));
            for cf in [Cf::Inode, Cf::Dirent, Cf::Extent, Cf::Xattr] {
                // Versions of one object are adjacent: collect each object's, then decide.
                let mut object: Vec<u8> = Vec::new();
                let mut versions: Vec<(Vec<u8>, Vec<u8>, Epoch)> = Vec::new();
                let items = self.kv.scan_prefix(cf, &key::inode_prefix(*owner));
                for item in items.map(Some).chain(std::iter::once(None)) {
                    let next = match item {
                        Some(item) => {
                            let (k, v) = item?;
                            let Some((obj, birth)) = key::split_versioned(&k) else {
                                continue;
                            };
                            Some((obj.to_vec(), k.to_vec(), v.to_vec(), birth))
                        }
                        None => None,
                    };
                    let same = next.as_ref().is_some_and(|(obj, ..)| *obj == object);
                    if !same && !versions.is_empty() {
                        removed += self.roll_back_object(&mut txn, cf, &versions, at, invalidate);
                        versions.clear();
                    }
                    if let Some((obj, k, v, birth)) = next {
                        object = obj;
                        versions.push((k, v, birth));
                    }
                }
            }
            // The orphan list follows the inode's record at the snapshot: an inode unlinked
            // while open then is an orphan again; any other is not.
            match self.inode_at(*owner, at)? {
                Some((rec, _)) if rec.nlink == 0 && rec.kind == Kind::File => {
                    txn.batch.put(&self.kv, Cf::Meta, &key::orphan(*owner), b"");
                }
                _ => txn.batch.delete(&self.kv, Cf::Meta, &key::orphan(*owner)),
            }
        }
        // The counters are the snapshot's.
        let mut rec = c.clone();
        rec.logical_bytes = target.logical_bytes;
        rec.files = target.files;
        rec.dirs = target.dirs;
        txn.batch.put(
            &self.kv,
            Cf::Meta,
            &key::container(container),
            &rec.encode(),
        );
        txn.delta.logical_bytes += target.logical_bytes as i64 - c.logical_bytes as i64;
        txn.delta.files += target.files as i64 - c.files as i64;
        txn.delta.dirs += target.dirs as i64 - c.dirs as i64;
        self.apply(&mut st, txn, &|_| None)?;
        self.containers.write().insert(container, rec);
        Ok((removed, restored))
    }
}
