//! Metadata operations: lookup, create, link, unlink, rename, setattr, xattrs, statfs.

use super::{check_name, writable, Attr, Caller, FsError, FsResult, Namespace, Txn, View};
use crate::chunking;
use crate::format::{self, key, DirentRecord, ExtentRecord, InodeRecord, Kind};
use crate::ids::{ContainerId, Epoch, InodeNo};
use crate::kv::{Cf, Sync};
use crate::store::now_ns;

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: InodeNo,
    pub kind: Kind,
}

/// Attribute changes of a setattr; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// Nanoseconds; `Some(None)` means "now".
    pub atime: Option<Option<i64>>,
    pub mtime: Option<Option<i64>>,
}

#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// A regular file for [`Namespace::make_file`].
#[derive(Clone, Copy, Debug)]
pub struct WholeFile<'a> {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    /// The file's size; what `data` does not cover reads as zeros and is stored as holes.
    pub size: u64,
    /// The file's data by offset: ascending, not overlapping, none past `size`.
    pub data: &'a [(u64, &'a [u8])],
    /// When the name is taken by a file (not a directory), the new file takes its place in
    /// the same batch, as a rename over it would; else a taken name is `Exists`.
    pub replace: bool,
}

impl WholeFile<'_> {
    fn check(&self) -> FsResult<()> {
        if self.size > FILE_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        let mut end = 0u64;
        for &(start, bytes) in self.data {
            if start < end {
                return Err(FsError::Invalid);
            }
            end = start
                .checked_add(bytes.len() as u64)
                .filter(|e| *e <= self.size)
                .ok_or(FsError::Invalid)?;
        }
        Ok(())
    }
}

/// Longest symlink target (PATH_MAX - 1).
const SYMLINK_MAX: usize = 4095;
/// Largest xattr value, as on Linux (XATTR_SIZE_MAX).
const XATTR_VALUE_MAX: usize = 64 * 1024;
/// Most links to one inode (and subdirectories of one directory, each a link to it), as
/// ext4: far below where the u32 count would wrap.
pub const LINK_MAX: u32 = 65_000;
/// Largest file: offsets must fit an i64 (what lseek can address).
pub const FILE_SIZE_MAX: u64 = i64::MAX as u64;

impl Namespace {
    pub fn lookup(&self, parent: InodeNo, name: &[u8]) -> FsResult<Attr> {
        if name.len() > format::NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        match View::of(parent) {
            View::Live(_) => {}
            view => return self.view_lookup(view, name),
        }
        if name == super::SNAPSHOTS_DIR
            && parent != InodeNo::ROOT
            && self.inode(parent)?.parent == InodeNo::ROOT
        {
            return self.view_getattr(View::SnapshotsDir(parent));
        }
        let entry = self.dirent(parent, name)?.ok_or(FsError::NotFound)?;
        self.getattr(entry.child)
    }

    pub(crate) fn dirent(&self, parent: InodeNo, name: &[u8]) -> FsResult<Option<DirentRecord>> {
        match self.read_newest(Cf::Dirent, &key::dirent_prefix(parent, name))? {
            None => Ok(None),
            Some((v, _)) => match DirentRecord::decode(&v) {
                Some(d) => Ok(Some(d)),
                None => {
                    tracing::error!(
                        "entry {:?} of {parent}: record does not decode",
                        String::from_utf8_lossy(name)
                    );
                    Err(FsError::Io)
                }
            },
        }
    }

    /// A path of `ino` inside the mount, for messages: found by scanning directory entries,
    /// so use it only on error paths. Falls back to the inode number.
    pub fn describe(&self, ino: InodeNo) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut cur = ino;
        for _ in 0..256 {
            if cur == InodeNo::ROOT {
                parts.reverse();
                return format!("/{} ({ino})", parts.join("/"));
            }
            let found = self.kv.scan_prefix(Cf::Dirent, b"").find_map(|item| {
                let (k, v) = item.ok()?;
                let (parent, name, _) = key::parse_named(&k)?;
                let d = DirentRecord::decode(&v)?;
                (d.child == cur).then(|| (parent, String::from_utf8_lossy(name).into_owned()))
            });
            match found {
                Some((parent, name)) => {
                    parts.push(name);
                    cur = parent;
                }
                None => break,
            }
        }
        format!("{ino}")
    }

    /// Every entry of directory `dir` in name order ("." and ".." not included).
    pub fn readdir(&self, dir: InodeNo) -> FsResult<Vec<DirEntry>> {
        if let view @ (View::SnapshotsDir(_) | View::Snapshot(..)) = View::of(dir) {
            return self.view_readdir(view);
        }
        let rec = self.inode(dir)?;
        if rec.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        self.readdir_at(dir, None)
    }

    /// Entries of `dir` as they were at epoch `at` (the live ones when `None`).
    pub(crate) fn readdir_at(&self, dir: InodeNo, at: Option<Epoch>) -> FsResult<Vec<DirEntry>> {
        let mut out = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        for item in self.kv.scan_prefix(Cf::Dirent, &key::dir_prefix(dir)) {
            let (k, v) = item?;
            let Some((_, name, birth)) = key::parse_named(&k) else {
                tracing::error!("directory {dir}: malformed entry key {}", hex::encode(&k));
                continue;
            };
            if at.is_some_and(|e| birth > e) {
                continue;
            }
            // Versions of one name are adjacent, newest first: only the first counts.
            if last.as_deref() == Some(name) {
                continue;
            }
            last = Some(name.to_vec());
            if format::is_tombstone(&v) {
                continue;
            }
            match DirentRecord::decode(&v) {
                Some(d) => out.push(DirEntry {
                    name: name.to_vec(),
                    ino: d.child,
                    kind: d.kind,
                }),
                None => tracing::error!(
                    "directory {dir}: entry {:?} does not decode",
                    String::from_utf8_lossy(name)
                ),
            }
        }
        Ok(out)
    }

    /// The directory `parent` as a place to add or remove entries: it must be a directory
    /// inside a container, writable by `caller`.
    fn dir_for_change(&self, parent: InodeNo, caller: Caller) -> FsResult<InodeRecord> {
        let rec = self.inode(parent)?;
        if rec.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if parent == InodeNo::ROOT {
            // The mount root holds containers only; they are made by `container create`
            // or mkdir, never by creating files there.
            return Err(FsError::NotPermitted);
        }
        check_access(&rec, caller, 0o3)?;
        Ok(rec)
    }

    /// Creates a file, directory, symlink or special file.
    #[allow(clippy::too_many_arguments)]
    pub fn make_node(
        &self,
        parent: InodeNo,
        name: &[u8],
        kind: Kind,
        perm: u16,
        rdev: u32,
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        writable(parent)?;
        check_name(name)?;
        if parent == InodeNo::ROOT && kind == Kind::Dir {
            let rec = self.create_container(
                std::str::from_utf8(name).map_err(|_| FsError::Invalid)?,
                caller,
                perm,
            )?;
            return self.getattr(rec.root);
        }
        if kind == Kind::Symlink && (target.is_empty() || target.len() > SYMLINK_MAX) {
            return Err(if target.is_empty() {
                FsError::NotFound
            } else {
                FsError::NameTooLong
            });
        }
        let mut st = self.commit.lock();
        let mut dir = self.dir_for_change(parent, caller)?;
        if self.dirent(parent, name)?.is_some() || is_reserved(&dir, name) {
            return Err(FsError::Exists);
        }
        if kind == Kind::Dir && dir.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        let mut txn = Txn::new(Sync::Process);
        let ino = self.alloc_ino(&mut st, &mut txn);
        let now = now_ns();
        // setgid directories pass their group on (BSD semantics, as Linux does).
        let gid = if dir.perm & 0o2000 != 0 {
            dir.gid
        } else {
            caller.gid
        };
        let mut perm = perm & 0o7777;
        if kind == Kind::Dir && dir.perm & 0o2000 != 0 {
            perm |= 0o2000;
        }
        let rec = InodeRecord {
            kind,
            perm,
            uid: caller.uid,
            gid,
            size: if kind == Kind::Symlink {
                target.len() as u64
            } else {
                0
            },
            data_bytes: 0,
            parent: if kind == Kind::Dir {
                parent
            } else {
                InodeNo(0)
            },
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev,
            generation: 0,
            container: dir.container,
            target: if kind == Kind::Symlink {
                target.to_vec()
            } else {
                Vec::new()
            },
        };
        self.put_inode(&mut txn, ino, &rec)?;
        let entry = DirentRecord { child: ino, kind };
        self.stage_entry(&mut txn, parent, name, dir.container, Some(entry))?;
        if kind == Kind::Dir {
            dir.nlink += 1;
        }
        dir.mtime = now;
        dir.ctime = now;
        self.put_inode(&mut txn, parent, &dir)?;
        txn.count(dir.container, |d| match kind {
            Kind::Dir => d.dirs += 1,
            Kind::File => d.files += 1,
            _ => {}
        });
        self.apply(&mut st, txn, &|_| None)?;
        Ok(Attr { ino, rec })
    }

    /// Creates a regular file with its data, owner, mode and times in one batch: what a
    /// create, writes, a close and a setattr do, without the open file in between (and, with
    /// [`WholeFile::replace`], a rename over the old file). For writers that have a whole
    /// file in hand (the ingest).
    pub fn make_file(
        &self,
        parent: InodeNo,
        name: &[u8],
        file: &WholeFile<'_>,
        caller: Caller,
    ) -> FsResult<Attr> {
        let mut made = self.make_files(parent, &[(name, *file)], caller)?;
        made.pop().unwrap_or(Err(FsError::Io))
    }

    /// [`Namespace::make_file`] for many files of one directory, in one batch: the
    /// directory's record, the counters and the commit lock are paid once. One result per
    /// file, in order; a file refused (`Exists`, `Invalid`, ...) is left out of the batch,
    /// and a store error fails them all (the outer error). Two files replacing names of one
    /// inode: the second is refused with `Busy` (make it in a batch of its own).
    pub fn make_files(
        &self,
        parent: InodeNo,
        files: &[(&[u8], WholeFile<'_>)],
        caller: Caller,
    ) -> FsResult<Vec<FsResult<Attr>>> {
        writable(parent)?;
        let checked: Vec<FsResult<()>> = files
            .iter()
            .map(|(name, file)| {
                check_name(name)?;
                file.check()
            })
            .collect();
        // Cut, hash and compress before taking the commit lock.
        let params = self.store.config.chunker;
        let mut chunks: Vec<(u64, &[u8])> = Vec::new();
        let mut first_chunk = Vec::with_capacity(files.len() + 1);
        for ((_, file), checked) in files.iter().zip(&checked) {
            first_chunk.push(chunks.len());
            if checked.is_ok() {
                for &(start, bytes) in file.data {
                    let mut at = start;
                    for c in chunking::split(&params, bytes) {
                        chunks.push((at, c));
                        at += c.len() as u64;
                    }
                }
            }
        }
        first_chunk.push(chunks.len());
        let slices: Vec<&[u8]> = chunks.iter().map(|(_, c)| *c).collect();
        let compression = self.store.config.compression;
        let mut prepared = chunking::prepare(&slices, compression, |id| self.chunk_is_stored(id))
            .into_iter()
            .zip(&chunks);

        let mut st = self.commit.lock();
        let mut dir = self.dir_for_change(parent, caller)?;
        let mut txn = Txn::new(Sync::Process);
        let live = self.live_epoch(dir.container);
        let now = now_ns();
        let mut results = Vec::with_capacity(files.len());
        let mut replaced = std::collections::HashSet::new();
        let mut made: u64 = 0;
        let mut logical: u64 = 0;
        for (i, ((name, file), checked)) in files.iter().zip(checked).enumerate() {
            // Taken whether or not the file is made: the next file's chunks follow.
            let file_chunks: Vec<_> = prepared
                .by_ref()
                .take(first_chunk[i + 1] - first_chunk[i])
                .collect();
            if let Err(e) = checked {
                results.push(Err(e));
                continue;
            }
            if is_reserved(&dir, name) || files[..i].iter().any(|(n, _)| n == name) {
                results.push(Err(FsError::Exists));
                continue;
            }
            // The file this one replaces: checked before anything of this file is staged.
            let old = match self.dirent(parent, name)? {
                None => None,
                Some(_) if !file.replace => {
                    results.push(Err(FsError::Exists));
                    continue;
                }
                Some(e) => {
                    // An entry whose inode cannot be read concerns that file alone.
                    let rec = match self.inode(e.child) {
                        Ok(rec) => rec,
                        Err(err) => {
                            results.push(Err(err));
                            continue;
                        }
                    };
                    let refused = if rec.kind == Kind::Dir {
                        Some(FsError::IsDir)
                    } else if replaced.contains(&e.child) {
                        Some(FsError::Busy)
                    } else {
                        check_sticky(&dir, &rec, caller).err()
                    };
                    if let Some(err) = refused {
                        results.push(Err(err));
                        continue;
                    }
                    Some((e.child, rec))
                }
            };
            if let Some((old_ino, mut old_rec)) = old {
                // Its entry gets the new version below.
                self.stage_unref_inode(&mut txn, old_ino, &mut old_rec, now)?;
                replaced.insert(old_ino);
            }
            let ino = self.alloc_ino(&mut st, &mut txn);
            let mut rec = InodeRecord {
                kind: Kind::File,
                perm: file.perm & 0o7777,
                uid: file.uid,
                gid: file.gid,
                size: file.size,
                data_bytes: 0,
                parent: InodeNo(0),
                atime: file.atime_ns,
                mtime: file.mtime_ns,
                ctime: now,
                crtime: now,
                nlink: 1,
                rdev: 0,
                generation: 0,
                container: dir.container,
                target: Vec::new(),
            };
            for (p, (offset, _)) in file_chunks {
                let extent = ExtentRecord {
                    chunk: p.id,
                    len: p.len,
                };
                // A new inode has no older extent at any offset to retire or keep for a
                // snapshot: each is put as a replaced one is.
                self.put_extent(&mut txn, ino, *offset, dir.container, &extent, true)?;
                rec.data_bytes += u64::from(p.len);
                txn.reference(p.id, p.encoded);
            }
            // Nor an older version of its record.
            txn.batch.put(
                &self.kv,
                Cf::Inode,
                &key::versioned(&key::inode_prefix(ino), live),
                &rec.encode(),
            );
            let entry = DirentRecord {
                child: ino,
                kind: Kind::File,
            };
            self.stage_entry(&mut txn, parent, name, dir.container, Some(entry))?;
            made += 1;
            logical += rec.data_bytes;
            results.push(Ok(Attr { ino, rec }));
        }
        if made == 0 {
            return Ok(results);
        }
        dir.mtime = now;
        dir.ctime = now;
        self.put_inode(&mut txn, parent, &dir)?;
        txn.count(dir.container, |d| {
            d.files += made as i64;
            d.logical_bytes += logical as i64;
        });
        self.apply(&mut st, txn, &|id| self.encode_among(&chunks, id))?;
        Ok(results)
    }

    /// Stages the entry `name` of `parent` in `container`: pointing at `entry`, or with
    /// `None` its removal.
    fn stage_entry(
        &self,
        txn: &mut Txn,
        parent: InodeNo,
        name: &[u8],
        container: ContainerId,
        entry: Option<DirentRecord>,
    ) -> FsResult<()> {
        self.stage_version(
            txn,
            Cf::Dirent,
            &key::dirent_prefix(parent, name),
            container,
            entry.map(|e| e.encode()).as_ref().map(|v| &v[..]),
        )?;
        Ok(())
    }

    pub fn readlink(&self, ino: InodeNo) -> FsResult<Vec<u8>> {
        let rec = self.getattr(ino)?.rec;
        if rec.kind != Kind::Symlink {
            return Err(FsError::Invalid);
        }
        Ok(rec.target)
    }

    pub fn link(
        &self,
        ino: InodeNo,
        parent: InodeNo,
        name: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        writable(ino)?;
        writable(parent)?;
        check_name(name)?;
        let mut st = self.commit.lock();
        let mut rec = self.inode(ino)?;
        if rec.kind == Kind::Dir {
            return Err(FsError::NotPermitted);
        }
        let mut dir = self.dir_for_change(parent, caller)?;
        if dir.container != rec.container {
            return Err(FsError::CrossDevice);
        }
        if self.dirent(parent, name)?.is_some() || is_reserved(&dir, name) {
            return Err(FsError::Exists);
        }
        if rec.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if rec.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        let now = now_ns();
        let mut txn = Txn::new(Sync::Process);
        rec.nlink += 1;
        rec.ctime = now;
        self.put_inode(&mut txn, ino, &rec)?;
        self.stage_version(
            &mut txn,
            Cf::Dirent,
            &key::dirent_prefix(parent, name),
            dir.container,
            Some(
                &DirentRecord {
                    child: ino,
                    kind: rec.kind,
                }
                .encode(),
            ),
        )?;
        dir.mtime = now;
        dir.ctime = now;
        self.put_inode(&mut txn, parent, &dir)?;
        self.apply(&mut st, txn, &|_| None)?;
        drop(st);
        self.getattr(ino)
    }

    pub fn unlink(&self, parent: InodeNo, name: &[u8], caller: Caller) -> FsResult<()> {
        self.remove_entry(parent, name, caller, false)
    }

    pub fn rmdir(&self, parent: InodeNo, name: &[u8], caller: Caller) -> FsResult<()> {
        if name == b"." {
            return Err(FsError::Invalid);
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        self.remove_entry(parent, name, caller, true)
    }

    fn remove_entry(
        &self,
        parent: InodeNo,
        name: &[u8],
        caller: Caller,
        dir_wanted: bool,
    ) -> FsResult<()> {
        writable(parent)?;
        let mut st = self.commit.lock();
        if parent == InodeNo::ROOT {
            // Containers go only through `dedupfs container delete`, which asks for --force.
            return Err(FsError::NotPermitted);
        }
        let mut dir = self.dir_for_change(parent, caller)?;
        let entry = self.dirent(parent, name)?.ok_or(FsError::NotFound)?;
        let mut rec = self.inode(entry.child)?;
        check_sticky(&dir, &rec, caller)?;
        match (dir_wanted, rec.kind == Kind::Dir) {
            (true, false) => return Err(FsError::NotDir),
            (false, true) => return Err(FsError::IsDir),
            _ => {}
        }
        if dir_wanted && !self.readdir(entry.child)?.is_empty() {
            return Err(FsError::NotEmpty);
        }
        let now = now_ns();
        let mut txn = Txn::new(Sync::Process);
        self.stage_entry(&mut txn, parent, name, dir.container, None)?;
        if rec.kind == Kind::Dir {
            dir.nlink = dir.nlink.saturating_sub(1);
        }
        dir.mtime = now;
        dir.ctime = now;
        self.put_inode(&mut txn, parent, &dir)?;
        self.stage_unref_inode(&mut txn, entry.child, &mut rec, now)?;
        self.apply(&mut st, txn, &|_| None)
    }

    /// Drops one link to `ino`. At zero links the inode goes, or, while it is open, goes on
    /// the orphan list to be reclaimed at its last release (or the next mount).
    fn stage_unref_inode(
        &self,
        txn: &mut Txn,
        ino: InodeNo,
        rec: &mut InodeRecord,
        now: i64,
    ) -> FsResult<()> {
        let last = rec.kind == Kind::Dir || rec.nlink <= 1;
        if !last {
            rec.nlink -= 1;
            rec.ctime = now;
            self.put_inode(txn, ino, rec)?;
            return Ok(());
        }
        rec.nlink = 0;
        rec.ctime = now;
        let kind = rec.kind;
        txn.count(rec.container, |d| match kind {
            Kind::Dir => d.dirs -= 1,
            Kind::File => d.files -= 1,
            _ => {}
        });
        if self.open_files.lock().contains_key(&ino) {
            self.put_inode(txn, ino, rec)?;
            txn.batch.put(&self.kv, Cf::Meta, &key::orphan(ino), b"");
            Ok(())
        } else {
            self.stage_purge(txn, ino)
        }
    }

    /// Stages deletion of an inode's record, extents (releasing their chunks), xattrs and
    /// orphan entry. Its directory entries are the caller's business.
    pub(crate) fn stage_purge(&self, txn: &mut Txn, ino: InodeNo) -> FsResult<()> {
        txn.batch.delete(&self.kv, Cf::Meta, &key::orphan(ino));
        let Some((rec, _)) = self.read_inode(ino)? else {
            return Ok(());
        };
        let logical = self.stage_purge_versions(txn, ino, rec.container)?;
        txn.count(rec.container, |d| d.logical_bytes -= logical);
        Ok(())
    }

    /// Reclaims inodes on the orphan list: unlinked while open, then the process ended.
    pub(crate) fn reclaim_orphans(&self) -> FsResult<()> {
        let orphans: Vec<InodeNo> = self
            .kv
            .scan_prefix(Cf::Meta, format::meta::ORPHAN_PREFIX)
            .filter_map(|item| item.ok().and_then(|(k, _)| key::parse_orphan(&k)))
            .collect();
        for ino in orphans {
            if self.open_files.lock().contains_key(&ino) {
                continue;
            }
            let mut st = self.commit.lock();
            let mut txn = Txn::new(Sync::Process);
            self.stage_purge(&mut txn, ino)?;
            self.apply(&mut st, txn, &|_| None)?;
        }
        Ok(())
    }

    /// Called at a file's last release: an unlinked file's data goes now, unless it was
    /// opened again meanwhile (then its own last release purges it). Opens register under
    /// the commit lock, so the check below cannot race with one.
    pub(crate) fn purge_if_orphan(&self, ino: InodeNo) -> FsResult<()> {
        let mut st = self.commit.lock();
        if self.open_files.lock().contains_key(&ino) {
            return Ok(());
        }
        match self.read_inode(ino)? {
            Some((rec, _)) if rec.nlink == 0 => {
                let mut txn = Txn::new(Sync::Process);
                self.stage_purge(&mut txn, ino)?;
                self.apply(&mut st, txn, &|_| None)
            }
            _ => Ok(()),
        }
    }

    /// rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE.
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &self,
        parent: InodeNo,
        name: &[u8],
        new_parent: InodeNo,
        new_name: &[u8],
        noreplace: bool,
        exchange: bool,
        caller: Caller,
    ) -> FsResult<()> {
        writable(parent)?;
        writable(new_parent)?;
        check_name(new_name)?;
        if noreplace && exchange {
            return Err(FsError::Invalid);
        }
        let mut st = self.commit.lock();
        if parent == InodeNo::ROOT || new_parent == InodeNo::ROOT {
            return Err(FsError::NotPermitted);
        }
        let mut src_dir = self.dir_for_change(parent, caller)?;
        let mut dst_dir = if new_parent == parent {
            src_dir.clone()
        } else {
            self.dir_for_change(new_parent, caller)?
        };
        if src_dir.container != dst_dir.container {
            return Err(FsError::CrossDevice);
        }
        let entry = self.dirent(parent, name)?.ok_or(FsError::NotFound)?;
        let mut moved = self.inode(entry.child)?;
        check_sticky(&src_dir, &moved, caller)?;
        let target = self.dirent(new_parent, new_name)?;
        if parent == new_parent && name == new_name {
            return if exchange && target.is_none() {
                Err(FsError::NotFound)
            } else {
                Ok(())
            };
        }
        // A directory cannot move into its own subtree.
        if moved.kind == Kind::Dir && self.is_ancestor(entry.child, new_parent)? {
            return Err(FsError::Invalid);
        }
        if is_reserved(&dst_dir, new_name) {
            return Err(FsError::Exists);
        }
        if moved.kind == Kind::Dir && parent != new_parent && dst_dir.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        let now = now_ns();
        let container = src_dir.container;
        let mut txn = Txn::new(Sync::Process);
        let same_dir = parent == new_parent;
        if exchange {
            let other = target.ok_or(FsError::NotFound)?;
            let mut other_rec = self.inode(other.child)?;
            check_sticky(&dst_dir, &other_rec, caller)?;
            if other_rec.kind == Kind::Dir && self.is_ancestor(other.child, parent)? {
                return Err(FsError::Invalid);
            }
            self.stage_entry(&mut txn, parent, name, container, Some(other))?;
            self.stage_entry(&mut txn, new_parent, new_name, container, Some(entry))?;
            if !same_dir {
                if moved.kind == Kind::Dir {
                    moved.parent = new_parent;
                    src_dir.nlink -= 1;
                    dst_dir.nlink += 1;
                }
                if other_rec.kind == Kind::Dir {
                    other_rec.parent = parent;
                    dst_dir.nlink -= 1;
                    src_dir.nlink += 1;
                }
            }
            other_rec.ctime = now;
            self.put_inode(&mut txn, other.child, &other_rec)?;
        } else {
            if let Some(t) = target {
                if noreplace {
                    return Err(FsError::Exists);
                }
                if t.child == entry.child {
                    // Two names of one inode: POSIX says do nothing.
                    return Ok(());
                }
                let mut trec = self.inode(t.child)?;
                check_sticky(&dst_dir, &trec, caller)?;
                match (moved.kind == Kind::Dir, trec.kind == Kind::Dir) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true) => {
                        if !self.readdir(t.child)?.is_empty() {
                            return Err(FsError::NotEmpty);
                        }
                        dst_dir.nlink -= 1;
                    }
                    _ => {}
                }
                self.stage_unref_inode(&mut txn, t.child, &mut trec, now)?;
            }
            self.stage_entry(&mut txn, parent, name, container, None)?;
            self.stage_entry(&mut txn, new_parent, new_name, container, Some(entry))?;
            if moved.kind == Kind::Dir && !same_dir {
                moved.parent = new_parent;
                src_dir.nlink -= 1;
                dst_dir.nlink += 1;
            }
        }
        moved.ctime = now;
        self.put_inode(&mut txn, entry.child, &moved)?;
        src_dir.mtime = now;
        src_dir.ctime = now;
        dst_dir.mtime = now;
        dst_dir.ctime = now;
        if same_dir {
            // One directory: every change of a same-directory rename went to `dst_dir`.
            self.put_inode(&mut txn, parent, &dst_dir)?;
        } else {
            self.put_inode(&mut txn, parent, &src_dir)?;
            self.put_inode(&mut txn, new_parent, &dst_dir)?;
        }
        self.apply(&mut st, txn, &|_| None)
    }

    /// True when `dir` is `node` or lies below it.
    fn is_ancestor(&self, node: InodeNo, mut dir: InodeNo) -> FsResult<bool> {
        for _ in 0..4096 {
            if dir == node {
                return Ok(true);
            }
            if dir == InodeNo::ROOT || dir.0 == 0 {
                return Ok(false);
            }
            let rec = self.inode(dir)?;
            if rec.parent == dir {
                return Ok(false);
            }
            dir = rec.parent;
        }
        Ok(false)
    }

    pub fn setattr(&self, ino: InodeNo, set: &SetAttr, caller: Caller) -> FsResult<Attr> {
        writable(ino)?;
        if ino == InodeNo::ROOT {
            return Err(FsError::NotPermitted);
        }
        if let Some(size) = set.size {
            if size > FILE_SIZE_MAX {
                return Err(FsError::TooBig);
            }
            let rec = self.inode(ino)?;
            if rec.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if rec.kind != Kind::File {
                return Err(FsError::Invalid);
            }
            check_access(&rec, caller, 0o2)?;
            let set = set.clone();
            return self.truncate(ino, size, caller, move |rec, now| {
                apply_setattr(rec, &set, caller, now)
            });
        }
        let store = || -> FsResult<()> {
            let mut st = self.commit.lock();
            let mut rec = self.inode(ino)?;
            let now = now_ns();
            apply_setattr(&mut rec, set, caller, now)?;
            let mut txn = Txn::new(Sync::Process);
            self.put_inode(&mut txn, ino, &rec)?;
            self.apply(&mut st, txn, &|_| None)
        };
        if set.mtime.is_some() {
            // An explicit mtime wins over the times of writes still pending (cp -p).
            self.with_write_times_dropped(ino, store)?;
        } else {
            store()?;
        }
        self.getattr(ino)
    }

    pub fn setxattr(
        &self,
        ino: InodeNo,
        name: &[u8],
        value: &[u8],
        create: bool,
        replace: bool,
        caller: Caller,
    ) -> FsResult<()> {
        writable(ino)?;
        if name.is_empty() || name.contains(&0) {
            return Err(FsError::Invalid);
        }
        if name.len() > format::NAME_MAX {
            return Err(FsError::Range);
        }
        if value.len() > XATTR_VALUE_MAX {
            return Err(FsError::TooBig);
        }
        let mut st = self.commit.lock();
        let mut rec = self.inode(ino)?;
        if ino == InodeNo::ROOT {
            return Err(FsError::NotPermitted);
        }
        if !caller.is_root() && name.starts_with(b"trusted.") {
            return Err(FsError::NotPermitted);
        }
        let exists = self
            .read_newest(Cf::Xattr, &key::xattr_prefix(ino, name))?
            .is_some();
        if create && exists {
            return Err(FsError::Exists);
        }
        if replace && !exists {
            return Err(FsError::NoAttr);
        }
        let mut txn = Txn::new(Sync::Process);
        let mut store_value = true;
        if name == ACL_ACCESS {
            // The kernel leaves the mode to the filesystem: the ACL's owner, group (or
            // mask) and other entries are the permission bits. An ACL with nothing beyond
            // those is the mode itself and is not kept (as ext4 does), so `cp -a` and
            // `rsync -A` keep modes, and `ls` shows no stray "+".
            let acl = AccessAcl::parse(value).ok_or(FsError::Invalid)?;
            if !caller.is_root() && caller.uid != rec.uid {
                return Err(FsError::NotPermitted);
            }
            rec.perm = (rec.perm & 0o7000) | acl.mode_bits();
            if acl.minimal {
                store_value = false;
                self.stage_version(
                    &mut txn,
                    Cf::Xattr,
                    &key::xattr_prefix(ino, name),
                    rec.container,
                    None,
                )?;
            }
        }
        if store_value {
            let mut v = Vec::with_capacity(value.len() + 1);
            v.push(format::LIVE);
            v.extend_from_slice(value);
            self.stage_version(
                &mut txn,
                Cf::Xattr,
                &key::xattr_prefix(ino, name),
                rec.container,
                Some(&v),
            )?;
        }
        rec.ctime = now_ns();
        self.put_inode(&mut txn, ino, &rec)?;
        self.apply(&mut st, txn, &|_| None)
    }

    pub fn getxattr(&self, ino: InodeNo, name: &[u8]) -> FsResult<Vec<u8>> {
        match View::of(ino) {
            View::Live(_) => {}
            View::SnapshotsDir(_) => return Err(FsError::NoAttr),
            View::Snapshot(id, inner) => {
                self.getattr(ino)?;
                let at = self.snapshot_epoch(id)?;
                return self.view_xattr(inner, at, name);
            }
        }
        self.inode(ino)?;
        match self.read_newest(Cf::Xattr, &key::xattr_prefix(ino, name))? {
            Some((v, _)) => xattr_value(ino, name, &v),
            None => Err(FsError::NoAttr),
        }
    }

    /// Attribute names, each followed by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: InodeNo) -> FsResult<Vec<u8>> {
        self.getattr(ino)?;
        let (ino, at) = match View::of(ino) {
            View::Live(_) => (ino, None),
            View::SnapshotsDir(_) => return Ok(Vec::new()),
            View::Snapshot(id, inner) => (inner, Some(self.snapshot_epoch(id)?)),
        };
        let mut names = XattrNames::new(at);
        for item in self.kv.scan_prefix(Cf::Xattr, &key::inode_prefix(ino)) {
            let (k, v) = item?;
            names.add(&k, &v);
        }
        Ok(names.out)
    }

    /// The names [`Namespace::listxattr`] gives for a live inode, read with `cursor` (see
    /// [`Namespace::xattr_cursor`]), without checking that the inode exists.
    pub(crate) fn live_xattr_names(
        &self,
        cursor: &mut crate::kv::Cursor<'_>,
        ino: InodeNo,
    ) -> FsResult<Vec<u8>> {
        let prefix = key::inode_prefix(ino);
        let mut names = XattrNames::new(None);
        cursor.scan(&prefix, &prefix, |k, v| {
            names.add(k, v);
            true
        })?;
        Ok(names.out)
    }

    pub fn removexattr(&self, ino: InodeNo, name: &[u8], caller: Caller) -> FsResult<()> {
        writable(ino)?;
        let mut st = self.commit.lock();
        let mut rec = self.inode(ino)?;
        if !caller.is_root() && name.starts_with(b"trusted.") {
            return Err(FsError::NotPermitted);
        }
        if self
            .read_newest(Cf::Xattr, &key::xattr_prefix(ino, name))?
            .is_none()
        {
            return Err(FsError::NoAttr);
        }
        let mut txn = Txn::new(Sync::Process);
        self.stage_version(
            &mut txn,
            Cf::Xattr,
            &key::xattr_prefix(ino, name),
            rec.container,
            None,
        )?;
        rec.ctime = now_ns();
        self.put_inode(&mut txn, ino, &rec)?;
        self.apply(&mut st, txn, &|_| None)
    }

    /// Free space of the filesystem holding the store; used space is what the store holds.
    pub fn statfs(&self) -> FsResult<StatFs> {
        self.commit_closed_files()?;
        let path = std::ffi::CString::new(self.store.path.as_os_str().as_encoded_bytes())
            .map_err(|_| FsError::Invalid)?;
        // SAFETY: statvfs writes into the zeroed struct we pass; path is NUL-terminated.
        let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut vfs) } != 0 {
            return Err(FsError::Io);
        }
        let bsize = 4096u64;
        let frsize = vfs.f_frsize.max(1);
        let free = vfs.f_bfree * frsize / bsize;
        let avail = vfs.f_bavail * frsize / bsize;
        let used = self.counters().stored_bytes.div_ceil(bsize);
        let c = self.counters();
        Ok(StatFs {
            blocks: used + free,
            bfree: free,
            bavail: avail,
            files: c.files + c.dirs + vfs.f_ffree,
            ffree: vfs.f_ffree,
            bsize: bsize as u32,
            namelen: format::NAME_MAX as u32,
        })
    }
}

/// Name of the xattr that carries a file's POSIX access ACL.
const ACL_ACCESS: &[u8] = b"system.posix_acl_access";

/// The parts of a POSIX access ACL (Linux xattr form: version 2, then little-endian
/// entries of tag u16, perm u16, id u32) that make up a file mode.
struct AccessAcl {
    user_obj: u16,
    group_obj: u16,
    mask: Option<u16>,
    other: u16,
    /// Only owner, group and other entries: the ACL says no more than the mode.
    minimal: bool,
}

impl AccessAcl {
    const VERSION: u32 = 2;
    const USER_OBJ: u16 = 0x01;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;

    fn parse(value: &[u8]) -> Option<AccessAcl> {
        let (header, entries) = value.split_at_checked(4)?;
        if u32::from_le_bytes(header.try_into().ok()?) != Self::VERSION || entries.len() % 8 != 0 {
            return None;
        }
        let (mut user_obj, mut group_obj, mut other, mut mask) = (None, None, None, None);
        let mut minimal = true;
        for entry in entries.chunks_exact(8) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let perm = u16::from_le_bytes([entry[2], entry[3]]) & 7;
            match tag {
                Self::USER_OBJ => user_obj = Some(perm),
                Self::GROUP_OBJ => group_obj = Some(perm),
                Self::OTHER => other = Some(perm),
                Self::MASK => {
                    mask = Some(perm);
                    minimal = false;
                }
                _ => minimal = false,
            }
        }
        Some(AccessAcl {
            user_obj: user_obj?,
            group_obj: group_obj?,
            mask,
            other: other?,
            minimal,
        })
    }

    /// Permission bits (0o777) the ACL implies: the group class is the mask when there is
    /// one.
    fn mode_bits(&self) -> u16 {
        (self.user_obj << 6) | (self.mask.unwrap_or(self.group_obj) << 3) | self.other
    }
}

/// Checks `want` (rwx bits, 0o4/0o2/0o1) against the owner/group/other bits of `rec`.
pub(crate) fn check_access(rec: &InodeRecord, caller: Caller, want: u16) -> FsResult<()> {
    if caller.is_root() {
        return Ok(());
    }
    // A FUSE request carries no supplementary groups, so any caller but the owner may be
    // in the file's group: the group bits count for them too. The kernel has made the
    // exact check (default_permissions); this second line must not refuse what it allowed.
    let bits = if caller.uid == rec.uid {
        (rec.perm >> 6) & 7
    } else {
        ((rec.perm >> 3) | rec.perm) & 7
    };
    if bits & want == want {
        Ok(())
    } else {
        Err(FsError::Access)
    }
}

/// In a sticky directory only the owner of an entry, of the directory, or root may remove
/// or rename it.
/// The value of a stored xattr version (after its tag); EIO for a damaged one.
pub(crate) fn xattr_value(ino: InodeNo, name: &[u8], stored: &[u8]) -> FsResult<Vec<u8>> {
    match stored.split_first() {
        Some((&format::LIVE, value)) => Ok(value.to_vec()),
        _ => {
            tracing::error!(
                "{ino}: xattr {:?} has no valid tag",
                String::from_utf8_lossy(name)
            );
            Err(FsError::Io)
        }
    }
}

/// Collects xattr names, NUL-terminated, from an inode's xattr records in key order (each
/// name's versions adjacent, newest first): the newest version at or before `at` counts.
struct XattrNames {
    at: Option<Epoch>,
    last: Option<Vec<u8>>,
    out: Vec<u8>,
}

impl XattrNames {
    fn new(at: Option<Epoch>) -> XattrNames {
        XattrNames {
            at,
            last: None,
            out: Vec::new(),
        }
    }

    fn add(&mut self, k: &[u8], v: &[u8]) {
        let Some((_, name, birth)) = key::parse_named(k) else {
            return;
        };
        if self.at.is_some_and(|e| birth > e) || self.last.as_deref() == Some(name) {
            return;
        }
        self.last = Some(name.to_vec());
        if !format::is_tombstone(v) {
            self.out.extend_from_slice(name);
            self.out.push(0);
        }
    }
}

/// True for a name that a container root keeps for its snapshots.
fn is_reserved(dir: &InodeRecord, name: &[u8]) -> bool {
    dir.parent == InodeNo::ROOT && name == super::SNAPSHOTS_DIR
}

fn check_sticky(dir: &InodeRecord, rec: &InodeRecord, caller: Caller) -> FsResult<()> {
    if dir.perm & 0o1000 == 0 || caller.is_root() || caller.uid == rec.uid || caller.uid == dir.uid
    {
        Ok(())
    } else {
        Err(FsError::NotPermitted)
    }
}

/// Applies the non-size fields of a setattr with chmod/chown/utimens permission rules.
pub(crate) fn apply_setattr(
    rec: &mut InodeRecord,
    set: &SetAttr,
    caller: Caller,
    now: i64,
) -> FsResult<()> {
    let owner = caller.is_root() || caller.uid == rec.uid;
    let rec_perm = &rec.clone();
    if let Some(mode) = set.mode {
        if !owner {
            return Err(FsError::NotPermitted);
        }
        // The kernel clears setgid for a caller outside the file's group; only it knows the
        // caller's supplementary groups.
        rec.perm = (mode & 0o7777) as u16;
    }
    if set.uid.is_some() || set.gid.is_some() {
        let uid_change = set.uid.is_some_and(|u| u != rec.uid);
        let gid_change = set.gid.is_some_and(|g| g != rec.gid);
        if uid_change && !caller.is_root() {
            return Err(FsError::NotPermitted);
        }
        // The owner may pick any group it belongs to, supplementary ones included; the
        // kernel checks the membership.
        if gid_change && !caller.is_root() && caller.uid != rec.uid {
            return Err(FsError::NotPermitted);
        }
        if let Some(u) = set.uid {
            rec.uid = u;
        }
        if let Some(g) = set.gid {
            rec.gid = g;
        }
        // chown clears setuid and setgid on non-directories.
        if rec.kind != Kind::Dir && (uid_change || gid_change || !caller.is_root()) {
            rec.perm &= !0o6000;
        }
    }
    for (field, value) in [(&mut rec.atime, set.atime), (&mut rec.mtime, set.mtime)] {
        match value {
            None => {}
            Some(None) => {
                // "now" needs ownership or write permission.
                if !owner {
                    check_access(rec_perm, caller, 0o2)?;
                }
                *field = now;
            }
            Some(Some(t)) => {
                if !owner {
                    return Err(FsError::NotPermitted);
                }
                *field = t;
            }
        }
    }
    rec.ctime = now;
    Ok(())
}
