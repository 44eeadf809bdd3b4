//! Ingest: makes a directory of a container an exact copy of a source tree, what
//! `rsync -a --delete SOURCE/ MOUNT/CONTAINER/` does, but on the namespace directly and with
//! several workers. Through the mount every file costs the writer a handful of FUSE round
//! trips, one after the other (lookup, create, write, setattr, flush, ...); here a file costs
//! the namespace calls alone, and files are chunked on every core at once.
//!
//! What must hold:
//! - The source is only read, and nothing outside the target directory changes.
//! - The walk never leaves the source tree, even while users rename directories or replace
//!   them with symlinks under it (the source may hold user-writable directories, and the
//!   daemon reads as root): every directory is held open and its entries are reached through
//!   `/proc/self/fd/N/NAME`, directories are opened with O_NOFOLLOW, and a file's owner, mode
//!   and times come from fstat of what was opened, so a copy is never more readable than
//!   the file it came from.
//! - A file that already exists and changed is replaced in one step, so a reader through the
//!   mount, or a snapshot taken meanwhile, sees the old file or the new one, never a mix: a
//!   small one in the batch that makes the new one, a big one by writing the new content
//!   under a temporary name unique to the run and renaming it over the old one.
//! - A file's size and mtime are set last, after its content and other metadata, or with
//!   its content in one batch ([`Namespace::make_files`], for files that fit the read
//!   buffer):
//!   the quick check (same kind, size and mtime, as rsync and the file caches of restic and
//!   borg do) then never skips a file that an interrupted run left half-written. (xattrs,
//!   set after, are compared at every run.) Unchanged files are
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

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::format::{InodeRecord, Kind};
use crate::ids::InodeNo;
use crate::kv::Cursor;
use crate::namespace::{
    Attr, Caller, DirEntry, FsError, FsResult, Invalidation, Namespace, SetAttr, WholeFile,
    SNAPSHOTS_DIR,
};
use crate::restore::{fill, source_meta, DirSource, EntryKind, Source, SourceMeta};

/// Bytes read from a source file at a time; a file no bigger is read whole and made in one
/// batch with its metadata.
const READ_BUF: usize = 1 << 20;
/// New files of one directory made in one batch (see [`Namespace::make_files`]): at most
/// this many, of at most `GROUP_BYTES` together by their listed sizes.
const GROUP_FILES: usize = 32;
const GROUP_BYTES: u64 = 2 << 20;
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
/// Default number of workers: enough to keep two cores busy while others wait on cold reads
/// or the commit lock (8 against 4: a first ingest of bench-peers' tree 4-10 % faster, the
/// same peak RSS).
pub const DEFAULT_JOBS: usize = 8;
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
    #[error("internal error: {0}")]
    Internal(String),
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
/// Directories in `skip` (the store's own directory and its mountpoint, met inside SOURCE)
/// are left out as if SOURCE did not have them. `progress` is called about once a second
/// with the counts so far; when it returns false the ingest stops (what was done stays)
/// with [`IngestError::Cancelled`].
pub fn ingest(
    ns: &Namespace,
    source: &Path,
    target: Target,
    jobs: usize,
    skip: &[PathBuf],
    progress: &mut dyn FnMut(&IngestStats) -> bool,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let root =
        std::fs::canonicalize(source).map_err(|e| IngestError::Source(source.to_path_buf(), e))?;
    let root_dir =
        SourceDir::open(&root, true).map_err(|e| IngestError::Source(root.clone(), e))?;
    let skip = skip
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let run = Run {
        ns,
        root: DirSource::new(root),
        skip,
        tmp_tag: format!(
            "{:x}",
            (u64::from(std::process::id()) << 24) ^ crate::store::now_ns() as u64
        ),
        tmp_seq: AtomicU64::new(0),
        container_root: target.container_root,
        work: Mutex::new(Work {
            tasks: Vec::new(),
            busy: 0,
            stopped: false,
        }),
        task_ready: Condvar::new(),
        finished: Condvar::new(),
        counts: Counts::default(),
        errors: Mutex::new(Vec::new()),
        failure: Mutex::new(None),
        dir_times: Mutex::new(Vec::new()),
    };
    let root_meta = run
        .root
        .stat(Path::new(""))
        .map_err(|e| IngestError::Source(source.to_path_buf(), e))?;
    run.push(Task::Dir {
        rel: PathBuf::new(),
        ino: target.dir,
        parent: Arc::new(root_dir),
        name: None,
    });
    std::thread::scope(|scope| -> Result<(), IngestError> {
        let mut workers = Vec::new();
        for i in 0..jobs.clamp(1, MAX_JOBS) {
            let spawned = std::thread::Builder::new()
                .name(format!("ingest-{i}"))
                .spawn_scoped(scope, || run.worker());
            match spawned {
                Ok(w) => workers.push(w),
                Err(e) => {
                    // The scope waits for the workers already running: stop them first.
                    run.stop();
                    return Err(IngestError::Internal(format!("starting a worker: {e}")));
                }
            }
        }
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
            run.finished.wait_until(&mut work, next_progress);
        }
        drop(work);
        for w in workers {
            if w.join().is_err() {
                run.failure
                    .lock()
                    .get_or_insert(IngestError::Internal("a worker panicked".into()));
            }
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
    let root_rel = Path::new("");
    match run.sync_xattrs(target.dir, XattrSource::Root(&run.root), false, None) {
        Ok(()) => {}
        Err(Failure::Source(e)) => run.entry_error(root_rel, &e),
        Err(Failure::Store(e)) => return Err(store_error(".", e)),
    }
    // Their records read with one cursor, in inode order (one iterator per lookup was a
    // tenth of a generation's time, on one thread).
    let mut times = std::mem::take(&mut *run.dir_times.lock());
    times.sort_unstable_by_key(|(ino, _, _)| *ino);
    let inos: Vec<InodeNo> = times.iter().map(|(ino, _, _)| *ino).collect();
    for ((ino, atime, mtime), rec) in times.into_iter().zip(ns.inodes_live(&inos)) {
        match rec {
            Ok(r) if r.atime == atime && r.mtime == mtime => continue,
            Ok(_) => {}
            Err(FsError::NotFound) => continue,
            Err(e) => return Err(store_error(ns.describe(ino), e)),
        }
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

/// A source directory held open. Its entries are reached relative to it (`*at` calls, or
/// `/proc/self/fd/N/NAME` for the xattr calls, which have no `*at` form): either way only
/// NAME is resolved, never a path a user could have redirected since the listing, and no
/// call used follows a symlink at NAME.
struct SourceDir {
    fd: OwnedFd,
    /// The directory as `/proc/self/fd/N` (listing, xattrs).
    view: DirSource,
}

impl SourceDir {
    fn open(path: &Path, follow: bool) -> io::Result<SourceDir> {
        let mut flags = libc::O_DIRECTORY | libc::O_CLOEXEC;
        if !follow {
            flags |= libc::O_NOFOLLOW;
        }
        let fd: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)?
            .into();
        Ok(SourceDir::from_fd(fd))
    }

    fn from_fd(fd: OwnedFd) -> SourceDir {
        let view = DirSource::new(PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())));
        SourceDir { fd, view }
    }

    fn open_at(&self, name: &OsStr, flags: libc::c_int) -> io::Result<OwnedFd> {
        let c = cname(name)?;
        // SAFETY: a directory descriptor we own and a NUL-terminated name.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat just returned this descriptor, owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn subdir(&self, name: &OsStr) -> io::Result<SourceDir> {
        let fd = self.open_at(name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW)?;
        Ok(SourceDir::from_fd(fd))
    }

    /// lstat of an entry.
    fn stat(&self, name: &OsStr) -> io::Result<SourceMeta> {
        let st = self.lstat(name)?;
        Ok(SourceMeta {
            kind: crate::restore::kind_of(st.st_mode),
            perm: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            atime_ns: st.st_atime * 1_000_000_000 + st.st_atime_nsec,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ino: st.st_ino,
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            rdev: st.st_rdev,
        })
    }

    fn lstat(&self, name: &OsStr) -> io::Result<libc::stat> {
        let c = cname(name)?;
        // SAFETY: an all-zero stat is a valid value for fstatat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a directory descriptor we own, a NUL-terminated name, a stat to fill.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }

    /// True when the entry surely has no xattrs: listxattrat(2) (Linux 6.13) says so
    /// without the path walk through /proc that [`DirSource::xattrs`] costs. False when
    /// it has some, or when the kernel lacks the call.
    fn has_no_xattrs(&self, name: &OsStr) -> bool {
        /// listxattrat's number on x86_64 and aarch64 (the generic table).
        const SYS_LISTXATTRAT: libc::c_long = 465;
        static MISSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if MISSING.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(c) = cname(name) else {
            return false;
        };
        // SAFETY: a directory descriptor we own, a NUL-terminated name; a null list of
        // size 0 asks only for the size of the list.
        let n = unsafe {
            libc::syscall(
                SYS_LISTXATTRAT,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
                std::ptr::null_mut::<libc::c_char>(),
                0usize,
            )
        };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            MISSING.store(true, Ordering::Relaxed);
        }
        n == 0
    }

    fn read_link(&self, name: &OsStr) -> io::Result<Vec<u8>> {
        let c = cname(name)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: a directory descriptor we own, a NUL-terminated name, a buffer of its length.
        let n = unsafe {
            libc::readlinkat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Opens a regular file for reading, not following a symlink, not blocking on a FIFO
    /// put in its place.
    fn open_file(&self, name: &OsStr) -> io::Result<File> {
        let fd = self.open_at(
            name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
        )?;
        Ok(File::from(fd))
    }
}

fn cname(name: &OsStr) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Where xattrs are read from: the source root by its path, or an entry of a held-open
/// source directory.
enum XattrSource<'a> {
    Root(&'a DirSource),
    Entry(&'a SourceDir, &'a OsStr),
}

impl XattrSource<'_> {
    fn read(&self) -> io::Result<Vec<(OsString, Vec<u8>)>> {
        match self {
            XattrSource::Root(root) => root.xattrs(Path::new("")),
            XattrSource::Entry(dir, name) if dir.has_no_xattrs(name) => Ok(Vec::new()),
            XattrSource::Entry(dir, name) => dir.view.xattrs(Path::new(name)),
        }
    }
}

/// A regular file of a source listing, with the record of the copy it may replace.
struct ListedFile {
    rel: PathBuf,
    dir: InodeNo,
    name: Vec<u8>,
    meta: SourceMeta,
    record: Option<FsResult<InodeRecord>>,
}

/// A unit of work: one directory's listing, or one file's content.
enum Task {
    Dir {
        rel: PathBuf,
        ino: InodeNo,
        /// The source directory is `name` in `parent`, or `parent` itself.
        parent: Arc<SourceDir>,
        name: Option<OsString>,
    },
    File {
        rel: PathBuf,
        dir: InodeNo,
        src: Arc<SourceDir>,
        name: Vec<u8>,
        /// The name exists (a changed file): write under a temp name and rename over it.
        replace: bool,
    },
    /// Small files of the directory `dir`, made in one batch.
    SmallFiles {
        /// The directory's path.
        rel: PathBuf,
        dir: InodeNo,
        src: Arc<SourceDir>,
        group: SmallFiles,
    },
}

/// Small files of one directory gathered into one task.
#[derive(Default)]
struct SmallFiles {
    files: Vec<GroupFile>,
    bytes: u64,
}

struct GroupFile {
    rel: PathBuf,
    name: Vec<u8>,
    /// The name exists: the new file replaces it in the batch.
    replace: bool,
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
            | FsError::TooManyLinks
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
    /// The source root by its path (for its own stat and xattrs).
    root: DirSource,
    /// (device, inode) of directories left out.
    skip: Vec<(u64, u64)>,
    /// Temp names: unique to this run (`tmp_tag`) and to each file (`tmp_seq`).
    tmp_tag: String,
    tmp_seq: AtomicU64,
    container_root: InodeNo,
    work: Mutex<Work>,
    /// Workers wait on it for a task (one woken per task), or for the end (all woken).
    task_ready: Condvar,
    /// The coordinator waits on it for the end, between progress reports.
    finished: Condvar,
    counts: Counts,
    errors: Mutex<Vec<String>>,
    failure: Mutex<Option<IngestError>>,
    /// Directories whose times are set at the end: (inode, atime, mtime).
    dir_times: Mutex<Vec<(InodeNo, i64, i64)>>,
}

impl Run<'_> {
    fn push(&self, task: Task) {
        self.work.lock().tasks.push(task);
        self.task_ready.notify_one();
    }

    fn worker(&self) {
        let mut buf = vec![0u8; READ_BUF];
        // Room for a group by its listed sizes, and one file grown past them.
        let mut group_buf = Vec::new();
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
                    self.task_ready.wait(&mut work);
                }
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match task {
                Task::Dir {
                    rel,
                    ino,
                    parent,
                    name,
                } => {
                    let r = self.sync_dir(&rel, ino, &parent, name.as_deref());
                    (rel, r)
                }
                Task::File {
                    rel,
                    dir,
                    src,
                    name,
                    replace,
                } => {
                    let r = self.write_file(dir, &src, &name, replace, &mut buf);
                    (rel, r)
                }
                Task::SmallFiles {
                    rel,
                    dir,
                    src,
                    group,
                } => {
                    group_buf.resize(GROUP_BYTES as usize + READ_BUF, 0);
                    let r = self.write_small_files(dir, &src, group, &mut group_buf, &mut buf);
                    (rel, r)
                }
            }));
            match outcome {
                Ok((_, Ok(()))) => {}
                Ok((rel, Err(failure))) => self.fail(&rel, failure),
                Err(_) => {
                    // Counted down below all the same, so the others do not wait forever.
                    self.failure
                        .lock()
                        .get_or_insert(IngestError::Internal("a worker panicked".into()));
                    self.stop();
                }
            }
            let mut work = self.work.lock();
            work.busy -= 1;
            let finished = work.busy == 0 && work.tasks.is_empty();
            drop(work);
            // Waking the others after every task cost 40k context switches a second.
            if finished {
                self.task_ready.notify_all();
                self.finished.notify_all();
            }
        }
    }

    fn stop(&self) {
        self.work.lock().stopped = true;
        self.task_ready.notify_all();
        self.finished.notify_all();
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
    fn sync_dir(
        &self,
        rel: &Path,
        dir: InodeNo,
        parent: &Arc<SourceDir>,
        name: Option<&OsStr>,
    ) -> Result<(), Failure> {
        let ns = self.ns;
        let src = match name {
            None => parent.clone(),
            Some(n) => Arc::new(parent.subdir(n).map_err(Failure::Source)?),
        };
        let names = src.view.read_dir(Path::new("")).map_err(Failure::Source)?;
        let mut wanted: Vec<(Vec<u8>, SourceMeta)> = Vec::with_capacity(names.len());
        // Names whose source entry could not be looked at: their copies stay as they are.
        let mut keep: Vec<Vec<u8>> = Vec::new();
        for name in names {
            match src.stat(&name) {
                Ok(m) if m.kind == EntryKind::Dir && self.skipped(&src, &name, &m) => {
                    tracing::info!(
                        "ingest: {}: left out (this store)",
                        rel.join(&name).display()
                    );
                }
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
            existing.remove(&e.name);
            match self.remove(dir, &e, &mut forget) {
                Ok(()) => {}
                Err(err) if concerns_one_entry(err) => {
                    self.fail(&rel.join(OsStr::from_bytes(&e.name)), Failure::Store(err))
                }
                Err(err) => {
                    ns.invalidate(&forget);
                    return Err(Failure::Store(err));
                }
            }
        }
        // Files the quick check may find unchanged: their records read with one cursor, and
        // one cursor for their xattr records (creating an iterator per lookup is most of
        // its cost).
        let file_inos: Vec<InodeNo> = wanted
            .iter()
            .filter(|(_, m)| m.kind == EntryKind::File)
            .filter_map(|(n, _)| existing.get(n).filter(|e| e.kind == Kind::File))
            .map(|e| e.ino)
            .collect();
        let mut records: std::collections::HashMap<InodeNo, FsResult<InodeRecord>> = file_inos
            .iter()
            .copied()
            .zip(ns.inodes_live(&file_inos))
            .collect();
        let mut xattr_cursor = ns.xattr_cursor();
        let mut group = SmallFiles::default();
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
                EntryKind::Dir => {
                    self.sync_subdir(&child, dir, &src, &name, &meta, current, &mut forget)
                }
                EntryKind::File => {
                    let record = current.and_then(|e| records.remove(&e.ino));
                    let file = ListedFile {
                        rel: child.clone(),
                        dir,
                        name,
                        meta,
                        record,
                    };
                    let cursor = &mut xattr_cursor;
                    self.queue_file(file, &src, current, &mut forget, cursor, &mut group)
                }
                EntryKind::Symlink => {
                    self.sync_symlink(dir, &src, &name, &meta, current, &mut forget)
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
        if !group.files.is_empty() {
            self.push(Task::SmallFiles {
                rel: rel.to_path_buf(),
                dir,
                src,
                group,
            });
        }
        if !forget.is_empty() {
            forget.push(Invalidation::Inode(dir));
            ns.invalidate(&forget);
        }
        Ok(())
    }

    /// True for a directory of [`Run::skip`].
    fn skipped(&self, src: &SourceDir, name: &OsStr, meta: &SourceMeta) -> bool {
        self.skip
            .iter()
            .any(|&(dev, ino)| ino == meta.ino && src.lstat(name).is_ok_and(|st| st.st_dev == dev))
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

    #[allow(clippy::too_many_arguments)]
    fn sync_subdir(
        &self,
        rel: &Path,
        dir: InodeNo,
        src: &Arc<SourceDir>,
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
        let fresh = current.is_none_or(|e| e.kind != Kind::Dir);
        let from = XattrSource::Entry(src, OsStr::from_bytes(name));
        self.sync_xattrs(ino, from, fresh, None)?;
        self.dir_times
            .lock()
            .push((ino, meta.atime_ns, meta.mtime_ns));
        self.push(Task::Dir {
            rel: rel.to_path_buf(),
            ino,
            parent: src.clone(),
            name: Some(OsStr::from_bytes(name).to_os_string()),
        });
        Ok(())
    }

    /// Leaves an unchanged file (same size and mtime) in place with its metadata brought up
    /// to date; queues any other for writing.
    /// Brings a listed file up to date: its metadata if the quick check finds it unchanged,
    /// else a task for its content (small new files join `group`, queued when full).
    fn queue_file(
        &self,
        file: ListedFile,
        src: &Arc<SourceDir>,
        current: Option<&DirEntry>,
        forget: &mut Vec<Invalidation>,
        xattr_cursor: &mut Cursor<'_>,
        group: &mut SmallFiles,
    ) -> Result<(), Failure> {
        let ListedFile {
            rel,
            dir,
            name,
            meta,
            record,
        } = file;
        bump(&self.counts.files, 1);
        // (the name exists, as a file with other links)
        let (replace, linked) = match current {
            Some(e) if e.kind == Kind::File => {
                let r = match record {
                    Some(r) => r?,
                    None => self.ns.getattr(e.ino)?.rec,
                };
                // A file with other links (outside the target, maybe) is replaced rather
                // than changed in place when its owner or mode differ.
                let shared_and_differs = r.nlink > 1
                    && (r.uid != meta.uid || r.gid != meta.gid || u32::from(r.perm) != meta.perm);
                if r.size == meta.size && r.mtime == meta.mtime_ns && !shared_and_differs {
                    if self.sync_meta_of(e.ino, &r, &meta, false)? {
                        forget.push(Invalidation::Inode(e.ino));
                    }
                    let from = XattrSource::Entry(src, OsStr::from_bytes(&name));
                    self.sync_xattrs(e.ino, from, false, Some(xattr_cursor))?;
                    bump(&self.counts.unchanged, 1);
                    return Ok(());
                }
                (true, r.nlink > 1)
            }
            Some(e) => {
                self.remove(dir, e, forget)?;
                (false, false)
            }
            None => (false, false),
        };
        // Small files are made in groups, replacing the old copy in the same batch; but two
        // names of one inode cannot both be replaced in one batch, so a linked one is not.
        if meta.size <= READ_BUF as u64 && !linked {
            let rel_dir = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            group.bytes += meta.size;
            group.files.push(GroupFile { rel, name, replace });
            if group.files.len() >= GROUP_FILES || group.bytes >= GROUP_BYTES {
                self.push(Task::SmallFiles {
                    rel: rel_dir,
                    dir,
                    src: src.clone(),
                    group: std::mem::take(group),
                });
            }
            return Ok(());
        }
        self.push(Task::File {
            rel,
            dir,
            src: src.clone(),
            name,
            replace,
        });
        Ok(())
    }

    /// Writes a file's content and metadata: under its name when it is new, under a temp
    /// name renamed over the old file when it replaces one.
    fn write_file(
        &self,
        dir: InodeNo,
        src: &SourceDir,
        name: &[u8],
        replace: bool,
        buf: &mut [u8],
    ) -> Result<(), Failure> {
        let ns = self.ns;
        let mut reader = match src.open_file(OsStr::from_bytes(name)) {
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
        // What was opened is what gets copied, with its own owner, mode and times (the
        // entry may have been replaced since the listing).
        let meta = source_meta(&reader.metadata().map_err(Failure::Source)?);
        if meta.kind != EntryKind::File {
            return Err(Failure::Source(io::Error::other(
                "no longer a regular file; copied by the next run",
            )));
        }
        // A file that fits the buffer is made in one batch with its owner, mode and times;
        // a bigger one is streamed through an open file and given them after.
        let whole = if meta.size <= buf.len() as u64 {
            read_whole(&mut reader, buf).map_err(Failure::Source)?
        } else {
            None
        };
        let make = |entry: &[u8]| match whole {
            Some(n) => {
                let data: Vec<(u64, &[u8])> = data_runs(&buf[..n])
                    .map(|(start, end)| (start as u64, &buf[start..end]))
                    .collect();
                // Made under a temp name when it replaces a file.
                let file = whole_file(&meta, n, &data, false);
                ns.make_file(dir, entry, &file, Caller::ROOT)
            }
            None => ns.make_node(dir, entry, Kind::File, 0o600, 0, b"", Caller::ROOT),
        };
        let (build, ino) = if replace {
            self.create_temp(name, make)?
        } else {
            (name.to_vec(), make(name)?.ino)
        };
        let meta = &meta;
        let written = (|| {
            let size = match whole {
                Some(n) => n as u64,
                None => {
                    ns.open(ino)?;
                    let copied = copy_data(ns, ino, &mut reader, buf);
                    let released = ns.release(ino);
                    let (size, written_end) = copied?;
                    released?;
                    // The size is set only for a hole at the end: a setattr with a size
                    // truncates.
                    self.set_file_meta(ino, meta, (size > written_end).then_some(size))?;
                    size
                }
            };
            let from = XattrSource::Entry(src, OsStr::from_bytes(name));
            self.sync_xattrs(ino, from, true, None)?;
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

    /// Makes a group of small files of `dir` in one batch, each read whole into `group_buf`
    /// (a changed one replaces its old copy in the batch); a file that does not fit (it
    /// grew since the listing) is written alone. Errors of one file are reported for it; a
    /// store error stops the ingest.
    fn write_small_files(
        &self,
        dir: InodeNo,
        src: &SourceDir,
        group: SmallFiles,
        group_buf: &mut [u8],
        buf: &mut [u8],
    ) -> Result<(), Failure> {
        let ns = self.ns;
        let mut read: Vec<(usize, usize, SourceMeta)> = Vec::new(); // (file, end in group_buf, meta)
        let mut alone = Vec::new();
        let mut at = 0;
        for (i, GroupFile { rel, name, replace }) in group.files.iter().enumerate() {
            let room = (group_buf.len() - at).min(READ_BUF);
            match read_new_file(src, name, &mut group_buf[at..at + room]) {
                Ok(Whole::Read(n, meta)) => {
                    at += n;
                    read.push((i, at, meta));
                }
                // Vanished since the listing: its old copy, if any, goes too.
                Ok(Whole::Gone) if *replace => alone.push(i),
                Ok(Whole::Gone) => {}
                Ok(Whole::TooBig) => alone.push(i),
                Err(f) => self.fail(rel, f),
            }
        }
        let group_buf = &*group_buf;
        let mut runs: Vec<Vec<(u64, &[u8])>> = Vec::with_capacity(read.len());
        let mut start = 0;
        for &(_, end, _) in &read {
            let data = &group_buf[start..end];
            runs.push(
                data_runs(data)
                    .map(|(s, e)| (s as u64, &data[s..e]))
                    .collect(),
            );
            start = end;
        }
        let mut start = 0;
        let files: Vec<(&[u8], WholeFile<'_>)> = read
            .iter()
            .zip(&runs)
            .map(|(&(i, end, ref meta), data)| {
                let file = whole_file(meta, end - start, data, group.files[i].replace);
                start = end;
                (&group.files[i].name[..], file)
            })
            .collect();
        let results = ns.make_files(dir, &files, Caller::ROOT)?;
        let mut forget = Vec::with_capacity(results.len());
        for ((&(i, _, _), (name, file)), result) in read.iter().zip(&files).zip(results) {
            let rel = &group.files[i].rel;
            let made = match result {
                Ok(a) => a,
                // Two names of one inode, both replaced: the one refused goes alone.
                Err(FsError::Busy) => {
                    alone.push(i);
                    continue;
                }
                Err(e) => {
                    self.fail(rel, Failure::Store(e));
                    continue;
                }
            };
            forget.push(Invalidation::Entry(dir, name.to_vec()));
            // Content, size and mtime are in: a failure with xattrs leaves the file as it is
            // (the next run compares xattrs again and sets them).
            let from = XattrSource::Entry(src, OsStr::from_bytes(name));
            match self.sync_xattrs(made.ino, from, true, None) {
                Ok(()) => {
                    bump(&self.counts.written, 1);
                    bump(&self.counts.bytes, file.size);
                }
                Err(f) => self.fail(rel, f),
            }
        }
        ns.invalidate(&forget);
        if self.work.lock().stopped {
            return Ok(());
        }
        for i in alone {
            let f = &group.files[i];
            if let Err(failure) = self.write_file(dir, src, &f.name, f.replace, buf) {
                self.fail(&f.rel, failure);
            }
        }
        Ok(())
    }

    /// Creates, with `make`, a file for `name` under a temp name no other entry has:
    /// `.NAME.TAG-SEQ.` plus [`TMP_SUFFIX`]. Never removes an existing entry (the source may
    /// hold any name).
    fn create_temp(
        &self,
        name: &[u8],
        make: impl Fn(&[u8]) -> FsResult<Attr>,
    ) -> Result<(Vec<u8>, InodeNo), Failure> {
        let keep = name.len().min(NAME_MAX - 2 - TMP_SUFFIX.len() - 2 * 17);
        loop {
            let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
            let mut t = Vec::with_capacity(NAME_MAX);
            t.push(b'.');
            t.extend_from_slice(&name[..keep]);
            t.extend_from_slice(format!(".{}-{seq:x}", self.tmp_tag).as_bytes());
            t.extend_from_slice(TMP_SUFFIX);
            match make(&t) {
                Ok(a) => return Ok((t, a.ino)),
                Err(FsError::Exists) => continue,
                Err(e) => return Err(e.into()),
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
        dir: InodeNo,
        src: &SourceDir,
        name: &[u8],
        meta: &SourceMeta,
        current: Option<&DirEntry>,
        forget: &mut Vec<Invalidation>,
    ) -> Result<(), Failure> {
        bump(&self.counts.symlinks, 1);
        let target = src
            .read_link(OsStr::from_bytes(name))
            .map_err(Failure::Source)?;
        let target = target.as_slice();
        self.keep_or_make(
            dir,
            name,
            meta,
            current,
            forget,
            |e| Ok(e.kind == Kind::Symlink && self.ns.readlink(e.ino)? == target),
            || {
                self.ns
                    .make_node(dir, name, Kind::Symlink, 0o777, 0, target, Caller::ROOT)
            },
        )
    }

    /// Keeps `current` when `same` says it already is what the source has (its owner, mode
    /// and times brought up to date), else replaces it with what `make` creates.
    #[allow(clippy::too_many_arguments)]
    fn keep_or_make(
        &self,
        dir: InodeNo,
        name: &[u8],
        meta: &SourceMeta,
        current: Option<&DirEntry>,
        forget: &mut Vec<Invalidation>,
        same: impl FnOnce(&DirEntry) -> FsResult<bool>,
        make: impl FnOnce() -> FsResult<crate::namespace::Attr>,
    ) -> Result<(), Failure> {
        if let Some(e) = current {
            if same(e)? {
                if self.sync_meta(e.ino, meta, true)? {
                    forget.push(Invalidation::Inode(e.ino));
                }
                return Ok(());
            }
            self.remove(dir, e, forget)?;
        }
        let a = make()?;
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
        self.keep_or_make(
            dir,
            name,
            meta,
            current,
            forget,
            |e| Ok(e.kind == kind && self.ns.getattr(e.ino)?.rec.rdev == rdev),
            || {
                self.ns
                    .make_node(dir, name, kind, meta.perm as u16, rdev, b"", Caller::ROOT)
            },
        )
    }

    /// Sets owner and mode (and with `times`, atime and mtime) of `ino` where they differ
    /// from the source's. True when something changed.
    fn sync_meta(&self, ino: InodeNo, meta: &SourceMeta, times: bool) -> Result<bool, FsError> {
        let rec = self.ns.getattr(ino)?.rec;
        self.sync_meta_of(ino, &rec, meta, times)
    }

    /// [`Run::sync_meta`] when the inode's record `rec` is at hand.
    fn sync_meta_of(
        &self,
        ino: InodeNo,
        rec: &crate::format::InodeRecord,
        meta: &SourceMeta,
        times: bool,
    ) -> Result<bool, FsError> {
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

    /// Makes the xattrs of `ino` those of the source entry `from`; `fresh` when `ino` was
    /// just created (it has none). `cursor` reads the
    /// copy's xattr names when given (see [`Namespace::xattr_cursor`]).
    fn sync_xattrs(
        &self,
        ino: InodeNo,
        from: XattrSource<'_>,
        fresh: bool,
        cursor: Option<&mut Cursor<'_>>,
    ) -> Result<(), Failure> {
        let ns = self.ns;
        let wanted = from.read().map_err(Failure::Source)?;
        if fresh && wanted.is_empty() {
            return Ok(());
        }
        let listed = match (fresh, cursor) {
            (true, _) => Vec::new(),
            (false, Some(c)) => ns.live_xattr_names(c, ino)?,
            (false, None) => ns.listxattr(ino)?,
        };
        let mut changed = false;
        for name in listed.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if !wanted.iter().any(|(n, _)| n.as_bytes() == name) {
                match ns.removexattr(ino, name, Caller::ROOT) {
                    Ok(()) | Err(FsError::NoAttr) => changed = true,
                    Err(e) => return Err(e.into()),
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
            ns.setxattr(ino, name, value, false, false, Caller::ROOT)?;
            changed = true;
        }
        if changed {
            ns.invalidate(&[Invalidation::Inode(ino)]);
        }
        Ok(())
    }
}

/// A file read whole, for [`Namespace::make_files`], with the owner, mode and times of
/// `meta`.
fn whole_file<'a>(
    meta: &SourceMeta,
    size: usize,
    data: &'a [(u64, &'a [u8])],
    replace: bool,
) -> WholeFile<'a> {
    WholeFile {
        perm: meta.perm as u16,
        uid: meta.uid,
        gid: meta.gid,
        atime_ns: meta.atime_ns,
        mtime_ns: meta.mtime_ns,
        size: size as u64,
        data,
        replace,
    }
}

/// What [`read_new_file`] found.
enum Whole {
    /// The file's bytes and metadata.
    Read(usize, SourceMeta),
    Gone,
    /// More than the buffer holds (it grew since the listing).
    TooBig,
}

/// Reads the regular file `name` of `src` whole into `buf`, with the metadata of what was
/// opened.
fn read_new_file(src: &SourceDir, name: &[u8], buf: &mut [u8]) -> Result<Whole, Failure> {
    let mut reader = match src.open_file(OsStr::from_bytes(name)) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Whole::Gone),
        Err(e) => return Err(Failure::Source(e)),
    };
    let meta = source_meta(&reader.metadata().map_err(Failure::Source)?);
    if meta.kind != EntryKind::File {
        return Err(Failure::Source(io::Error::other(
            "no longer a regular file; copied by the next run",
        )));
    }
    Ok(
        match read_whole(&mut reader, buf).map_err(Failure::Source)? {
            Some(n) => Whole::Read(n, meta),
            None => Whole::TooBig,
        },
    )
}

/// Reads all of `reader` into `buf`: the number of bytes, or `None` (and the reader back at
/// the start) when there is more than `buf` holds, as for a file that grew since its stat.
fn read_whole(reader: &mut File, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let n = fill(reader, buf)?;
    if n < buf.len() || fill(reader, &mut [0u8; 1])? == 0 {
        return Ok(Some(n));
    }
    reader.seek(io::SeekFrom::Start(0))?;
    Ok(None)
}

/// The runs of `buf` to store, as (start, end): all but its all-zero blocks of
/// [`HOLE_BLOCK`] bytes aligned to `buf`'s start, which are left as holes.
fn data_runs(buf: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let n = buf.len();
    let is_hole =
        move |at: usize| n - at >= HOLE_BLOCK && buf[at..at + HOLE_BLOCK].iter().all(|&b| b == 0);
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < n && is_hole(at) {
            at += HOLE_BLOCK;
        }
        if at == n {
            return None;
        }
        let start = at;
        while at < n && !is_hole(at) {
            at = (at + HOLE_BLOCK).min(n);
        }
        Some((start, at))
    })
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
        // `buf` holds whole blocks of the file but for the last read: holes stay aligned.
        for (start, end) in data_runs(&buf[..n]) {
            ns.write(ino, offset + start as u64, &buf[start..end])?;
            written_end = offset + end as u64;
        }
        offset += n as u64;
    }
}

fn display_rel(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel.display().to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn data_runs_leave_aligned_zero_blocks_out() {
        let b = HOLE_BLOCK;
        let mut buf = vec![0u8; 5 * b + 100];
        buf[10] = 1; // block 0: data
        buf[3 * b + 5] = 2; // block 3: data; blocks 1-2 zero
                            // block 4 zero, then a partial zero tail: the tail is too short to be a hole
        assert_eq!(
            data_runs(&buf).collect::<Vec<_>>(),
            [(0, b), (3 * b, 4 * b), (5 * b, 5 * b + 100)]
        );
        assert_eq!(data_runs(&vec![0u8; 2 * b]).count(), 0, "all holes");
        assert_eq!(data_runs(&[]).count(), 0);
        assert_eq!(data_runs(&[7u8; 10]).collect::<Vec<_>>(), [(0, 10)]);
    }

    #[test]
    fn read_whole_fits_or_rewinds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let mut buf = [0u8; 10];
        // Exactly the buffer's size: whole.
        let mut f = File::open(&path).unwrap();
        assert_eq!(read_whole(&mut f, &mut buf).unwrap(), Some(10));
        assert_eq!(&buf, b"0123456789");
        // Bigger than the buffer (a file that grew): none, and the reader back at 0.
        let mut small = [0u8; 4];
        let mut f = File::open(&path).unwrap();
        assert_eq!(read_whole(&mut f, &mut small).unwrap(), None);
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"0123456789");
    }
}
