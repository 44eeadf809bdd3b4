//! fsck: recomputes from scratch what the namespace keeps incrementally, and compares.
//!
//! The namespace maintains reference counts, link counts, `data_bytes` and the store and
//! container counters in the same batches that change what they count (DESIGN.md,
//! invariants 1 and 3). fsck reads the raw column families, rebuilds every one of those
//! figures, and reports each difference naming the object it concerns. It writes nothing.
//!
//! What is counted, as the namespace counts it:
//! - refcount(h): stored extent versions (live or not, tombstones excluded) naming h;
//! - `logical_bytes`: lengths of the live extents (newest versions) of existing inodes,
//!   orphans included;
//! - `files`: regular files with at least one link (an orphan left the count at unlink);
//! - `dirs`: directories except the mount root; a container's own counter leaves out the
//!   container's root, the store's counter includes it;
//! - `stored_bytes` / `unique_bytes` / `chunks`: stored values, their raw lengths, their number.
//!
//! Snapshots (namespace/snapshot.rs): every version but the newest of an object must be on
//! exactly one dead list, and every dead-list entry must name an existing version that a
//! snapshot still sees; anything else is a leak or a dangling entry. The newest version of
//! an extent or xattr of a removed inode may be on a dead list too (it was retired without
//! a tombstone, since nothing live reaches it).
//!
//! fsck reads without a database snapshot: run it on a store no process is writing to.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::chunking;
use crate::format::{self, key, DirentRecord, ExtentRecord, InodeRecord, Kind};
use crate::ids::{ChunkId, ContainerId, Epoch, InodeNo};
use crate::kv::{Cf, Kv, KvError};
use crate::namespace::{ContainerRecord, Counters};
use crate::store::StoreConfig;

/// Findings kept in a report; beyond this they are only counted, so that fsck of a badly
/// damaged store still ends with a readable report and bounded memory.
pub const MAX_FINDINGS: usize = 10_000;

/// The part of the store a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Area {
    Meta,
    Chunk,
    Refcount,
    Inode,
    Dirent,
    Extent,
    Xattr,
    Container,
    Counters,
    Orphan,
}

/// One inconsistency: the object it concerns and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub area: Area,
    /// "chunk 3fa9c01d2b7e4410", "inode 17", "extent of inode 9 at offset 65536", ...
    pub object: String,
    pub problem: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.problem)
    }
}

/// How many records of each family fsck read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Scanned {
    pub chunks: u64,
    pub refcounts: u64,
    pub inodes: u64,
    pub dirents: u64,
    pub extents: u64,
    pub xattrs: u64,
    pub containers: u64,
    pub orphans: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    pub findings: Vec<Finding>,
    /// Findings beyond [`MAX_FINDINGS`], counted but not kept.
    pub dropped: u64,
    pub scanned: Scanned,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty() && self.dropped == 0
    }

    /// Every finding count, kept or dropped.
    pub fn problems(&self) -> u64 {
        self.findings.len() as u64 + self.dropped
    }
}

impl fmt::Display for FsckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{finding}")?;
        }
        if self.dropped > 0 {
            writeln!(f, "... and {} more problems", self.dropped)?;
        }
        let s = &self.scanned;
        write!(
            f,
            "{} problems; scanned {} chunks, {} refcounts, {} inodes, {} entries, {} extents, \
             {} xattrs, {} containers, {} orphans",
            self.problems(),
            s.chunks,
            s.refcounts,
            s.inodes,
            s.dirents,
            s.extents,
            s.xattrs,
            s.containers,
            s.orphans
        )
    }
}

/// Checks the store behind `kv`. `config` is the store's configuration (its chunker bounds
/// the length of an extent).
pub fn fsck(kv: &Kv, config: &StoreConfig) -> Result<FsckReport, KvError> {
    let mut c = Checker {
        kv,
        config,
        report: FsckReport::default(),
        inodes: HashMap::new(),
        containers: BTreeMap::new(),
        orphans: HashSet::new(),
        chunks: HashMap::new(),
        refcounts: HashMap::new(),
        refs: HashMap::new(),
        stray_extent_bytes: 0,
        next_ino: 2,
        next_container: 1,
        stored_counters: None,
        snapshots: HashMap::new(),
        dead: HashMap::new(),
    };
    c.scan_meta()?;
    c.scan_snapshots()?;
    c.scan_deadlists()?;
    c.scan_inodes()?;
    c.scan_chunks()?;
    c.scan_refcounts()?;
    c.scan_dirents()?;
    c.scan_extents()?;
    c.scan_xattrs()?;
    c.check_chunks();
    c.check_quarantine()?;
    c.check_deadlists();
    c.check_inodes();
    c.check_containers_and_counters();
    Ok(c.report)
}

/// What fsck learns about a live inode.
struct InodeInfo {
    rec: InodeRecord,
    /// Live directory entries naming it.
    names: u32,
    /// Parents of those entries.
    named_in: Vec<InodeNo>,
    /// Live entries of this directory that are directories.
    subdirs: u32,
    /// Bytes of its live extents.
    live_extent_bytes: u64,
    /// Bytes of every stored extent version.
    all_extent_bytes: u64,
}

/// A stored chunk: value length and the raw length its header records.
struct ChunkInfo {
    stored: u64,
    raw: Option<u32>,
}

struct Checker<'a> {
    kv: &'a Kv,
    config: &'a StoreConfig,
    report: FsckReport,
    inodes: HashMap<InodeNo, InodeInfo>,
    containers: BTreeMap<ContainerId, ContainerRecord>,
    orphans: HashSet<InodeNo>,
    chunks: HashMap<ChunkId, ChunkInfo>,
    refcounts: HashMap<ChunkId, u64>,
    /// Extent versions naming each chunk.
    refs: HashMap<ChunkId, u64>,
    /// Bytes of extent versions whose inode does not exist.
    stray_extent_bytes: u64,
    next_ino: u64,
    next_container: u64,
    stored_counters: Option<Counters>,
    /// Snapshot epochs of each container, ascending.
    snapshots: HashMap<ContainerId, Vec<Epoch>>,
    /// Dead-list entries by family byte and version key: the entry's key, and whether a
    /// scan found the version.
    dead: HashMap<Vec<u8>, (Vec<u8>, bool)>,
}

/// Family byte of the dead-list entries of an area.
fn family_of(area: Area) -> u8 {
    match area {
        Area::Inode => format::family::INODE,
        Area::Dirent => format::family::DIRENT,
        Area::Extent => format::family::EXTENT,
        _ => format::family::XATTR,
    }
}

type Version = (Box<[u8]>, Box<[u8]>);

impl Checker<'_> {
    fn find(&mut self, area: Area, object: impl fmt::Display, problem: impl Into<String>) {
        if self.report.findings.len() >= MAX_FINDINGS {
            self.report.dropped += 1;
            return;
        }
        self.report.findings.push(Finding {
            area,
            object: object.to_string(),
            problem: problem.into(),
        });
    }

    /// Calls `f` once per object of a versioned family with its versions, newest first.
    /// Keys too short to carry an epoch are reported here.
    fn for_each_object(
        &mut self,
        cf: Cf,
        area: Area,
        mut f: impl FnMut(&mut Self, &[Version]),
    ) -> Result<(), KvError> {
        let mut group: Vec<Version> = Vec::new();
        for item in self.kv.scan_prefix(cf, b"") {
            let (k, v) = item?;
            let Some((prefix, _)) = key::split_versioned(&k) else {
                self.find(
                    area,
                    format!("{} key {}", cf.name(), hex::encode(&k)),
                    "key too short to hold an epoch",
                );
                continue;
            };
            let same = group
                .first()
                .and_then(|(gk, _)| key::split_versioned(gk))
                .is_some_and(|(gp, _)| gp == prefix);
            if !same && !group.is_empty() {
                f(self, &group);
                group.clear();
            }
            group.push((k, v));
        }
        if !group.is_empty() {
            f(self, &group);
        }
        Ok(())
    }

    /// Marks a version as found; true when it is on a dead list.
    fn dead_listed(&mut self, area: Area, version: &[u8]) -> bool {
        let mut k = vec![family_of(area)];
        k.extend_from_slice(version);
        match self.dead.get_mut(&k) {
            Some(entry) => {
                entry.1 = true;
                true
            }
            None => false,
        }
    }

    /// Checks the versions of one object; returns the newest when it is live (not a
    /// tombstone). Every older version must be on a dead list.
    fn versions<'v>(
        &mut self,
        area: Area,
        object: &str,
        versions: &'v [Version],
    ) -> Option<&'v [u8]> {
        if let Some((k, _)) = versions.first() {
            self.dead_listed(area, k);
        }
        for (k, _) in versions.iter().skip(1) {
            if self.dead_listed(area, k) {
                continue;
            }
            let epoch = key::split_versioned(k).map(|(_, e)| e.0).unwrap_or(0);
            self.find(
                area,
                object,
                format!("superseded version born at epoch {epoch} is on no dead list, so no snapshot can see it"),
            );
        }
        let (_, newest) = versions.first()?;
        if format::is_tombstone(newest) {
            None
        } else {
            Some(newest)
        }
    }

    /// Live epoch of `container`, the newest epoch a version may be born at.
    fn live_epoch(&self, container: ContainerId) -> Epoch {
        if container == ContainerId::NONE {
            return Epoch::ROOT;
        }
        self.containers
            .get(&container)
            .map(|c| c.live_epoch)
            .unwrap_or(Epoch(u64::MAX))
    }

    fn check_birth(&mut self, area: Area, object: &str, container: ContainerId, birth: Epoch) {
        let live = self.live_epoch(container);
        if birth > live {
            self.find(
                area,
                object,
                format!(
                    "born at epoch {}, after the live epoch {} of {container}",
                    birth.0, live.0
                ),
            );
        }
    }

    fn scan_meta(&mut self) -> Result<(), KvError> {
        match self.kv.get(Cf::Meta, format::meta::NEXT_INODE)? {
            None => {}
            Some(v) => match format::decode_count(&v) {
                Some(n) => self.next_ino = n,
                None => self.find(Area::Meta, "next-inode record", "does not decode"),
            },
        }
        match self.kv.get(Cf::Meta, format::meta::NEXT_CONTAINER)? {
            None => {}
            Some(v) => match format::decode_count(&v) {
                Some(n) => self.next_container = n,
                None => self.find(Area::Meta, "next-container record", "does not decode"),
            },
        }
        self.stored_counters = match self.kv.get(Cf::Meta, format::meta::STORE_COUNTERS)? {
            // Written with the first operation that changes a counter.
            None => Some(Counters::default()),
            Some(v) => match serde_json::from_slice(&v) {
                Ok(c) => Some(c),
                Err(e) => {
                    self.find(
                        Area::Counters,
                        "store counters",
                        format!("do not decode: {e}"),
                    );
                    None
                }
            },
        };
        let mut names: HashMap<String, ContainerId> = HashMap::new();
        for item in self
            .kv
            .scan_prefix(Cf::Meta, format::meta::CONTAINER_PREFIX)
        {
            let (k, v) = item?;
            self.report.scanned.containers += 1;
            let object = format!("container record {}", hex::encode(&k));
            let rec: ContainerRecord = match serde_json::from_slice(&v) {
                Ok(r) => r,
                Err(e) => {
                    self.find(Area::Container, object, format!("does not decode: {e}"));
                    continue;
                }
            };
            if k.as_ref() != key::container(rec.id).as_slice() {
                self.find(
                    Area::Container,
                    &object,
                    format!(
                        "is stored under a key that does not name its id {}",
                        rec.id.0
                    ),
                );
            }
            if rec.id == ContainerId::NONE || rec.id.0 as u64 >= self.next_container {
                self.find(
                    Area::Container,
                    format!("container {:?}", rec.name),
                    format!(
                        "id {} is outside the allocated range 1..{}",
                        rec.id.0, self.next_container
                    ),
                );
            }
            if let Some(other) = names.insert(rec.name.clone(), rec.id) {
                self.find(
                    Area::Container,
                    format!("container {:?}", rec.name),
                    format!("name is used by containers {} and {}", other.0, rec.id.0),
                );
            }
            self.containers.insert(rec.id, rec);
        }
        for item in self.kv.scan_prefix(Cf::Meta, format::meta::ORPHAN_PREFIX) {
            let (k, _) = item?;
            self.report.scanned.orphans += 1;
            match key::parse_orphan(&k) {
                Some(ino) => {
                    self.orphans.insert(ino);
                }
                None => self.find(
                    Area::Orphan,
                    format!("orphan key {}", hex::encode(&k)),
                    "does not parse",
                ),
            }
        }
        Ok(())
    }

    fn scan_snapshots(&mut self) -> Result<(), KvError> {
        let mut names: HashSet<(ContainerId, String)> = HashSet::new();
        let next_snapshot = match self.kv.get(Cf::Meta, format::meta::NEXT_SNAPSHOT)? {
            Some(v) => format::decode_count(&v).unwrap_or(1),
            None => 1,
        };
        for item in self.kv.scan_prefix(Cf::Meta, format::meta::SNAPSHOT_PREFIX) {
            let (k, v) = item?;
            let object = format!("snapshot record {}", hex::encode(&k));
            let rec: crate::namespace::SnapshotRecord = match serde_json::from_slice(&v) {
                Ok(r) => r,
                Err(e) => {
                    self.find(Area::Meta, object, format!("does not decode: {e}"));
                    continue;
                }
            };
            let object = format!("snapshot {:?} of {}", rec.name, rec.container);
            if k.as_ref() != key::snapshot(rec.container, rec.epoch).as_slice() {
                self.find(
                    Area::Meta,
                    &object,
                    "is stored under a key that does not name it",
                );
            }
            if rec.id.0 as u64 >= next_snapshot || rec.id.0 == 0 {
                self.find(
                    Area::Meta,
                    &object,
                    format!("id {} was never allocated", rec.id.0),
                );
            }
            if !names.insert((rec.container, rec.name.clone())) {
                self.find(Area::Meta, &object, "name is used twice in its container");
            }
            match self.containers.get(&rec.container) {
                None => self.find(Area::Meta, &object, "its container does not exist"),
                Some(c) if rec.epoch >= c.live_epoch => self.find(
                    Area::Meta,
                    &object,
                    format!(
                        "epoch {} is not before the live epoch {}",
                        rec.epoch.0, c.live_epoch.0
                    ),
                ),
                Some(_) => {}
            }
            self.snapshots
                .entry(rec.container)
                .or_default()
                .push(rec.epoch);
        }
        for epochs in self.snapshots.values_mut() {
            epochs.sort();
        }
        Ok(())
    }

    fn scan_deadlists(&mut self) -> Result<(), KvError> {
        for item in self.kv.scan_prefix(Cf::Deadlist, b"") {
            let (k, _) = item?;
            let object = format!("dead-list entry {}", hex::encode(&k));
            let Some((cid, kill, birth, fam, vkey)) = key::parse_deadlist(&k) else {
                self.find(Area::Meta, object, "does not parse");
                continue;
            };
            let version_birth = key::split_versioned(vkey).map(|(_, e)| e);
            if version_birth != Some(birth) || birth >= kill {
                self.find(
                    Area::Meta,
                    &object,
                    format!(
                        "birth {} and kill {} do not fit its version",
                        birth.0, kill.0
                    ),
                );
            }
            let seen = self
                .snapshots
                .get(&cid)
                .is_some_and(|e| e.iter().any(|s| birth <= *s && *s < kill));
            if !seen {
                self.find(
                    Area::Meta,
                    &object,
                    format!(
                        "no snapshot of {cid} sees it (born {}, killed {}): it should be gone",
                        birth.0, kill.0
                    ),
                );
            }
            if !self.containers.contains_key(&cid) {
                self.find(Area::Meta, &object, format!("{cid} does not exist"));
            }
            let mut id = vec![fam];
            id.extend_from_slice(vkey);
            if self.dead.insert(id, (k.to_vec(), false)).is_some() {
                self.find(Area::Meta, &object, "its version is on two dead lists");
            }
        }
        Ok(())
    }

    /// A quarantine record must name a stored chunk (the record goes with the chunk).
    fn check_quarantine(&mut self) -> Result<(), KvError> {
        for item in self
            .kv
            .scan_prefix(Cf::Meta, format::meta::QUARANTINE_PREFIX)
        {
            let (k, _) = item?;
            match key::parse_quarantine(&k) {
                Some(id) if self.chunks.contains_key(&id) => {}
                Some(id) => self.find(
                    Area::Chunk,
                    format!("chunk {id}"),
                    "is quarantined but not stored",
                ),
                None => self.find(
                    Area::Meta,
                    format!("quarantine key {}", hex::encode(&k)),
                    "does not parse",
                ),
            }
        }
        Ok(())
    }

    fn check_deadlists(&mut self) {
        let mut dangling: Vec<String> = self
            .dead
            .values()
            .filter(|(_, seen)| !seen)
            .map(|(k, _)| hex::encode(k))
            .collect();
        dangling.sort();
        for k in dangling {
            self.find(
                Area::Meta,
                format!("dead-list entry {k}"),
                "names a version that does not exist",
            );
        }
    }

    fn scan_inodes(&mut self) -> Result<(), KvError> {
        self.for_each_object(Cf::Inode, Area::Inode, |c, versions| {
            c.report.scanned.inodes += 1;
            let Some((ino, _)) = key::parse_inode(&versions[0].0) else {
                c.find(
                    Area::Inode,
                    format!("inode key {}", hex::encode(&versions[0].0)),
                    "does not parse",
                );
                return;
            };
            let object = ino.to_string();
            let Some(value) = c.versions(Area::Inode, &object, versions) else {
                return;
            };
            let Some(rec) = InodeRecord::decode(value) else {
                c.find(Area::Inode, &object, "record does not decode");
                return;
            };
            if let Some((_, birth)) = key::parse_inode(&versions[0].0) {
                c.check_birth(Area::Inode, &object, rec.container, birth);
            }
            c.inodes.insert(
                ino,
                InodeInfo {
                    rec,
                    names: 0,
                    named_in: Vec::new(),
                    subdirs: 0,
                    live_extent_bytes: 0,
                    all_extent_bytes: 0,
                },
            );
        })
    }

    fn scan_chunks(&mut self) -> Result<(), KvError> {
        for item in self.kv.scan_prefix(Cf::Chunk, b"") {
            let (k, v) = item?;
            self.report.scanned.chunks += 1;
            let Some(id) = ChunkId::from_slice(&k) else {
                self.find(
                    Area::Chunk,
                    format!("chunk key {}", hex::encode(&k)),
                    "is not a 32-byte hash",
                );
                continue;
            };
            match chunking::decode(&v) {
                Err(e) => self.find(
                    Area::Chunk,
                    format!("chunk {id}"),
                    format!("does not decode: {e}"),
                ),
                Ok(raw) => {
                    if ChunkId::of(&raw) != id {
                        self.find(
                            Area::Chunk,
                            format!("chunk {id}"),
                            "BLAKE3 of its bytes differs from its key",
                        );
                    }
                }
            }
            self.chunks.insert(
                id,
                ChunkInfo {
                    stored: v.len() as u64,
                    raw: chunking::stored_raw_len(&v),
                },
            );
        }
        Ok(())
    }

    fn scan_refcounts(&mut self) -> Result<(), KvError> {
        for item in self.kv.scan_prefix(Cf::Refcount, b"") {
            let (k, v) = item?;
            self.report.scanned.refcounts += 1;
            let Some(id) = ChunkId::from_slice(&k) else {
                self.find(
                    Area::Refcount,
                    format!("refcount key {}", hex::encode(&k)),
                    "is not a 32-byte hash",
                );
                continue;
            };
            match format::decode_count(&v) {
                Some(n) => {
                    self.refcounts.insert(id, n);
                }
                None => self.find(
                    Area::Refcount,
                    format!("chunk {id}"),
                    "refcount value does not decode",
                ),
            }
        }
        Ok(())
    }

    fn scan_dirents(&mut self) -> Result<(), KvError> {
        let mut containers_by_name: HashMap<Vec<u8>, InodeNo> = self
            .containers
            .values()
            .map(|r| (r.name.as_bytes().to_vec(), r.root))
            .collect();
        self.for_each_object(Cf::Dirent, Area::Dirent, |c, versions| {
            c.report.scanned.dirents += 1;
            let Some((parent, name, birth)) = key::parse_named(&versions[0].0) else {
                c.find(
                    Area::Dirent,
                    format!("entry key {}", hex::encode(&versions[0].0)),
                    "does not parse",
                );
                return;
            };
            let object = format!("entry {:?} of {parent}", String::from_utf8_lossy(name));
            let Some(value) = c.versions(Area::Dirent, &object, versions) else {
                return;
            };
            let Some(d) = DirentRecord::decode(value) else {
                c.find(Area::Dirent, &object, "record does not decode");
                return;
            };
            if let Err(e) = crate::namespace::check_name(name) {
                c.find(Area::Dirent, &object, format!("invalid name: {e}"));
            }
            match c.inodes.get(&parent) {
                None => c.find(Area::Dirent, &object, "parent directory does not exist"),
                Some(p) if p.rec.kind != Kind::Dir => c.find(
                    Area::Dirent,
                    &object,
                    format!("parent is a {:?}, not a directory", p.rec.kind),
                ),
                Some(p) => {
                    let container = p.rec.container;
                    c.check_birth(Area::Dirent, &object, container, birth);
                }
            }
            if parent == InodeNo::ROOT {
                match containers_by_name.remove(name) {
                    Some(root) if root == d.child => {}
                    Some(root) => c.find(
                        Area::Dirent,
                        &object,
                        format!(
                            "names inode {} but the container's root is inode {}",
                            d.child.0, root.0
                        ),
                    ),
                    None => c.find(Area::Dirent, &object, "names no container"),
                }
            }
            match c.inodes.get_mut(&d.child) {
                None => c.find(
                    Area::Dirent,
                    &object,
                    format!("names {}, which does not exist", d.child),
                ),
                Some(child) => {
                    child.names += 1;
                    child.named_in.push(parent);
                    let kind = child.rec.kind;
                    if kind != d.kind {
                        c.find(
                            Area::Dirent,
                            &object,
                            format!("says {} is a {:?} but it is a {:?}", d.child, d.kind, kind),
                        );
                    }
                    if kind == Kind::Dir {
                        if let Some(p) = c.inodes.get_mut(&parent) {
                            p.subdirs += 1;
                        }
                    }
                }
            }
        })?;
        let mut missing: Vec<_> = containers_by_name.into_iter().collect();
        missing.sort();
        for (name, _) in missing {
            self.find(
                Area::Container,
                format!("container {:?}", String::from_utf8_lossy(&name)),
                "has no entry in the mount root",
            );
        }
        Ok(())
    }

    fn scan_extents(&mut self) -> Result<(), KvError> {
        // The live extent before the current one, of the same inode: (ino, offset, end).
        let mut prev: Option<(InodeNo, u64, u64)> = None;
        let max_len = self.config.chunker.max;
        self.for_each_object(Cf::Extent, Area::Extent, |c, versions| {
            c.report.scanned.extents += 1;
            let Some((ino, offset, _)) = key::parse_extent(&versions[0].0) else {
                c.find(
                    Area::Extent,
                    format!("extent key {}", hex::encode(&versions[0].0)),
                    "does not parse",
                );
                return;
            };
            let object = format!("extent of {ino} at offset {offset}");
            // Every stored version holds a reference, whether the live view sees it or not.
            let mut all_bytes = 0u64;
            for (k, v) in versions {
                if format::is_tombstone(v) {
                    continue;
                }
                match ExtentRecord::decode(v) {
                    Some(e) => {
                        *c.refs.entry(e.chunk).or_insert(0) += 1;
                        all_bytes += e.len as u64;
                    }
                    None => {
                        let epoch = key::parse_extent(k).map(|(_, _, e)| e.0).unwrap_or(0);
                        c.find(
                            Area::Extent,
                            &object,
                            format!("version born at epoch {epoch} does not decode"),
                        );
                    }
                }
            }
            let Some(value) = c.versions(Area::Extent, &object, versions) else {
                return;
            };
            let Some(e) = ExtentRecord::decode(value) else {
                return;
            };
            let end = offset.saturating_add(e.len as u64);
            if e.len == 0 {
                c.find(Area::Extent, &object, "has length 0");
            } else if e.len > max_len {
                c.find(
                    Area::Extent,
                    &object,
                    format!("length {} exceeds the chunker's maximum {max_len}", e.len),
                );
            }
            match c.chunks.get(&e.chunk) {
                None => c.find(Area::Extent, &object, format!("chunk {} missing", e.chunk)),
                Some(info) => {
                    if info.raw.is_some_and(|raw| raw != e.len) {
                        c.find(
                            Area::Extent,
                            &object,
                            format!(
                                "length {} but chunk {} holds {} bytes",
                                e.len,
                                e.chunk,
                                info.raw.unwrap_or(0)
                            ),
                        );
                    }
                }
            }
            if let Some((p_ino, p_off, p_end)) = prev {
                if p_ino == ino && p_end > offset {
                    c.find(
                        Area::Extent,
                        &object,
                        format!("overlaps the extent at offset {p_off}, which ends at {p_end}"),
                    );
                }
            }
            prev = Some((ino, offset, end));
            let retired = c.dead_listed(Area::Extent, &versions[0].0);
            match c.inodes.get_mut(&ino) {
                None if retired => {}
                None => {
                    c.stray_extent_bytes += e.len as u64;
                    c.find(Area::Extent, &object, format!("{ino} does not exist"));
                }
                Some(info) => {
                    info.live_extent_bytes += e.len as u64;
                    info.all_extent_bytes += all_bytes;
                    let (kind, size, container) =
                        (info.rec.kind, info.rec.size, info.rec.container);
                    if kind != Kind::File {
                        c.find(
                            Area::Extent,
                            &object,
                            format!("{ino} is a {kind:?}, not a regular file"),
                        );
                    }
                    if end > size {
                        c.find(
                            Area::Extent,
                            &object,
                            format!("ends at {end}, beyond the file's size {size}"),
                        );
                    }
                    if let Some((_, _, birth)) = key::parse_extent(&versions[0].0) {
                        c.check_birth(Area::Extent, &object, container, birth);
                    }
                }
            }
        })
    }

    fn scan_xattrs(&mut self) -> Result<(), KvError> {
        self.for_each_object(Cf::Xattr, Area::Xattr, |c, versions| {
            c.report.scanned.xattrs += 1;
            let Some((ino, name, _)) = key::parse_named(&versions[0].0) else {
                c.find(
                    Area::Xattr,
                    format!("xattr key {}", hex::encode(&versions[0].0)),
                    "does not parse",
                );
                return;
            };
            let object = format!("xattr {:?} of {ino}", String::from_utf8_lossy(name));
            if name.is_empty() {
                c.find(Area::Xattr, &object, "has an empty name");
            }
            for (_, v) in versions {
                if !matches!(v.first(), Some(&format::LIVE) | Some(&format::TOMBSTONE)) {
                    c.find(Area::Xattr, &object, "value has no valid tag");
                }
            }
            if c.versions(Area::Xattr, &object, versions).is_none() {
                return;
            }
            if !c.inodes.contains_key(&ino) && !c.dead_listed(Area::Xattr, &versions[0].0) {
                c.find(Area::Xattr, &object, format!("{ino} does not exist"));
            }
        })
    }

    fn check_chunks(&mut self) {
        let mut ids: Vec<ChunkId> = self
            .chunks
            .keys()
            .chain(self.refcounts.keys())
            .chain(self.refs.keys())
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        ids.sort();
        for id in ids {
            let object = format!("chunk {id}");
            let refs = self.refs.get(&id).copied().unwrap_or(0);
            let count = self.refcounts.get(&id).copied();
            let present = self.chunks.contains_key(&id);
            match count {
                Some(0) => self.find(
                    Area::Refcount,
                    &object,
                    format!("refcount 0 is stored, referenced by {refs} extents"),
                ),
                Some(n) if refs == 0 => self.find(
                    Area::Refcount,
                    &object,
                    format!("refcount {n} but no extent references it"),
                ),
                Some(n) if n != refs => self.find(
                    Area::Refcount,
                    &object,
                    format!("refcount {n}, referenced by {refs} extents"),
                ),
                None if refs > 0 => self.find(
                    Area::Refcount,
                    &object,
                    format!("no refcount, referenced by {refs} extents"),
                ),
                None if present => self.find(
                    Area::Chunk,
                    &object,
                    "stored without a refcount or any reference",
                ),
                _ => {}
            }
            if !present && count.is_some_and(|n| n > 0) {
                self.find(
                    Area::Chunk,
                    &object,
                    "has a refcount but is missing from the chunk family",
                );
            }
        }
    }

    fn check_inodes(&mut self) {
        let container_roots: HashMap<InodeNo, ContainerId> =
            self.containers.values().map(|r| (r.root, r.id)).collect();
        let mut inos: Vec<InodeNo> = self.inodes.keys().copied().collect();
        inos.sort();
        let mut found = Vec::new();
        for ino in inos {
            let info = &self.inodes[&ino];
            let rec = &info.rec;
            let mut bad = |problem: String| found.push((Area::Inode, ino.to_string(), problem));
            if ino.0 >= self.next_ino && ino != InodeNo::ROOT {
                bad(format!(
                    "number is not below the next one to allocate ({})",
                    self.next_ino
                ));
            }
            if ino == InodeNo::ROOT {
                if rec.container != ContainerId::NONE {
                    bad(format!("mount root belongs to {}", rec.container));
                }
            } else if !self.containers.contains_key(&rec.container) {
                bad(format!(
                    "belongs to {}, which does not exist",
                    rec.container
                ));
            }
            let orphan = self.orphans.contains(&ino);
            if rec.kind == Kind::Dir {
                let want = 2 + info.subdirs;
                if rec.nlink != want {
                    bad(format!(
                        "nlink {} but {} subdirectories (want {want})",
                        rec.nlink, info.subdirs
                    ));
                }
                let root_of = container_roots.get(&ino);
                if ino == InodeNo::ROOT {
                    if info.names != 0 {
                        bad(format!(
                            "mount root is named by {} directory entries",
                            info.names
                        ));
                    }
                } else if info.names != 1 {
                    bad(format!(
                        "directory is named by {} directory entries (want 1)",
                        info.names
                    ));
                } else if info.named_in[0] != rec.parent {
                    bad(format!(
                        "directory's parent is recorded as inode {} but its entry is in inode {}",
                        rec.parent.0, info.named_in[0].0
                    ));
                }
                if let Some(cid) = root_of {
                    if info.named_in.first().is_some_and(|p| *p != InodeNo::ROOT) {
                        bad(format!("root of {cid} is named outside the mount root"));
                    }
                } else if info.named_in.contains(&InodeNo::ROOT) {
                    bad("directory in the mount root is no container's root".into());
                }
                if orphan {
                    bad("directory is on the orphan list".into());
                }
            } else {
                if rec.nlink != info.names {
                    bad(format!(
                        "nlink {} but {} directory entries",
                        rec.nlink, info.names
                    ));
                }
                if info.names == 0 && !orphan {
                    bad("no directory entry names it and it is not on the orphan list".into());
                }
                if orphan && rec.nlink != 0 {
                    bad(format!("on the orphan list with nlink {}", rec.nlink));
                }
            }
            if rec.data_bytes != info.live_extent_bytes {
                bad(format!(
                    "data_bytes {} but its extents hold {} bytes",
                    rec.data_bytes, info.live_extent_bytes
                ));
            }
            if rec.kind == Kind::Symlink
                && (rec.target.is_empty() || rec.size != rec.target.len() as u64)
            {
                bad(format!(
                    "symlink of size {} has a target of {} bytes",
                    rec.size,
                    rec.target.len()
                ));
            }
            if rec.kind != Kind::Symlink && !rec.target.is_empty() {
                bad(format!("{:?} carries a symlink target", rec.kind));
            }
        }
        let mut stale: Vec<InodeNo> = self
            .orphans
            .iter()
            .filter(|ino| !self.inodes.contains_key(ino))
            .copied()
            .collect();
        stale.sort();
        for ino in stale {
            found.push((
                Area::Orphan,
                format!("orphan entry for {ino}"),
                "the inode does not exist".into(),
            ));
        }
        // `init` leaves a store without a root, which the first open creates.
        let untouched = self.report.scanned.inodes == 0
            && self.report.scanned.dirents == 0
            && self.containers.is_empty();
        if !self.inodes.contains_key(&InodeNo::ROOT) && !untouched {
            found.push((
                Area::Inode,
                InodeNo::ROOT.to_string(),
                "mount root does not exist".into(),
            ));
        }
        for (area, object, problem) in found {
            self.find(area, object, problem);
        }
    }

    fn check_containers_and_counters(&mut self) {
        #[derive(Default)]
        struct Recount {
            logical_bytes: u64,
            files: u64,
            dirs: u64,
        }
        let mut per: HashMap<ContainerId, Recount> = HashMap::new();
        let mut total = Counters::default();
        let container_roots: HashSet<InodeNo> = self.containers.values().map(|r| r.root).collect();
        for (ino, info) in &self.inodes {
            let r = per.entry(info.rec.container).or_default();
            r.logical_bytes += info.live_extent_bytes;
            total.logical_bytes += info.live_extent_bytes;
            match info.rec.kind {
                Kind::File if info.rec.nlink > 0 => {
                    r.files += 1;
                    total.files += 1;
                }
                Kind::Dir if *ino != InodeNo::ROOT => {
                    total.dirs += 1;
                    if !container_roots.contains(ino) {
                        r.dirs += 1;
                    }
                }
                _ => {}
            }
        }
        // Extents of missing inodes (reported already) still count in the store's figure.
        total.logical_bytes += self.stray_extent_bytes;
        for info in self.chunks.values() {
            total.chunks += 1;
            total.stored_bytes += info.stored;
            total.unique_bytes += info.raw.unwrap_or(0) as u64;
        }

        let mut found = Vec::new();
        for rec in self.containers.values() {
            let object = format!("container {:?} ({})", rec.name, rec.id);
            match self.inodes.get(&rec.root) {
                None => found.push((object.clone(), format!("root {} does not exist", rec.root))),
                Some(info) => {
                    if info.rec.kind != Kind::Dir {
                        found.push((
                            object.clone(),
                            format!("root {} is a {:?}", rec.root, info.rec.kind),
                        ));
                    }
                    if info.rec.container != rec.id {
                        found.push((
                            object.clone(),
                            format!("root {} belongs to {}", rec.root, info.rec.container),
                        ));
                    }
                }
            }
            if rec.live_epoch < Epoch::FIRST {
                found.push((
                    object.clone(),
                    format!("live epoch {} is before the first", rec.live_epoch.0),
                ));
            }
            let got = per.remove(&rec.id).unwrap_or_default();
            for (what, stored, counted) in [
                ("logical_bytes", rec.logical_bytes, got.logical_bytes),
                ("files", rec.files, got.files),
                ("dirs", rec.dirs, got.dirs),
            ] {
                if stored != counted {
                    found.push((
                        object.clone(),
                        format!("{what} is {stored} but a recount gives {counted}"),
                    ));
                }
            }
        }
        for (area, object, problem) in found
            .into_iter()
            .map(|(o, p)| (Area::Container, o, p))
            .collect::<Vec<_>>()
        {
            self.find(area, object, problem);
        }
        if let Some(stored) = self.stored_counters {
            for (what, s, counted) in [
                ("logical_bytes", stored.logical_bytes, total.logical_bytes),
                ("stored_bytes", stored.stored_bytes, total.stored_bytes),
                ("unique_bytes", stored.unique_bytes, total.unique_bytes),
                ("chunks", stored.chunks, total.chunks),
                ("files", stored.files, total.files),
                ("dirs", stored.dirs, total.dirs),
            ] {
                if s != counted {
                    self.find(
                        Area::Counters,
                        "store counters",
                        format!("{what} is {s} but a recount gives {counted}"),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::chunking::{ChunkerParams, Compression};
    use crate::kv::{Batch, Sync};
    use crate::namespace::{Caller, Namespace};
    use crate::store::Store;

    struct Damaged {
        _dir: tempfile::TempDir,
        ns: Arc<Namespace>,
        file: InodeNo,
        dir: InodeNo,
    }

    /// A container with a directory and a two-chunk file, clean.
    fn store() -> Damaged {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        Store::init(
            &path,
            ChunkerParams::with_average(4096).expect("params"),
            Compression::Zstd(1),
        )
        .expect("init");
        let ns = Namespace::new(Store::open(&path).expect("open"), 1 << 20).expect("namespace");
        let c = ns
            .create_container("c", Caller::ROOT, 0o755)
            .expect("container");
        let d = ns
            .make_node(c.root, b"d", Kind::Dir, 0o755, 0, b"", Caller::ROOT)
            .expect("mkdir")
            .ino;
        let f = ns
            .create_file(d, b"f", 0o644, Caller::ROOT)
            .expect("create")
            .ino;
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        ns.write(f, 0, &data).expect("write");
        let s = Damaged {
            _dir: dir,
            ns,
            file: f,
            dir: d,
        };
        let report = s.fsck();
        assert!(report.is_clean(), "fresh store is not clean:\n{report}");
        s
    }

    impl Damaged {
        fn kv(&self) -> &Kv {
            &self.ns.store().kv
        }

        fn fsck(&self) -> FsckReport {
            fsck(self.kv(), &self.ns.store().config).expect("fsck runs")
        }

        fn put(&self, cf: Cf, key: &[u8], value: &[u8]) {
            let mut b = Batch::new();
            b.put(self.kv(), cf, key, value);
            self.kv().write(b, Sync::Process).expect("write");
        }

        fn delete(&self, cf: Cf, key: &[u8]) {
            let mut b = Batch::new();
            b.delete(self.kv(), cf, key);
            self.kv().write(b, Sync::Process).expect("write");
        }

        fn first(&self, cf: Cf, prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
            let (k, v) = self
                .kv()
                .scan_prefix(cf, prefix)
                .next()
                .expect("a record")
                .expect("readable");
            (k.to_vec(), v.to_vec())
        }

        fn inode(&self, ino: InodeNo) -> (Vec<u8>, InodeRecord) {
            let (k, v) = self.first(Cf::Inode, &key::inode_prefix(ino));
            (k, InodeRecord::decode(&v).expect("record"))
        }

        /// Asserts that fsck finds exactly problems mentioning each of `wanted`.
        fn expect(&self, wanted: &[&str]) {
            let report = self.fsck();
            for w in wanted {
                assert!(
                    report.findings.iter().any(|f| f.to_string().contains(w)),
                    "no finding mentions {w:?}:\n{report}"
                );
            }
            assert_eq!(report.findings.len(), wanted.len(), "{report}");
        }
    }

    #[test]
    fn a_store_never_opened_is_clean() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        Store::init(&path, ChunkerParams::default(), Compression::Zstd(1)).expect("init");
        let store = Store::open(&path).expect("open");
        let report = fsck(&store.kv, &store.config).expect("fsck runs");
        assert!(report.is_clean(), "{report}");
    }

    #[test]
    fn wrong_refcount_is_found() {
        let s = store();
        let (k, v) = s.first(Cf::Refcount, b"");
        let id = ChunkId::from_slice(&k).expect("id");
        let n = format::decode_count(&v).expect("count");
        s.put(Cf::Refcount, &k, &format::encode_count(n + 2));
        s.expect(&[&format!(
            "chunk {id}: refcount {}, referenced by {n} extents",
            n + 2
        )]);
        s.put(Cf::Refcount, &k, &format::encode_count(0));
        s.expect(&["refcount 0 is stored"]);
        s.delete(Cf::Refcount, &k);
        s.expect(&[&format!(
            "chunk {id}: no refcount, referenced by {n} extents"
        )]);
    }

    #[test]
    fn missing_and_corrupt_chunks_are_found() {
        let s = store();
        let (k, v) = s.first(Cf::Chunk, b"");
        let id = ChunkId::from_slice(&k).expect("id");
        let mut bad = chunking::decode(&v).expect("decodes");
        bad[0] ^= 1;
        s.put(Cf::Chunk, &k, &chunking::encode(&bad, Compression::None));
        // Stored raw now, so its stored length differs too.
        s.expect(&[
            &format!("chunk {id}: BLAKE3"),
            "store counters: stored_bytes",
        ]);
        s.put(Cf::Chunk, &k, &[9, 9]);
        s.expect(&[
            "does not decode",
            "store counters: stored_bytes",
            "store counters: unique_bytes",
        ]);
        s.delete(Cf::Chunk, &k);
        s.expect(&[
            &format!("chunk {id} missing"),
            "missing from the chunk family",
            "store counters: stored_bytes",
            "store counters: unique_bytes",
            "store counters: chunks",
        ]);
    }

    #[test]
    fn unreferenced_chunk_is_found() {
        let s = store();
        let raw = b"nobody points here";
        let id = ChunkId::of(raw);
        s.put(Cf::Chunk, &id.0, &chunking::encode(raw, Compression::None));
        s.put(Cf::Refcount, &id.0, &format::encode_count(1));
        s.expect(&[
            &format!("chunk {id}: refcount 1 but no extent references it"),
            "stored_bytes",
            "unique_bytes",
            "chunks",
        ]);
    }

    #[test]
    fn link_count_and_orphan_mistakes_are_found() {
        let s = store();
        let (k, mut rec) = s.inode(s.file);
        rec.nlink = 2;
        s.put(Cf::Inode, &k, &rec.encode());
        s.expect(&[&format!(
            "inode {}: nlink 2 but 1 directory entries",
            s.file.0
        )]);
        // The entry goes but the inode stays, not on the orphan list.
        rec.nlink = 1;
        s.put(Cf::Inode, &k, &rec.encode());
        let (dk, _) = s.first(Cf::Dirent, &key::dir_prefix(s.dir));
        s.delete(Cf::Dirent, &dk);
        s.expect(&["nlink 1 but 0 directory entries", "not on the orphan list"]);
        let (dk2, mut drec) = s.inode(s.dir);
        drec.nlink = 3;
        s.put(Cf::Inode, &dk2, &drec.encode());
        s.expect(&[
            "nlink 1 but 0 directory entries",
            "not on the orphan list",
            "nlink 3 but 0 subdirectories",
        ]);
    }

    #[test]
    fn dangling_and_mistyped_entries_are_found() {
        let s = store();
        let ghost = DirentRecord {
            child: InodeNo(999),
            kind: Kind::File,
        };
        s.put(
            Cf::Dirent,
            &key::dirent(s.dir, b"ghost", Epoch::FIRST),
            &ghost.encode(),
        );
        s.expect(&[&format!(
            "entry \"ghost\" of inode {}: names inode 999, which does not exist",
            s.dir.0
        )]);
        let wrong = DirentRecord {
            child: s.file,
            kind: Kind::Dir,
        };
        s.put(
            Cf::Dirent,
            &key::dirent(s.dir, b"ghost", Epoch::FIRST),
            &wrong.encode(),
        );
        s.expect(&[
            "is a Dir but it is a File",
            "nlink 1 but 2 directory entries",
        ]);
    }

    #[test]
    fn extent_mistakes_are_found() {
        let s = store();
        let (k, mut rec) = s.inode(s.file);
        rec.size = 100;
        s.put(Cf::Inode, &k, &rec.encode());
        let report = s.fsck();
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.problem.contains("beyond the file's size 100")),
            "{report}"
        );
        rec.size = 40_000;
        rec.data_bytes = 7;
        s.put(Cf::Inode, &k, &rec.encode());
        s.expect(&["data_bytes 7 but its extents hold 40000 bytes"]);
        rec.data_bytes = 40_000;
        s.put(Cf::Inode, &k, &rec.encode());
        // A second extent starting inside the first.
        let (ek, ev) = s.first(Cf::Extent, &key::extents_prefix(s.file));
        let (_, offset, _) = key::parse_extent(&ek).expect("key");
        s.put(
            Cf::Extent,
            &key::extent(s.file, offset + 1, Epoch::FIRST),
            &ev,
        );
        let report = s.fsck();
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.problem.contains("overlaps the extent at offset 0")),
            "{report}"
        );
    }

    #[test]
    fn counter_drift_is_found() {
        let s = store();
        let mut c = s.ns.counters();
        c.files += 1;
        c.logical_bytes -= 1;
        s.put(
            Cf::Meta,
            format::meta::STORE_COUNTERS,
            &serde_json::to_vec(&c).expect("json"),
        );
        s.expect(&["files is 2 but a recount gives 1", "logical_bytes is 39999"]);
        let mut rec = s.ns.container_by_name("c").expect("container");
        rec.dirs = 5;
        s.put(Cf::Meta, &key::container(rec.id), &rec.encode());
        s.expect(&[
            "files is 2",
            "logical_bytes is 39999",
            "container \"c\" (container 1): dirs is 5 but a recount gives 1",
        ]);
    }

    #[test]
    fn stale_versions_and_xattrs_of_missing_inodes_are_found() {
        let s = store();
        let (_, rec) = s.inode(s.file);
        // An older version of the inode, which no snapshot can see.
        s.put(Cf::Inode, &key::inode(s.file, Epoch(0)), &rec.encode());
        s.put(
            Cf::Xattr,
            &key::xattr(InodeNo(4242), b"user.x", Epoch::FIRST),
            &[format::LIVE, 1],
        );
        s.expect(&[
            "superseded version born at epoch 0",
            "xattr \"user.x\" of inode 4242",
        ]);
    }
}
