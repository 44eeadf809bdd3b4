//! Ingest: makes a directory of a container an exact copy of a source tree, what
//! `rsync -a --delete SOURCE/ MOUNT/CONTAINER/` does, but on the namespace directly and with
//! several workers. Through the mount every file costs the writer a handful of FUSE round
//! trips, one after the other (lookup, create, write, setattr, flush, ...); here a file costs
//! the namespace calls alone, and files are chunked on every core at once.
//!
//! What must hold:
//! - The source is only read, and nothing outside the target directory changes.
//! - A file that already exists and changed is replaced in one step: the new content is
//!   written under a temporary name and renamed over the old one, so a reader through the
//!   mount, or a snapshot taken meanwhile, sees the old file or the new one, never a mix.
//! - A file's size and mtime are set last, after its content and other metadata: the quick
//!   check (same kind, size and mtime, as rsync and the file caches of restic and borg do)
//!   then never skips a file that an interrupted run left half-written. Unchanged files are
//!   not read; their mode, owner and xattrs are still brought up to date.
//! - A directory's times are set after everything in it is done.
//! - A problem with one source entry (unreadable, vanished, a name the container reserves)
//!   is counted and reported and the rest goes on; a store error (no space, read-only,
//!   I/O) stops the ingest. Entries of a source directory that could not be read are kept.
//! - A running mount is told to forget every name and inode the ingest changed, so what it
//!   serves is what the namespace holds.
//!
//! Hard links in the source are copied as separate files (as `rsync -a` without `-H`): the
//! chunks are stored once anyway.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::format::Kind;
use crate::ids::InodeNo;
use crate::namespace::{
    Caller, DirEntry, FsError, Invalidation, Namespace, SetAttr, SNAPSHOTS_DIR,
};
use crate::restore::{DirSource, EntryKind, Source, SourceMeta};

/// Bytes read from a source file at a time.
const READ_BUF: usize = 1 << 20;
/// An all-zero block of this size, aligned in the file, is left a hole rather than
/// written; divides `READ_BUF`.
const HOLE_BLOCK: usize = 64 << 10;
/// Suffix of the temporary name a replaced file is written under.
const TMP_SUFFIX: &[u8] = b".dedupfs-ingest.tmp";
/// Longest file name (NAME_MAX).
const NAME_MAX: usize = 255;
/// Errors kept word for word in the report; the rest are only counted.
const ERRORS_KEPT: usize = 50;
/// Interval between two progress reports.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Default number of workers: enough to keep two cores busy while others wait on cold reads.
pub const DEFAULT_JOBS: usize = 4;
/// Most workers accepted.
pub const MAX_JOBS: usize = 64;

/// Counts of what an ingest found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestStats {
    /// Regular files in the source.
    pub files: u64,
    /// Files whose content was written (new or changed).
    pub written: u64,
    /// Bytes of the written files (holes included).
    pub bytes: u64,
    /// Files the quick check found unchanged.
    pub unchanged: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub specials: u64,
    /// Entries removed from the target because the source no longer has them (each entry of
    /// a removed directory counts).
    pub removed: u64,
    /// Source entries that could not be copied.
    pub errors: u64,
    pub elapsed_ms: u64,
}

/// The result of an ingest that ran to its end.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IngestReport {
    pub stats: IngestStats,
    /// The first errors, one line each ("PATH: what went wrong").
    pub errors: Vec<String>,
}

#[derive(Debug, Error)]
pub enum IngestError {
    #[error("{path}: {err}", path = .0.display(), err = .1)]
    Source(PathBuf, io::Error),
    #[error("{0}")]
    Target(String),
    /// A store error: the ingest stopped; what was done so far stays.
    #[error("{path}: {err}")]
    Store { path: String, err: FsError },
    #[error("interrupted")]
    Cancelled,
}

/// Where an ingest writes: a directory of a container.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub dir: InodeNo,
    /// The container's root, whose `.snapshots` name is reserved.
    pub container_root: InodeNo,
}

/// Finds `CONTAINER[/PATH]`, creating the missing directories of PATH (0755, root-owned).
pub fn resolve_target(ns: &Namespace, spec: &str) -> Result<Target, IngestError> {
    let path = Path::new(spec.trim_start_matches('/'));
    let mut components = path.components();
    let container = match components.next() {
        Some(Component::Normal(c)) => c,
        _ => {
            return Err(IngestError::Target(format!(
                "{spec:?}: expected CONTAINER or CONTAINER/PATH"
            )))
        }
    };
    let root = match ns.lookup(InodeNo::ROOT, container.as_bytes()) {
        Ok(a) => a.ino,
        Err(FsError::NotFound) => {
            return Err(IngestError::Target(format!(
                "container {:?} does not exist (create it with `dedupfs container create`)",
                container.to_string_lossy()
            )))
        }
        Err(err) => return Err(store_error(container, err)),
    };
    let mut dir = root;
    for c in components {
        let name = match c {
            Component::Normal(n) => n.as_bytes(),
            Component::CurDir => continue,
            _ => {
                return Err(IngestError::Target(format!(
                    "{spec:?}: PATH must not contain '..'"
                )))
            }
        };
        dir = match ns.lookup(dir, name) {
            Ok(a) if a.kind() == Kind::Dir => a.ino,
            Ok(_) => {
                return Err(IngestError::Target(format!(
                    "{spec:?}: {:?} is not a directory",
                    String::from_utf8_lossy(name)
                )))
            }
            Err(FsError::NotFound) => {
                let a = ns
                    .make_node(dir, name, Kind::Dir, 0o755, 0, b"", Caller::ROOT)
                    .map_err(|e| store_error(spec, e))?;
                ns.invalidate(&[Invalidation::Entry(dir, name.to_vec())]);
                a.ino
            }
            Err(err) => return Err(store_error(spec, err)),
        };
    }
    Ok(Target {
        dir,
        container_root: root,
    })
}

/// Makes `target` an exact copy of the directory `source` (see the module documentation).
/// `progress` is called about once a second with the counts so far; when it returns false
/// the ingest stops (what was done stays) with [`IngestError::Cancelled`].
pub fn ingest(
    ns: &Namespace,
    source: &Path,
    target: Target,
    jobs: usize,
    progress: &mut dyn FnMut(&IngestStats) -> bool,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let root =
        std::fs::canonicalize(source).map_err(|e| IngestError::Source(source.to_path_buf(), e))?;
    let meta = std::fs::metadata(&root).map_err(|e| IngestError::Source(root.clone(), e))?;
    if !meta.is_dir() {
        return Err(IngestError::Source(
            root,
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    let run = Run {
        ns,
        source: DirSource::new(root),
        container_root: target.container_root,
        work: Mutex::new(Work {
            tasks: Vec::new(),
            busy: 0,
            stopped: false,
        }),
        changed: Condvar::new(),
        counts: Counts::default(),
        errors: Mutex::new(Vec::new()),
        failure: Mutex::new(None),
        dir_times: Mutex::new(Vec::new()),
    };
    let root_meta = run
        .source
        .stat(Path::new(""))
        .map_err(|e| IngestError::Source(source.to_path_buf(), e))?;
    run.push(Task::Dir {
        rel: PathBuf::new(),
        ino: target.dir,
    });
    std::thread::scope(|scope| -> Result<(), IngestError> {
        let workers: Vec<_> = (0..jobs.clamp(1, MAX_JOBS))
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("ingest-{i}"))
                    .spawn_scoped(scope, || run.worker())
            })
            .collect::<Result<_, _>>()
            .map_err(|e| IngestError::Source(source.to_path_buf(), e))?;
        // Progress first right away (a caller that is gone stops the ingest early), then
        // about once a second.
        let mut next_progress = Instant::now();
        let mut work = run.work.lock();
        while !work.stopped && (work.busy > 0 || !work.tasks.is_empty()) {
            if Instant::now() >= next_progress {
                drop(work);
                if !progress(&run.counts.snapshot(started)) {
                    run.failure.lock().get_or_insert(IngestError::Cancelled);
                    run.stop();
                }
                next_progress = Instant::now() + PROGRESS_EVERY;
                work = run.work.lock();
                continue;
            }
            run.changed.wait_until(&mut work, next_progress);
        }
        drop(work);
        for w in workers {
            let _ = w.join();
        }
        Ok(())
    })?;
    if let Some(e) = run.failure.lock().take() {
        return Err(e);
    }
    // Directory times last, now that nothing more is added to them; the target's own
    // metadata follows the source root's, as rsync's "SOURCE/" does.
    run.sync_meta(target.dir, &root_meta, true)
        .map_err(|e| store_error(".", e))?;
    run.sync_xattrs(target.dir, Path::new(""), false)?;
    let times = std::mem::take(&mut *run.dir_times.lock());
    for (ino, atime, mtime) in times {
        let set = SetAttr {
            atime: Some(Some(atime)),
            mtime: Some(Some(mtime)),
            ..SetAttr::default()
        };
        match ns.setattr(ino, &set, Caller::ROOT) {
            Ok(_) | Err(FsError::NotFound) => {}
            Err(e) => return Err(store_error(ns.describe(ino), e)),
        }
        ns.invalidate(&[Invalidation::Inode(ino)]);
    }
    let stats = run.counts.snapshot(started);
    let errors = std::mem::take(&mut *run.errors.lock());
    Ok(IngestReport { stats, errors })
}

/// A unit of work: one directory's listing, or one file's content.
enum Task {
    Dir {
        rel: PathBuf,
        ino: InodeNo,
    },
    File {
        rel: PathBuf,
        dir: InodeNo,
        name: Vec<u8>,
        meta: SourceMeta,
        /// The name exists (a changed file): write under a temp name and rename over it.
        replace: bool,
    },
}

struct Work {
    /// Taken last in, first out: the walk goes deep first, so the queue stays short.
    tasks: Vec<Task>,
    /// Tasks being worked on.
    busy: usize,
    /// Set by a store error: workers stop taking tasks.
    stopped: bool,
}

#[derive(Default)]
struct Counts {
    files: AtomicU64,
    written: AtomicU64,
    bytes: AtomicU64,
    unchanged: AtomicU64,
    dirs: AtomicU64,
    symlinks: AtomicU64,
    specials: AtomicU64,
    removed: AtomicU64,
    errors: AtomicU64,
}

impl Counts {
    fn snapshot(&self, started: Instant) -> IngestStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IngestStats {
            files: get(&self.files),
            written: get(&self.written),
            bytes: get(&self.bytes),
            unchanged: get(&self.unchanged),
            dirs: get(&self.dirs),
            symlinks: get(&self.symlinks),
            specials: get(&self.specials),
            removed: get(&self.removed),
            errors: get(&self.errors),
            elapsed_ms: started.elapsed().as_millis() as u64,
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Why one entry could not be copied: the source's fault (counted, the ingest goes on) or
/// the store's (the ingest stops).
enum Failure {
    Source(io::Error),
    Store(FsError),
}

impl From<FsError> for Failure {
    fn from(e: FsError) -> Failure {
        Failure::Store(e)
    }
}

/// Store errors another writer can cause (a name created or removed through the mount while
/// the ingest works on its directory) concern one entry; the others stop the ingest.
fn concerns_one_entry(e: FsError) -> bool {
    matches!(
        e,
        FsError::NotFound
            | FsError::Exists
            | FsError::NotEmpty
            | FsError::NotDir
            | FsError::IsDir
            | FsError::NameTooLong
            | FsError::Invalid
    )
}

fn store_error(path: impl AsRef<OsStr>, err: FsError) -> IngestError {
    IngestError::Store {
        path: path.as_ref().to_string_lossy().into_owned(),
        err,
    }
}

struct Run<'a> {
    ns: &'a Namespace,
    source: DirSource,
    container_root: InodeNo,
    work: Mutex<Work>,
    changed: Condvar,
    counts: Counts,
    errors: Mutex<Vec<String>>,
    failure: Mutex<Option<IngestError>>,
    /// Directories whose times are set at the end: (inode, atime, mtime).
    dir_times: Mutex<Vec<(InodeNo, i64, i64)>>,
}

impl Run<'_> {
    fn push(&self, task: Task) {
        self.work.lock().tasks.push(task);
        // All: the coordinator waits on the same condition.
        self.changed.notify_all();
    }

    fn worker(&self) {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let task = {
                let mut work = self.work.lock();
                loop {
                    if work.stopped {
                        return;
                    }
                    if let Some(t) = work.tasks.pop() {
                        work.busy += 1;
                        break t;
                    }
                    if work.busy == 0 {
                        return;
                    }
                    self.changed.wait(&mut work);
                }
            };
            let (rel, result) = match task {
                Task::Dir { rel, ino } => {
                    let r = self.sync_dir(&rel, ino);
                    (rel, r)
                }
                Task::File {
                    rel,
                    dir,
                    name,
                    meta,
                    replace,
                } => {
                    let r = self.write_file(&rel, dir, &name, &meta, replace, &mut buf);
                    (rel, r)
                }
            };
            if let Err(failure) = result {
                self.fail(&rel, failure);
            }
            let mut work = self.work.lock();
            work.busy -= 1;
            drop(work);
            self.changed.notify_all();
        }
    }

    fn stop(&self) {
        self.work.lock().stopped = true;
        self.changed.notify_all();
    }

    fn fail(&self, rel: &Path, failure: Failure) {
        match failure {
            Failure::Store(e) if !concerns_one_entry(e) => {
                tracing::error!("ingest: {}: {e}", rel.display());
                self.failure
                    .lock()
                    .get_or_insert_with(|| store_error(display_rel(rel), e));
                self.stop();
            }
            Failure::Store(e) => self.entry_error(rel, &e),
            Failure::Source(e) => self.entry_error(rel, &e),
        }
    }

    fn entry_error(&self, rel: &Path, e: &dyn std::fmt::Display) {
        bump(&self.counts.errors, 1);
        tracing::warn!("ingest: {}: {e}", display_rel(rel));
        let mut errors = self.errors.lock();
        if errors.len() < ERRORS_KEPT {
            errors.push(format!("{}: {e}", display_rel(rel)));
        }
    }

    /// Brings the directory `dir` in line with the source directory `rel`: removes what the
    /// source lacks, creates or updates directories, symlinks and special files, and queues
    /// the files whose content must be written.
    fn sync_dir(&self, rel: &Path, dir: InodeNo) -> Result<(), Failure> {
        let ns = self.ns;
        let names = self.source.read_dir(rel).map_err(Failure::Source)?;
        let mut wanted: Vec<(Vec<u8>, SourceMeta)> = Vec::with_capacity(names.len());
        // Names whose source entry could not be looked at: their copies stay as they are.
        let mut keep: Vec<Vec<u8>> = Vec::new();
        for name in names {
            match self.source.stat(&rel.join(&name)) {
                Ok(m) => wanted.push((name.as_bytes().to_vec(), m)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {} // vanished: gone
                Err(e) => {
                    self.entry_error(&rel.join(&name), &e);
                    keep.push(name.as_bytes().to_vec());
                }
            }
        }
        wanted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut existing: std::collections::HashMap<Vec<u8>, DirEntry> = ns
            .readdir(dir)?
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect();
        let mut forget = Vec::new();
        let mut gone: Vec<DirEntry> = existing
            .values()
            .filter(|e| {
                wanted.binary_search_by(|w| w.0.cmp(&e.name)).is_err() && !keep.contains(&e.name)
            })
            .cloned()
            .collect();
        gone.sort_by(|a, b| a.name.cmp(&b.name));
        for e in gone {
            self.remove(dir, &e, &mut forget)?;
            existing.remove(&e.name);
        }
        for (name, meta) in wanted {
            let child = rel.join(OsStr::from_bytes(&name));
            if dir == self.container_root && name == SNAPSHOTS_DIR {
                self.entry_error(
                    &child,
                    &"the name is reserved for the container's snapshots; not copied",
                );
                continue;
            }
            let current = existing.get(&name);
            let result = match meta.kind {
                EntryKind::Dir => self.sync_subdir(&child, dir, &name, &meta, current, &mut forget),
                EntryKind::File => {
                    self.queue_file(child.clone(), dir, name, meta, current, &mut forget)
                }
                EntryKind::Symlink => {
                    self.sync_symlink(&child, dir, &name, &meta, current, &mut forget)
                }
                _ => self.sync_special(dir, &name, &meta, current, &mut forget),
            };
            match result {
                Ok(()) => {}
                Err(Failure::Store(e)) if !concerns_one_entry(e) => {
                    ns.invalidate(&forget);
                    return Err(Failure::Store(e));
                }
                Err(f) => self.fail(&child, f),
            }
        }
        if !forget.is_empty() {
            forget.push(Invalidation::Inode(dir));
            ns.invalidate(&forget);
        }
        Ok(())
    }

    /// Removes `e` from `dir`, a directory with everything in it.
    fn remove(
        &self,
        dir: InodeNo,
        e: &DirEntry,
        forget: &mut Vec<Invalidation>,
    ) -> Result<(), FsError> {
        if e.kind == Kind::Dir {
            let mut inner = Vec::new();
            for child in self.ns.readdir(e.ino)? {
                self.remove(e.ino, &child, &mut inner)?;
            }
            self.ns.rmdir(dir, &e.name, Caller::ROOT)?;
        } else {
            self.ns.unlink(dir, &e.name, Caller::ROOT)?;
            // Other links to it now count one less.
            forget.push(Invalidation::Inode(e.ino));
        }
        forget.push(Invalidation::Entry(dir, e.name.clone()));
        bump(&self.counts.removed, 1);
        Ok(())
    }

    fn sync_subdir(
        &self,
        rel: &Path,
        dir: InodeNo,
        name: &[u8],
        meta: &SourceMeta,
        current: Option<&DirEntry>,
        forget: &mut Vec<Invalidation>,
    ) -> Result<(), Failure> {
        bump(&self.counts.dirs, 1);
        let ino = match current {
            Some(e) if e.kind == Kind::Dir => {
                if self.sync_meta(e.ino, meta, false)? {
                    forget.push(Invalidation::Inode(e.ino));
                }
                e.ino
            }
            other => {
                if let Some(e) = other {
                    self.remove(dir, e, forget)?;
                }
                let a = self.ns.make_node(
                    dir,
                    name,
                    Kind::Dir,
                    meta.perm as u16,
                    0,
                    b"",
                    Caller::ROOT,
                )?;
                forget.push(Invalidation::Entry(dir, name.to_vec()));
                self.sync_meta(a.ino, meta, false)?;
                a.ino
            }
        };
        self.sync_xattrs(ino, rel, current.is_none_or(|e| e.kind != Kind::Dir))
            .map_err(into_failure)?;
        self.dir_times
            .lock()
            .push((ino, meta.atime_ns, meta.mtime_ns));
        self.push(Task::Dir {
            rel: rel.to_path_buf(),
            ino,
        });
        Ok(())
    }

    /// Leaves an unchanged file (same size and mtime) in place with its metadata brought up
    /// to date; queues any other for writing.
    fn queue_file(
        &self,
        rel: PathBuf,
        dir: InodeNo,
        name: Vec<u8>,
        meta: SourceMeta,
        current: Option<&DirEntry>,
        forget: &mut Vec<Invalidation>,
    ) -> Result<(), Failure> {
        bump(&self.counts.files, 1);
        let replace = match current {
            Some(e) if e.kind == Kind::File => {
                let a = self.ns.getattr(e.ino)?;
                if a.rec.size == meta.size && a.rec.mtime == meta.mtime_ns {
                    if self.sync_meta(e.ino, &meta, false)? {
                        forget.push(Invalidation::Inode(e.ino));
                    }
                    self.sync_xattrs(e.ino, &rel, false).map_err(into_failure)?;
                    bump(&self.counts.unchanged, 1);
                    return Ok(());
                }
                true
            }
            Some(e) => {
                self.remove(dir, e, forget)?;
                false
            }
            None => false,
        };
        self.push(Task::File {
            rel,
            dir,
            name,
            meta,
            replace,
        });
        Ok(())
    }

    /// Writes a file's content and metadata: under its name when it is new, under a temp
    /// name renamed over the old file when it replaces one.
    fn write_file(
        &self,
        rel: &Path,
        dir: InodeNo,
        name: &[u8],
        meta: &SourceMeta,
        replace: bool,
        buf: &mut [u8],
    ) -> Result<(), Failure> {
        let ns = self.ns;
        let mut reader = match self.source.open(rel) {
            Ok(r) => r,
            // Vanished since the listing: the old copy, if any, goes too.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if replace {
                    if let Ok(a) = ns.lookup(dir, name) {
                        let e = DirEntry {
                            name: name.to_vec(),
                            ino: a.ino,
                            kind: a.kind(),
                        };
                        let mut forget = Vec::new();
                        self.remove(dir, &e, &mut forget)?;
                        ns.invalidate(&forget);
                    }
                }
                return Ok(());
            }
            Err(e) => return Err(Failure::Source(e)),
        };
        let build = if replace {
            tmp_name(name)
        } else {
            name.to_vec()
        };
        if replace {
            match ns.unlink(dir, &build, Caller::ROOT) {
                Ok(()) | Err(FsError::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let ino = ns
            .make_node(dir, &build, Kind::File, 0o600, 0, b"", Caller::ROOT)?
            .ino;
        let written = (|| {
            ns.open(ino)?;
            let copied = copy_data(ns, ino, &mut reader, buf);
            let released = ns.release(ino);
            let (size, written_end) = copied?;
            released?;
            self.sync_xattrs(ino, rel, true).map_err(into_failure)?;
            // The size is set only for a hole at the end: a setattr with a size truncates.
            self.set_file_meta(ino, meta, (size > written_end).then_some(size))?;
            if replace {
                ns.rename(dir, &build, dir, name, false, false, Caller::ROOT)?;
            }
            Ok::<u64, Failure>(size)
        })();
        match written {
            Ok(size) => {
                bump(&self.counts.written, 1);
                bump(&self.counts.bytes, size);
                ns.invalidate(&[Invalidation::Entry(dir, name.to_vec())]);
                Ok(())
            }
            Err(f) => {
                let _ = ns.unlink(dir, &build, Caller::ROOT);
                Err(f)
            }
        }
    }

    /// Sets a written file's owner, mode, times and, when given, size in one batch (mtime
    /// last of all its changes: see the module documentation).
    fn set_file_meta(
        &self,
        ino: InodeNo,
        meta: &SourceMeta,
        size: Option<u64>,
    ) -> Result<(), FsError> {
        let set = SetAttr {
            mode: Some(meta.perm),
            uid: Some(meta.uid),
            gid: Some(meta.gid),
            size,
            atime: Some(Some(meta.atime_ns)),
            mtime: Some(Some(meta.mtime_ns)),
        };
        let a = self.ns.setattr(ino, &set, Caller::ROOT)?;
        if u32::from(a.rec.perm) != meta.perm {
            // The owner change cleared setuid/setgid: set the mode again.
            let mode = SetAttr {
                mode: Some(meta.perm),
                ..SetAttr::default()
            };
            self.ns.setattr(ino, &mode, Caller::ROOT)?;
        }
        Ok(())
    }

    fn sync_symlink(
        &self,
        rel: &Path,
        dir: InodeNo,
        name: &[u8],
        meta: &SourceMeta,
        current: Option<&DirEntry>,
        forget: &mut Vec<Invalidation>,
    ) -> Result<(), Failure> {
        bump(&self.counts.symlinks, 1);
        let target = self.source.read_link(rel).map_err(Failure::Source)?;
        let target = target.as_os_str().as_bytes();
        if let Some(e) = current {
            if e.kind == Kind::Symlink && self.ns.readlink(e.ino)? == target {
                if self.sync_meta(e.ino, meta, true)? {
                    forget.push(Invalidation::Inode(e.ino));
                }
                return Ok(());
            }
            self.remove(dir, e, forget)?;
        }
        let a = self
            .ns
            .make_node(dir, name, Kind::Symlink, 0o777, 0, target, Caller::ROOT)?;
        forget.push(Invalidation::Entry(dir, name.to_vec()));
        self.sync_meta(a.ino, meta, true)?;
        Ok(())
    }

    fn sync_special(
        &self,
        dir: InodeNo,
        name: &[u8],
        meta: &SourceMeta,
        current: Option<&DirEntry>,
        forget: &mut Vec<Invalidation>,
    ) -> Result<(), Failure> {
        bump(&self.counts.specials, 1);
        let kind = match meta.kind {
            EntryKind::Fifo => Kind::Fifo,
            EntryKind::Socket => Kind::Socket,
            EntryKind::CharDev => Kind::CharDev,
            _ => Kind::BlockDev,
        };
        let rdev = u32::try_from(meta.rdev).unwrap_or(0);
        if let Some(e) = current {
            if e.kind == kind && self.ns.getattr(e.ino)?.rec.rdev == rdev {
                if self.sync_meta(e.ino, meta, true)? {
                    forget.push(Invalidation::Inode(e.ino));
                }
                return Ok(());
            }
            self.remove(dir, e, forget)?;
        }
        let a = self
            .ns
            .make_node(dir, name, kind, meta.perm as u16, rdev, b"", Caller::ROOT)?;
        forget.push(Invalidation::Entry(dir, name.to_vec()));
        self.sync_meta(a.ino, meta, true)?;
        Ok(())
    }

    /// Sets owner and mode (and with `times`, atime and mtime) of `ino` where they differ
    /// from the source's. True when something changed.
    fn sync_meta(&self, ino: InodeNo, meta: &SourceMeta, times: bool) -> Result<bool, FsError> {
        let rec = self.ns.getattr(ino)?.rec;
        let mut set = SetAttr::default();
        if rec.uid != meta.uid {
            set.uid = Some(meta.uid);
        }
        if rec.gid != meta.gid {
            set.gid = Some(meta.gid);
        }
        if rec.kind != Kind::Symlink && u32::from(rec.perm) != meta.perm {
            set.mode = Some(meta.perm);
        }
        if times && (rec.mtime != meta.mtime_ns || rec.atime != meta.atime_ns) {
            set.atime = Some(Some(meta.atime_ns));
            set.mtime = Some(Some(meta.mtime_ns));
        }
        if set == SetAttr::default() {
            return Ok(false);
        }
        if set.uid.is_some() || set.gid.is_some() {
            // An owner change may clear setuid/setgid: the mode goes after it.
            set.mode = (rec.kind != Kind::Symlink).then_some(meta.perm);
        }
        let a = self.ns.setattr(ino, &set, Caller::ROOT)?;
        if rec.kind != Kind::Symlink && u32::from(a.rec.perm) != meta.perm {
            let mode = SetAttr {
                mode: Some(meta.perm),
                ..SetAttr::default()
            };
            self.ns.setattr(ino, &mode, Caller::ROOT)?;
        }
        Ok(true)
    }

    /// Makes the xattrs of `ino` those of the source entry `rel`; `fresh` when `ino` was
    /// just created (it has none).
    fn sync_xattrs(&self, ino: InodeNo, rel: &Path, fresh: bool) -> Result<(), IngestError> {
        let ns = self.ns;
        let wanted = self
            .source
            .xattrs(rel)
            .map_err(|e| IngestError::Source(rel.to_path_buf(), e))?;
        if fresh && wanted.is_empty() {
            return Ok(());
        }
        let err = |e| store_error(display_rel(rel), e);
        let listed = if fresh {
            Vec::new()
        } else {
            ns.listxattr(ino).map_err(err)?
        };
        let mut changed = false;
        for name in listed.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if !wanted.iter().any(|(n, _)| n.as_bytes() == name) {
                match ns.removexattr(ino, name, Caller::ROOT) {
                    Ok(()) | Err(FsError::NoAttr) => changed = true,
                    Err(e) => return Err(err(e)),
                }
            }
        }
        for (name, value) in &wanted {
            let name = name.as_bytes();
            if listed.split(|&b| b == 0).any(|n| n == name)
                && ns.getxattr(ino, name).ok().as_deref() == Some(value.as_slice())
            {
                continue;
            }
            ns.setxattr(ino, name, value, false, false, Caller::ROOT)
                .map_err(err)?;
            changed = true;
        }
        if changed {
            ns.invalidate(&[Invalidation::Inode(ino)]);
        }
        Ok(())
    }
}

fn into_failure(e: IngestError) -> Failure {
    match e {
        IngestError::Source(_, e) => Failure::Source(e),
        IngestError::Store { err, .. } => Failure::Store(err),
        IngestError::Target(_) | IngestError::Cancelled => Failure::Store(FsError::Invalid),
    }
}

/// Copies `reader` into the open file `ino` from offset 0, leaving aligned all-zero blocks
/// as holes; returns the bytes read (the file's size) and the end of the last write.
fn copy_data(
    ns: &Namespace,
    ino: InodeNo,
    reader: &mut dyn Read,
    buf: &mut [u8],
) -> Result<(u64, u64), Failure> {
    let mut offset = 0u64;
    let mut written_end = 0u64;
    loop {
        let n = fill(reader, buf).map_err(Failure::Source)?;
        if n == 0 {
            return Ok((offset, written_end));
        }
        let mut at = 0;
        while at < n {
            // A run of blocks that are not all zero, written in one call.
            let start = at;
            while at < n {
                let end = (at + HOLE_BLOCK).min(n);
                if end - at == HOLE_BLOCK && buf[at..end].iter().all(|&b| b == 0) {
                    break;
                }
                at = end;
            }
            if at > start {
                ns.write(ino, offset + start as u64, &buf[start..at])?;
                written_end = offset + at as u64;
            }
            while at < n && n - at >= HOLE_BLOCK && buf[at..at + HOLE_BLOCK].iter().all(|&b| b == 0)
            {
                at += HOLE_BLOCK;
            }
        }
        offset += n as u64;
    }
}

/// Reads until `buf` is full or the end of the file.
fn fill(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `.NAME.dedupfs-ingest.tmp`, NAME cut so that the whole fits NAME_MAX.
fn tmp_name(name: &[u8]) -> Vec<u8> {
    let keep = name.len().min(NAME_MAX - 1 - TMP_SUFFIX.len());
    let mut t = Vec::with_capacity(NAME_MAX);
    t.push(b'.');
    t.extend_from_slice(&name[..keep]);
    t.extend_from_slice(TMP_SUFFIX);
    t
}

fn display_rel(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_names_fit_name_max() {
        assert_eq!(tmp_name(b"a"), b".a.dedupfs-ingest.tmp".to_vec());
        let long = vec![b'x'; NAME_MAX];
        assert_eq!(tmp_name(&long).len(), NAME_MAX);
    }
}
