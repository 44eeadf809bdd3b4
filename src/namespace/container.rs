//! Containers: the top-level directories of the mount, each a unit of policy, snapshots
//! and replication. A container is a record in the meta family plus an entry under the
//! mount root pointing at its root directory.

use serde::{Deserialize, Serialize};

use super::{check_name, Caller, CounterDelta, FsError, FsResult, Namespace, Txn};
use crate::format::{self, key, DirentRecord, InodeRecord, Kind};
use crate::ids::{ContainerId, Epoch, InodeNo};
use crate::kv::{Cf, Sync};
use crate::store::now_ns;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: ContainerId,
    pub name: String,
    pub root: InodeNo,
    pub live_epoch: Epoch,
    pub created_ns: i64,
    /// Bytes of file data referenced by this container's extents.
    pub logical_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    /// Snapshots the running mount takes and prunes by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<SnapshotSchedule>,
}

/// A container's automatic snapshots: one every `every_secs`, named `auto-<UTC time>`;
/// after each, the `auto-` snapshots the policy does not keep are deleted (snapshots taken
/// by hand are never pruned by the schedule).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSchedule {
    pub every_secs: u64,
    pub keep: crate::retention::KeepPolicy,
}

/// Name prefix of scheduled snapshots.
pub const AUTO_PREFIX: &str = "auto-";

/// Serializes an id newtype as its plain number.
macro_rules! serde_plain_id {
    ($ty:ty, $inner:ty) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(s)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <$inner>::deserialize(d).map(Self)
            }
        }
    };
}

serde_plain_id!(ContainerId, u32);
serde_plain_id!(InodeNo, u64);
serde_plain_id!(Epoch, u64);
serde_plain_id!(crate::ids::SnapshotId, u32);

impl ContainerRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What `container info` and `container list` show.
#[derive(Clone, Debug, Serialize)]
pub struct ContainerInfo {
    pub name: String,
    pub id: u32,
    pub created_ns: i64,
    pub logical_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub entries: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<SnapshotSchedule>,
    pub snapshots: u64,
}

impl Namespace {
    pub(crate) fn load_containers(&self) -> FsResult<()> {
        let mut map = self.containers.write();
        for item in self
            .kv
            .scan_prefix(Cf::Meta, format::meta::CONTAINER_PREFIX)
        {
            let (k, v) = item?;
            let rec: ContainerRecord = serde_json::from_slice(&v).map_err(|e| {
                tracing::error!(
                    "container record {:?} does not decode: {e}",
                    hex::encode(&k)
                );
                FsError::Io
            })?;
            map.insert(rec.id, rec);
        }
        Ok(())
    }

    pub fn container_by_name(&self, name: &str) -> Option<ContainerRecord> {
        self.containers
            .read()
            .values()
            .find(|c| c.name == name)
            .cloned()
    }

    pub fn container(&self, id: ContainerId) -> Option<ContainerRecord> {
        self.containers.read().get(&id).cloned()
    }

    pub fn containers(&self) -> Vec<ContainerRecord> {
        let mut all: Vec<_> = self.containers.read().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Creates a container owned by `owner`; its root directory has mode 0755 unless given.
    pub fn create_container(
        &self,
        name: &str,
        owner: Caller,
        perm: u16,
    ) -> FsResult<ContainerRecord> {
        check_name(name.as_bytes())?;
        let mut st = self.commit.lock();
        if self.container_by_name(name).is_some() {
            return Err(FsError::Exists);
        }
        let mut txn = Txn::new(Sync::Process);
        let id = ContainerId(st.next_container);
        st.next_container += 1;
        txn.batch.put(
            &self.kv,
            Cf::Meta,
            format::meta::NEXT_CONTAINER,
            &format::encode_count(st.next_container as u64),
        );
        let root = self.alloc_ino(&mut st, &mut txn);
        let now = now_ns();
        let record = ContainerRecord {
            id,
            name: name.to_string(),
            root,
            live_epoch: Epoch::FIRST,
            created_ns: now,
            logical_bytes: 0,
            files: 0,
            dirs: 0,
            schedule: None,
        };
        let dir = InodeRecord {
            kind: Kind::Dir,
            perm: perm & 0o7777,
            uid: owner.uid,
            gid: owner.gid,
            size: 0,
            data_bytes: 0,
            parent: InodeNo::ROOT,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            nlink: 2,
            rdev: 0,
            generation: 0,
            container: id,
            target: Vec::new(),
        };
        txn.batch
            .put(&self.kv, Cf::Meta, &key::container(id), &record.encode());
        txn.batch.put(
            &self.kv,
            Cf::Inode,
            &key::inode(root, Epoch::FIRST),
            &dir.encode(),
        );
        txn.batch.put(
            &self.kv,
            Cf::Dirent,
            &key::dirent(InodeNo::ROOT, name.as_bytes(), Epoch::ROOT),
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
        txn.delta.dirs += 1;
        self.apply(&mut st, txn, &|_| None)?;
        self.containers.write().insert(id, record.clone());
        Ok(record)
    }

    /// Sets (or with `None` clears) a container's snapshot schedule.
    pub fn set_schedule(&self, name: &str, schedule: Option<SnapshotSchedule>) -> FsResult<()> {
        let mut st = self.commit.lock();
        let mut rec = self.container_by_name(name).ok_or(FsError::NotFound)?;
        rec.schedule = schedule;
        let mut txn = Txn::new(Sync::Disk);
        txn.batch
            .put(&self.kv, Cf::Meta, &key::container(rec.id), &rec.encode());
        self.apply(&mut st, txn, &|_| None)?;
        self.containers.write().insert(rec.id, rec);
        Ok(())
    }

    /// Takes the scheduled snapshots that are due at `now_ns` and prunes after each.
    /// Returns (container, snapshot) names taken.
    pub fn run_schedules(&self, now: i64) -> Vec<(String, String)> {
        let mut taken = Vec::new();
        for c in self.containers() {
            let Some(schedule) = c.schedule.clone() else {
                continue;
            };
            let last = self
                .snapshots_of(c.id)
                .iter()
                .filter(|s| s.name.starts_with(AUTO_PREFIX))
                .map(|s| s.created_ns)
                .max();
            let every_ns = schedule.every_secs.saturating_mul(1_000_000_000) as i64;
            if last.is_some_and(|t| now.saturating_sub(t) < every_ns) {
                continue;
            }
            let name = format!(
                "{AUTO_PREFIX}{}",
                super::snapshot::default_snapshot_name(now)
            );
            match self.create_snapshot(&c.name, Some(&name)) {
                Ok(_) => taken.push((c.name.clone(), name)),
                Err(e) => {
                    tracing::error!("scheduled snapshot {}@{name}: {e}", c.name);
                    continue;
                }
            }
            if schedule.keep.is_empty() {
                continue;
            }
            let candidates: Vec<crate::retention::Candidate> = self
                .snapshots_of(c.id)
                .into_iter()
                .filter(|s| s.name.starts_with(AUTO_PREFIX))
                .map(|s| crate::retention::Candidate {
                    name: s.name,
                    created_ns: s.created_ns,
                })
                .collect();
            let Ok(plan) = crate::retention::plan_prune(&candidates, &schedule.keep) else {
                continue;
            };
            for d in plan.remove() {
                match self.delete_snapshot(&c.name, &d.name) {
                    Ok(_) => tracing::info!("pruned {}@{} (schedule)", c.name, d.name),
                    // A snapshot in use stays until the next round.
                    Err(e) => tracing::warn!("pruning {}@{}: {e}", c.name, d.name),
                }
            }
        }
        taken
    }

    pub fn container_info(&self, name: &str) -> FsResult<ContainerInfo> {
        let rec = self.container_by_name(name).ok_or(FsError::NotFound)?;
        let entries = self.readdir(rec.root)?.len() as u64;
        Ok(ContainerInfo {
            name: rec.name,
            id: rec.id.0,
            created_ns: rec.created_ns,
            logical_bytes: rec.logical_bytes,
            files: rec.files,
            dirs: rec.dirs,
            entries,
            snapshots: self.snapshots_of(rec.id).len() as u64,
            schedule: rec.schedule,
        })
    }

    /// Deletes a container and everything in it. A non-empty container needs `force`;
    /// a container with open files is busy.
    pub fn delete_container(&self, name: &str, force: bool) -> FsResult<()> {
        let rec = self.container_by_name(name).ok_or(FsError::NotFound)?;
        let snapshots = self.snapshots_of(rec.id);
        if !snapshots.is_empty() {
            // Snapshots are contents too; each goes in its own batch, newest first, so
            // that an interruption leaves a consistent container with fewer snapshots.
            if !force {
                return Err(FsError::NotEmpty);
            }
            if self.container_is_busy(rec.id)? {
                return Err(FsError::Busy);
            }
            for s in snapshots.iter().rev() {
                self.delete_snapshot(name, &s.name)?;
            }
        }
        // Under the commit lock, so that nothing is created or opened in the container
        // between the checks and the batch.
        let mut st = self.commit.lock();
        let rec = self.container_by_name(name).ok_or(FsError::NotFound)?;
        if !force && !self.readdir(rec.root)?.is_empty() {
            return Err(FsError::NotEmpty);
        }
        let inodes = self.container_inodes(rec.root)?;
        // Open files include orphans (unlinked while open), which no entry reaches: their
        // release would purge them after the container and its counters are gone.
        if self.container_is_busy(rec.id)? {
            return Err(FsError::Busy);
        }
        let mut txn = Txn::new(Sync::Process);
        for ino in &inodes {
            self.stage_purge(&mut txn, *ino)?;
        }
        // Entries of every directory of the container.
        for ino in &inodes {
            for item in self.kv.scan_prefix(Cf::Dirent, &key::dir_prefix(*ino)) {
                let (k, _) = item?;
                txn.batch.delete(&self.kv, Cf::Dirent, &k);
            }
        }
        txn.batch.delete(
            &self.kv,
            Cf::Dirent,
            &key::dirent(InodeNo::ROOT, name.as_bytes(), Epoch::ROOT),
        );
        txn.batch
            .delete(&self.kv, Cf::Meta, &key::container(rec.id));
        let mut mount_root = self.inode(InodeNo::ROOT)?;
        mount_root.nlink = mount_root.nlink.saturating_sub(1).max(2);
        mount_root.mtime = now_ns();
        mount_root.ctime = mount_root.mtime;
        txn.batch.put(
            &self.kv,
            Cf::Inode,
            &key::inode(InodeNo::ROOT, Epoch::ROOT),
            &mount_root.encode(),
        );
        // The container's own counters go with its record; the store's drop by what it held.
        txn.container_delta.clear();
        txn.delta = CounterDelta {
            logical_bytes: -(rec.logical_bytes as i64),
            files: -(rec.files as i64),
            dirs: -(rec.dirs as i64) - 1,
        };
        self.apply(&mut st, txn, &|_| None)?;
        self.containers.write().remove(&rec.id);
        Ok(())
    }

    /// True while a file of the container (or of one of its snapshots) is open.
    pub(crate) fn container_is_busy(&self, container: ContainerId) -> FsResult<bool> {
        let open: Vec<InodeNo> = self.open_files.lock().keys().copied().collect();
        for ino in open {
            if self
                .read_inode(ino)?
                .is_some_and(|(r, _)| r.container == container)
            {
                return Ok(true);
            }
        }
        let ids: std::collections::HashSet<_> =
            self.snapshots_of(container).iter().map(|s| s.id).collect();
        if self
            .mounted_snapshots
            .lock()
            .keys()
            .any(|id| ids.contains(id))
        {
            return Ok(true);
        }
        Ok(self.snap_files.lock().keys().any(|ino| {
            matches!(super::View::of(*ino), super::View::Snapshot(id, _) if ids.contains(&id))
        }))
    }

    /// Every inode reachable from `root`, `root` included, each once.
    fn container_inodes(&self, root: InodeNo) -> FsResult<Vec<InodeNo>> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut stack = vec![root];
        seen.insert(root);
        while let Some(dir) = stack.pop() {
            out.push(dir);
            for entry in self.readdir(dir)? {
                if seen.insert(entry.ino) {
                    if entry.kind == Kind::Dir {
                        stack.push(entry.ino);
                    } else {
                        out.push(entry.ino);
                    }
                }
            }
        }
        Ok(out)
    }
}
