//! Restore: copies a file or a tree out of a read-only snapshot to a destination, with its
//! metadata, such that an interrupted restore finishes when run again.
//!
//! What must hold:
//! - Nothing is written outside DEST. Names from the source are checked before anything is
//!   written for their directory, and DEST is walked by directory descriptors (`*at` calls with
//!   `O_NOFOLLOW`), so a symlink met in DEST is never followed: it is an error, or with
//!   `overwrite` it is removed (the link, never its target). DEST's parent is the user's path
//!   and is followed as given; DEST itself is not.
//! - A non-directory appears under its real name only complete, with its metadata and its data
//!   durable: it is built as `.<name>.dedupfs-restore.tmp` and renamed into place. A rerun skips
//!   entries that already match (kind, size, mtime, mode; symlink target) and replaces stale
//!   temp files.
//! - A directory's metadata is set after its contents are in place, so filling it does not
//!   disturb its mtime; a directory this restore creates is 0700 until then.
//! - When `restore` returns Ok, everything it wrote is durable.
//!
//! Durability comes in batches: an fsync per file cost a journal commit per file, which made a
//! tree of small files restore at a fifth of the disk's speed. Temp files gather in a [`Batch`]
//! until it is full, or until something needs their real names (a hard link to one, a sibling
//! whose name could clash with a temp name); then one syncfs(2) per filesystem (an fsync per
//! file on FUSE, which has no syncfs request) makes them durable, they are renamed into place,
//! and the directory metadata that waited on them is set.
//! The renames become durable with the next batch's syncfs, or the last one when the restore
//! ends; a crash before that leaves temp files, which a rerun replaces.
//!
//! Regular files up to [`PARALLEL_MAX`] are written by copier threads while the walk goes on
//! (decompressing, hashing and writing small files one at a time left a core idle). A batch's
//! leaves include queued copies; the flush waits for them, leaves out any that failed (a copy
//! removes its own temp file on failure) and then does not set the batch's directory metadata.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use thiserror::Error;

/// Bytes asked of the source per read: large enough that a chunked source streams at speed.
const READ_BUF: usize = 1 << 20;
/// An all-zero block of this size is skipped, not written. A multiple of every common
/// filesystem block size, so a skipped block becomes a real hole; divides `READ_BUF`.
const HOLE_BLOCK: usize = 64 << 10;
/// Suffix of the temporary name a non-directory is built under.
const TMP_SUFFIX: &str = ".dedupfs-restore.tmp";
/// Longest file name Linux filesystems accept (NAME_MAX).
const NAME_MAX: usize = 255;
/// Bytes of a name kept in its temp name; a longer name is cut, so two names may share one.
const TMP_KEEP: usize = NAME_MAX - 1 - TMP_SUFFIX.len();
/// Leaves one batch holds: a syncfs costs about one journal commit, which 4096 small files make
/// negligible, while a crash costs at most this many files' work. Small under test, so that
/// every test crosses batch boundaries.
const BATCH_LEAVES: usize = if cfg!(test) { 7 } else { 4096 };
/// File data one batch holds: enough to amortize the sync over large files too; by the time it
/// is reached, the kernel's writeback has long started, so the sync waits for little, and dirty
/// memory stays bounded.
const BATCH_BYTES: u64 = 256 << 20;
/// Directories one batch holds open for its renames and metadata: with the open ancestors,
/// well under the usual limit of 1024 descriptors.
const BATCH_DIRS: usize = if cfg!(test) { 3 } else { 256 };
/// Regular files up to this size are written by the copier threads, several at once; a bigger
/// one by the walk itself, so that the progress line moves within it. Small under test, so that
/// the tests restore files both ways.
const PARALLEL_MAX: u64 = if cfg!(test) { 4 << 10 } else { 8 << 20 };
/// Copier threads at most; fewer on a machine with fewer cores.
const COPIERS_MAX: usize = 4;
/// Copies queued beyond those the copiers hold: enough to keep them busy while the walk makes a
/// directory, few enough to bound the descriptors and memory they pin.
const QUEUE: usize = 64;
/// `f_type` of a FUSE filesystem in statfs(2) (libc's FUSE_SUPER_MAGIC, whose type varies by
/// architecture).
const FUSE_MAGIC: i64 = 0x6573_5546;
/// Minimum interval between two progress redraws (five a second).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// What a restore reads: a read-only tree addressed by paths relative to its root ("" is the root).
/// Shared by the copier threads, which read several files at once.
pub trait Source: Sync {
    /// lstat semantics: a symlink is described, not followed.
    fn stat(&self, rel: &Path) -> io::Result<SourceMeta>;
    /// Names of the entries of a directory (no "." or ".."), any order.
    fn read_dir(&self, rel: &Path) -> io::Result<Vec<OsString>>;
    fn read_link(&self, rel: &Path) -> io::Result<PathBuf>;
    /// Reads the whole file sequentially.
    fn open(&self, rel: &Path) -> io::Result<Box<dyn Read + Send + '_>>;
    /// Every extended attribute (name, value); empty when none.
    fn xattrs(&self, rel: &Path) -> io::Result<Vec<(OsString, Vec<u8>)>>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

#[derive(Clone, Debug)]
pub struct SourceMeta {
    pub kind: EntryKind,
    /// The 07777 bits of the mode.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ino: u64,
    pub nlink: u32,
    pub rdev: u64,
}

/// What a stat of a real file says, as a [`SourceMeta`].
pub fn source_meta(m: &fs::Metadata) -> SourceMeta {
    SourceMeta {
        kind: kind_of(m.mode()),
        perm: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        atime_ns: m.atime() * 1_000_000_000 + m.atime_nsec(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ino: m.ino(),
        nlink: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
        rdev: m.rdev(),
    }
}

/// A plain directory as a source (a snapshot seen through a mount, or any tree).
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    pub fn new(root: PathBuf) -> DirSource {
        DirSource { root }
    }

    /// `root.join("")` would end in '/', which makes lstat follow a symlinked root.
    fn path(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }
}

impl Source for DirSource {
    fn stat(&self, rel: &Path) -> io::Result<SourceMeta> {
        Ok(source_meta(&fs::symlink_metadata(self.path(rel))?))
    }

    fn read_dir(&self, rel: &Path) -> io::Result<Vec<OsString>> {
        fs::read_dir(self.path(rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    fn read_link(&self, rel: &Path) -> io::Result<PathBuf> {
        fs::read_link(self.path(rel))
    }

    fn open(&self, rel: &Path) -> io::Result<Box<dyn Read + Send + '_>> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.path(rel))?;
        Ok(Box::new(f))
    }

    fn xattrs(&self, rel: &Path) -> io::Result<Vec<(OsString, Vec<u8>)>> {
        let p = cstring(self.path(rel).as_os_str())?;
        // SAFETY (both calls): `p` and `n` are NUL-terminated; `sized` passes a buffer of `len` bytes.
        let names = match sized(|buf, len| unsafe { libc::llistxattr(p.as_ptr(), buf.cast(), len) })
        {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
            r => r?,
        };
        let mut out = Vec::new();
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let n = cstring(OsStr::from_bytes(name))?;
            match sized(|buf, len| unsafe {
                libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.cast(), len)
            }) {
                Ok(v) => out.push((OsString::from_vec(name.to_vec()), v)),
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {} // removed meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Replace destination entries that differ from the snapshot.
    pub overwrite: bool,
    /// Draw a progress line on stderr.
    pub progress: bool,
    /// For the ETA; when None and `progress` is set, found by a first walk of the source.
    pub total_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Regular files written; further links to one count in `hard_links`.
    pub files: u64,
    /// Directories created or merged into.
    pub dirs: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub specials: u64,
    /// File data restored (not counting skipped entries or hard links).
    pub bytes: u64,
    /// Non-directories already there as the snapshot has them (an earlier run's work).
    pub skipped: u64,
}

/// Source paths are shown from the snapshot root ("/a/b"), destination paths as on disk.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("{path}: {why}")]
    InvalidPath { path: PathBuf, why: &'static str },
    #[error(
        "{dir} in the snapshot holds an entry named {name:?}, which cannot be restored safely"
    )]
    InvalidName { dir: PathBuf, name: OsString },
    #[error("{path} exists and differs from the snapshot; use --overwrite to replace it")]
    Exists { path: PathBuf },
    #[error("reading {path} from the snapshot: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("reading {path} from the snapshot: {got} bytes where the snapshot records {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("restoring {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

type Result<T, E = RestoreError> = std::result::Result<T, E>;

fn src_path(rel: &Path) -> PathBuf {
    Path::new("/").join(rel)
}

fn rd(rel: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Read {
        path: src_path(rel),
        source,
    }
}

fn wr(path: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Restores `rel` of `source` to `dest`. If `rel` is a directory, `dest` becomes that directory
/// (created if missing, its contents merged); if a file, `dest` is the file path (or, if `dest`
/// is an existing directory, dest/<file name>).
pub fn restore(
    source: &dyn Source,
    rel: &Path,
    dest: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreStats> {
    let rel = clean_rel(rel)?;
    let meta = source.stat(&rel).map_err(rd(&rel))?;
    let progress = match (opts.progress, opts.total_bytes) {
        (false, _) => None,
        (true, Some(total)) => Some(Progress::new(total)),
        (true, None) => Some(Progress::new(total_bytes(source, &rel)?)),
    };
    let dest_is_dir = fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir());
    // The top entry goes to `name` in `parent`, or is `parent` itself for a DEST like ".".
    let (parent, name, dpath) = if meta.kind != EntryKind::Dir && dest_is_dir {
        let name = rel.file_name().ok_or(RestoreError::InvalidPath {
            path: src_path(&rel),
            why: "has no file name to restore under",
        })?;
        (dest, Some(name.to_os_string()), dest.join(name))
    } else if let Some(name) = dest.file_name() {
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = parent.unwrap_or(Path::new("."));
        (parent, Some(name.to_os_string()), dest.to_path_buf())
    } else if meta.kind == EntryKind::Dir {
        (dest, None, dest.to_path_buf())
    } else {
        let why = "is not a file name";
        return Err(RestoreError::InvalidPath {
            path: dest.into(),
            why,
        });
    };
    let base: OwnedFd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(parent)
        .map_err(wr(parent))?
        .into();
    let base = Dir::new(base, parent.to_path_buf(), false).map_err(wr(parent))?;
    let top = Item {
        dpath,
        loc: name.clone().map(PathBuf::from).unwrap_or_default(),
        name: name.clone().unwrap_or_default(),
        rel,
        meta,
    };
    std::thread::scope(|scope| {
        let mut r = Restorer {
            src: source,
            overwrite: opts.overwrite,
            base: base.clone(),
            links: HashMap::new(),
            stats: RestoreStats::default(),
            progress,
            batch: Batch::default(),
            filesystems: HashMap::new(),
            by_file: HashSet::new(),
            buf: Vec::new(),
            copiers: Copiers::start(scope, source),
        };
        r.note_filesystem(&base)?;
        let res = match &name {
            Some(_) => r.entry(&base, &top),
            None => r
                .list(&top.rel)
                .and_then(|names| r.fill_dir(&base, names, &top)),
        };
        let res = match res {
            Ok(()) => r.finish(),
            Err(e) => {
                // Keep what is complete, so that a rerun has less to do.
                if let Err(also) = r.flush() {
                    tracing::warn!("after a failed restore: {also}");
                }
                Err(e)
            }
        };
        if let Some(p) = &mut r.progress {
            p.draw();
            eprintln!();
        }
        // Dropping the restorer closes the queue: the copiers, idle by now, end.
        res.map(|()| r.stats)
    })
}

/// A copy handed to the copier threads: regular file `it`, written whole as `tmp` in `dir`.
struct Job {
    id: u64,
    dir: Arc<Dir>,
    tmp: OsString,
    it: Item,
}

/// How a job ended: the bytes copied, or why not. A panic in a copier is carried to the walk
/// and resumed there, so it unwinds the restore as it would have without the threads.
struct Done {
    id: u64,
    outcome: std::thread::Result<Result<u64>>,
}

/// The copier threads and the walk's side of their queues.
struct Copiers {
    jobs: SyncSender<Job>,
    done: Receiver<Done>,
    next_id: u64,
    /// Jobs queued or being copied.
    in_flight: usize,
    /// Jobs that failed (their temp files removed): their leaves are not renamed into place.
    failed: HashSet<u64>,
    /// A failure not yet returned to the walk.
    unreported: Option<RestoreError>,
    /// Copies were lost unreported: no leaf a copier wrote in this batch is kept.
    lost: bool,
}

impl Copiers {
    /// Starts the copiers; None (the walk copies every file itself) if no thread starts.
    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        src: &'scope dyn Source,
    ) -> Option<Copiers> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        let (report, done) = mpsc::channel();
        let mut started = 0;
        for _ in 0..cores.clamp(1, COPIERS_MAX) {
            let (queue, report) = (queue.clone(), report.clone());
            let spawned = std::thread::Builder::new()
                .name("restore-copy".into())
                .spawn_scoped(scope, move || copier(src, &queue, &report));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!("cannot start a restore copier thread: {e}"),
            }
        }
        (started > 0).then_some(Copiers {
            jobs,
            done,
            next_id: 0,
            in_flight: 0,
            failed: HashSet::new(),
            unreported: None,
            lost: false,
        })
    }
}

/// A copier thread: takes jobs until the queue closes.
fn copier(src: &dyn Source, queue: &Mutex<Receiver<Job>>, report: &Sender<Done>) {
    let mut buf = Vec::new();
    loop {
        let job = match queue.lock().recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            write_file(src, &job.dir, &job.tmp, &job.it, &mut buf, &mut |_| {})
        }));
        let id = job.id;
        drop(job); // its directory's descriptor goes before the walk hears
        if report.send(Done { id, outcome }).is_err() {
            return;
        }
    }
}

/// Writes regular file `it` as `tmp` in `dir`: its data (all-zero blocks left as holes), then
/// its metadata. Returns the bytes copied; on failure, the temp file is removed. `copied` hears
/// of each read's bytes.
fn write_file(
    src: &dyn Source,
    dir: &Dir,
    tmp: &OsStr,
    it: &Item,
    buf: &mut Vec<u8>,
    copied: &mut dyn FnMut(u64),
) -> Result<u64> {
    let (rel, meta) = (&it.rel, &it.meta);
    let written = (|| {
        let xattrs = src.xattrs(rel).map_err(rd(rel))?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        let f = File::from(open_at(dir.fd(), tmp, flags, 0o600).map_err(it.wr())?);
        let end = copy_data(src, &f, it, buf, copied)?;
        // Before the metadata: truncation clears setuid bits and capabilities.
        if end != meta.size {
            f.set_len(meta.size).map_err(it.wr())?; // it ends in a hole
        }
        apply_meta(&Target::Fd(f.as_fd()), meta, &xattrs, &it.dpath)
    })();
    match written {
        Ok(()) => Ok(meta.size),
        Err(e) => {
            let _ = unlink_at(dir.fd(), tmp, 0);
            Err(e)
        }
    }
}

/// Copies the file's data, leaving all-zero blocks as holes; returns where the written data
/// ends, short of the size when the file ends in a hole.
fn copy_data(
    src: &dyn Source,
    f: &File,
    it: &Item,
    buf: &mut Vec<u8>,
    copied: &mut dyn FnMut(u64),
) -> Result<u64> {
    let mut reader = src.open(&it.rel).map_err(rd(&it.rel))?;
    if buf.is_empty() {
        *buf = vec![0u8; READ_BUF];
    }
    let (mut off, mut end) = (0u64, 0u64);
    loop {
        let n = fill(&mut *reader, buf).map_err(rd(&it.rel))?;
        if let Some(e) = write_sparse(f, &buf[..n], off).map_err(it.wr())? {
            end = e;
        }
        off += n as u64;
        copied(n as u64);
        if n < buf.len() {
            break;
        }
    }
    if off != it.meta.size {
        let (path, expected) = (src_path(&it.rel), it.meta.size);
        return Err(RestoreError::SizeMismatch {
            path,
            expected,
            got: off,
        });
    }
    Ok(end)
}

/// One human line: "restored 1,234 files, 56 dirs, 3 symlinks, 2 hard links: 1.2 GiB in 3.4 s
/// (350 MiB/s); 10 already there".
pub fn summary(stats: &RestoreStats, elapsed: Duration) -> String {
    let mut s = format!(
        "restored {}, {}, {}, {}",
        count(stats.files, "file"),
        count(stats.dirs, "dir"),
        count(stats.symlinks, "symlink"),
        count(stats.hard_links, "hard link")
    );
    if stats.specials > 0 {
        s += &format!(", {}", count(stats.specials, "special file"));
    }
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        stats.bytes as f64 / secs
    } else {
        0.0
    };
    s += &format!(
        ": {} in {secs:.1} s ({}/s)",
        human_bytes(stats.bytes as f64),
        human_bytes(rate)
    );
    if stats.skipped > 0 {
        s += &format!("; {} already there", thousands(stats.skipped));
    }
    s
}

fn count(n: u64, what: &str) -> String {
    format!("{} {what}{}", thousands(n), if n == 1 { "" } else { "s" })
}

fn thousands(n: u64) -> String {
    if n < 1000 {
        n.to_string()
    } else {
        format!("{},{:03}", thousands(n / 1000), n % 1000)
    }
}

fn human_bytes(mut v: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    match i {
        0 => format!("{v:.0} B"),
        _ if v >= 100.0 => format!("{v:.0} {}", UNITS[i]),
        _ => format!("{v:.1} {}", UNITS[i]),
    }
}

fn progress_line(done: u64, total: u64, files: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let pct = if total > 0 {
        (done as f64 * 100.0 / total as f64).min(100.0)
    } else {
        100.0
    };
    let eta = match total.checked_sub(done) {
        Some(left) if rate > 0.0 => {
            let s = (left as f64 / rate).round() as u64;
            format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        }
        _ => "-".into(),
    };
    format!(
        "{} / {} ({pct:.0}%), {} files, {:.1} MiB/s, ETA {eta}",
        human_bytes(done as f64),
        human_bytes(total as f64),
        thousands(files),
        rate / (1 << 20) as f64
    )
}

struct Progress {
    total: u64,
    done: u64,
    files: u64,
    start: Instant,
    last: Option<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        Progress {
            total,
            done: 0,
            files: 0,
            start: Instant::now(),
            last: None,
        }
    }

    fn add(&mut self, bytes: u64, files: u64) {
        self.done += bytes;
        self.files += files;
        if self.last.is_none_or(|l| l.elapsed() >= PROGRESS_EVERY) {
            self.draw();
        }
    }

    fn draw(&mut self) {
        self.last = Some(Instant::now());
        // "\x1b[K" clears what a longer previous line left behind.
        eprint!(
            "\r{}\x1b[K",
            progress_line(self.done, self.total, self.files, self.start.elapsed())
        );
    }
}

/// Bytes of file data under `rel`, each hard-linked file once.
fn total_bytes(src: &dyn Source, rel: &Path) -> Result<u64> {
    let (mut total, mut seen, mut stack) = (0, HashSet::new(), vec![rel.to_path_buf()]);
    while let Some(p) = stack.pop() {
        let m = src.stat(&p).map_err(rd(&p))?;
        match m.kind {
            EntryKind::Dir => {
                for n in src.read_dir(&p).map_err(rd(&p))? {
                    check_name(&p, &n)?;
                    stack.push(p.join(n));
                }
            }
            EntryKind::File if m.nlink <= 1 || seen.insert(m.ino) => total += m.size,
            _ => {}
        }
    }
    Ok(total)
}

/// The user's path into the snapshot, made relative; ".." could leave the snapshot.
fn clean_rel(rel: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => {
                check_name(&out, n)?;
                out.push(n);
            }
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(RestoreError::InvalidPath {
                    path: rel.into(),
                    why: "must not contain \"..\"",
                })
            }
        }
    }
    Ok(out)
}

/// A name is one path component: anything else could address outside its directory.
fn check_name(dir: &Path, name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(RestoreError::InvalidName {
            dir: src_path(dir),
            name: name.to_os_string(),
        });
    }
    Ok(())
}

/// `.<name>.dedupfs-restore.tmp`, the name cut short if the result would exceed NAME_MAX.
fn tmp_name(name: &OsStr) -> OsString {
    let keep = name.len().min(TMP_KEEP);
    let mut t = b".".to_vec();
    t.extend_from_slice(&name.as_bytes()[..keep]);
    t.extend_from_slice(TMP_SUFFIX.as_bytes());
    OsString::from_vec(t)
}

/// Whether restoring `name` could meet a temp file of the batch in its directory: `name` is
/// shaped like a temp name, or is long enough that its temp name is cut and may be another's.
fn may_meet_temp(name: &OsStr) -> bool {
    let b = name.as_bytes();
    (b.starts_with(b".") && b.ends_with(TMP_SUFFIX.as_bytes())) || b.len() >= TMP_KEEP
}

struct Restorer<'a> {
    src: &'a dyn Source,
    overwrite: bool,
    /// The directory holding the top entry; `Item::loc` is relative to it.
    base: Arc<Dir>,
    /// Source inode of a multiply-linked entry → where it was first restored.
    links: HashMap<u64, PathBuf>,
    stats: RestoreStats,
    progress: Option<Progress>,
    batch: Batch,
    /// One open directory per filesystem written to (`st_dev` → it), for the final sync.
    filesystems: HashMap<u64, Arc<Dir>>,
    /// Filesystems where syncfs(2) does not make data durable or fails: each file, then
    /// each directory, is synced on its own.
    by_file: HashSet<u64>,
    /// The read buffer, `READ_BUF` bytes once the first file is copied.
    buf: Vec<u8>,
    /// Threads that copy small files while the walk goes on; None: the walk copies them.
    copiers: Option<Copiers>,
}

/// A destination directory, open; batched work in it holds it open until the flush.
struct Dir {
    fd: OwnedFd,
    /// `st_dev`: a syncfs covers one filesystem, and DEST may hold mount points.
    dev: u64,
    ino: u64,
    /// Made by this restore, so it holds only what this restore put there (each source name
    /// once, and no temp name of the batch that a sibling could meet, see `may_meet_temp`):
    /// no name needs looking up before it is made.
    fresh: bool,
    /// As shown to the user.
    dpath: PathBuf,
}

impl Dir {
    fn new(fd: OwnedFd, dpath: PathBuf, fresh: bool) -> io::Result<Arc<Dir>> {
        let st = fstat(fd.as_fd())?;
        Ok(Arc::new(Dir {
            fd,
            dev: st.st_dev,
            ino: st.st_ino,
            fresh,
            dpath,
        }))
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Work whose durability is settled together (see the module doc).
#[derive(Default)]
struct Batch {
    /// Leaves built under their temp names, in the order they were made.
    leaves: Vec<Pending>,
    /// Directory metadata to set after the renames, children before parents.
    dir_metas: Vec<DirMeta>,
    bytes: u64,
    /// Source inodes of multiply-linked files in `leaves`: a further link to one is made from
    /// its real name, so it waits for the flush.
    inos: HashSet<u64>,
    /// (st_dev, st_ino) of every directory the batch holds open.
    dirs: HashSet<(u64, u64)>,
}

/// A leaf complete under its temp name.
struct Pending {
    dir: Arc<Dir>,
    tmp: OsString,
    name: OsString,
    /// A regular file, which the per-file fallback syncs.
    file: bool,
    dpath: PathBuf,
    /// The copier job writing it, if one is.
    job: Option<u64>,
}

struct DirMeta {
    dir: Arc<Dir>,
    meta: SourceMeta,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Batch {
    fn add_leaf(&mut self, p: Pending, bytes: u64) {
        self.dirs.insert((p.dir.dev, p.dir.ino));
        self.bytes += bytes;
        self.leaves.push(p);
    }

    fn add_dir_meta(&mut self, d: DirMeta) {
        self.dirs.insert((d.dir.dev, d.dir.ino));
        self.dir_metas.push(d);
    }

    fn is_full(&self) -> bool {
        self.leaves.len() >= BATCH_LEAVES
            || self.bytes >= BATCH_BYTES
            || self.dirs.len() >= BATCH_DIRS
    }
}

/// One source entry and where it goes.
#[derive(Clone)]
struct Item {
    /// Path in the snapshot.
    rel: PathBuf,
    meta: SourceMeta,
    /// Name in the destination directory (the top entry's may differ from the source's).
    name: OsString,
    /// Destination relative to `Restorer::base`, where a later hard link finds it.
    loc: PathBuf,
    /// Destination as shown to the user.
    dpath: PathBuf,
}

impl Item {
    fn child(&self, name: OsString, meta: SourceMeta) -> Item {
        Item {
            rel: self.rel.join(&name),
            meta,
            loc: self.loc.join(&name),
            dpath: self.dpath.join(&name),
            name,
        }
    }

    fn wr(&self) -> impl FnOnce(io::Error) -> RestoreError + '_ {
        wr(&self.dpath)
    }
}

impl Restorer<'_> {
    /// Restores `it` into `dir`.
    fn entry(&mut self, dir: &Arc<Dir>, it: &Item) -> Result<()> {
        if may_meet_temp(&it.name) {
            self.flush()?;
        }
        if it.meta.kind != EntryKind::Dir {
            return self.leaf(dir, it);
        }
        let names = self.list(&it.rel)?;
        let existing = if dir.fresh {
            None
        } else {
            lstat_at(dir.fd(), &it.name).map_err(it.wr())?
        };
        let fresh = match existing {
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => false,
            Some(_) if !self.overwrite => {
                return Err(RestoreError::Exists {
                    path: it.dpath.clone(),
                })
            }
            existing => {
                if existing.is_some() {
                    remove_at(dir.fd(), &it.name).map_err(it.wr())?;
                }
                let n = cstring(&it.name).map_err(it.wr())?;
                // SAFETY: `n` is NUL-terminated.
                cvt(unsafe { libc::mkdirat(dir.fd().as_raw_fd(), n.as_ptr(), 0o700) })
                    .map_err(it.wr())?;
                true
            }
        };
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        let fd = open_at(dir.fd(), &it.name, flags, 0).map_err(it.wr())?;
        let sub = Dir::new(fd, it.dpath.clone(), fresh).map_err(it.wr())?;
        self.note_filesystem(&sub)?;
        self.fill_dir(&sub, names, it)
    }

    /// The names in source directory `rel`, all checked before any is used. Shorter names come
    /// first: a temp name is longer than its own name, so a source entry that happens to be
    /// named like a sibling's temp file is restored after that sibling and never taken for a
    /// stale temp.
    fn list(&self, rel: &Path) -> Result<Vec<OsString>> {
        let mut names = self.src.read_dir(rel).map_err(rd(rel))?;
        for n in &names {
            check_name(rel, n)?;
        }
        names.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
        Ok(names)
    }

    /// Restores the contents of directory `it`, open as `dir`, then (in the batch) its metadata.
    fn fill_dir(&mut self, dir: &Arc<Dir>, names: Vec<OsString>, it: &Item) -> Result<()> {
        for n in names {
            let rel = it.rel.join(&n);
            let meta = self.src.stat(&rel).map_err(rd(&rel))?;
            self.entry(dir, &it.child(n, meta))?;
        }
        let xattrs = self.src.xattrs(&it.rel).map_err(rd(&it.rel))?;
        self.batch.add_dir_meta(DirMeta {
            dir: dir.clone(),
            meta: it.meta.clone(),
            xattrs,
        });
        self.stats.dirs += 1;
        self.flush_if_full()
    }

    fn leaf(&mut self, dir: &Arc<Dir>, it: &Item) -> Result<()> {
        let (meta, dfd) = (&it.meta, dir.fd());
        let first = if meta.nlink > 1 {
            self.links.get(&meta.ino).cloned()
        } else {
            None
        };
        if first.is_some() && self.batch.inos.contains(&meta.ino) {
            self.flush()?; // the first link must be under its real name
        }
        let existing = if dir.fresh {
            None
        } else {
            lstat_at(dfd, &it.name).map_err(it.wr())?
        };
        if let Some(st) = existing {
            let same = match &first {
                Some(f) => {
                    let fst = self.at_loc(f, lstat_at).map_err(it.wr())?;
                    fst.is_some_and(|f| (f.st_dev, f.st_ino) == (st.st_dev, st.st_ino))
                }
                None => self.matches(dfd, &st, it).map_err(it.wr())?,
            };
            if same {
                self.stats.skipped += 1;
                self.done(first.is_none() && meta.kind == EntryKind::File, meta.size);
                if meta.nlink > 1 && first.is_none() {
                    self.links.insert(meta.ino, it.loc.clone());
                }
                return Ok(());
            }
            if !self.overwrite {
                return Err(RestoreError::Exists {
                    path: it.dpath.clone(),
                });
            }
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                remove_at(dfd, &it.name).map_err(it.wr())?; // a rename cannot replace it
            }
        }
        let tmp = tmp_name(&it.name);
        if !dir.fresh {
            match unlink_at(dfd, &tmp, 0) {
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(it.wr()(e)),
                _ => {}
            }
        }
        if let Some(f) = &first {
            // The inode is durable already: the link needs no batch.
            let made = self
                .at_loc(f, |d, n| link_at(d, n, dfd, &tmp))
                .and_then(|()| rename_at(dfd, &tmp, &it.name));
            if let Err(e) = made {
                let _ = unlink_at(dfd, &tmp, 0);
                return Err(it.wr()(e));
            }
            self.stats.hard_links += 1;
            return Ok(());
        }
        let job = if meta.kind == EntryKind::File {
            self.write_file(dir, &tmp, it)?
        } else {
            if let Err(e) = self.create(dfd, &tmp, it) {
                let _ = unlink_at(dfd, &tmp, 0);
                return Err(e);
            }
            None
        };
        match meta.kind {
            EntryKind::File => self.stats.files += 1,
            EntryKind::Symlink => self.stats.symlinks += 1,
            _ => self.stats.specials += 1,
        }
        let file = meta.kind == EntryKind::File;
        if meta.nlink > 1 {
            self.links.insert(meta.ino, it.loc.clone());
            self.batch.inos.insert(meta.ino);
        }
        let pending = Pending {
            dir: dir.clone(),
            tmp,
            name: it.name.clone(),
            file,
            dpath: it.dpath.clone(),
            job,
        };
        self.batch
            .add_leaf(pending, if file { meta.size } else { 0 });
        self.flush_if_full()
    }

    /// Writes regular file `it` as `tmp` in `dir`, or queues it for a copier (its job's id).
    /// A failed copy's error comes back from a later call of this or from the flush.
    fn write_file(&mut self, dir: &Arc<Dir>, tmp: &OsStr, it: &Item) -> Result<Option<u64>> {
        // Before the job is queued: once it is, its leaf must join the batch, or nothing
        // would rename or remove the temp file it makes.
        self.collect_copies(false)?;
        if let Some(c) = self
            .copiers
            .as_mut()
            .filter(|_| it.meta.size <= PARALLEL_MAX)
        {
            let id = c.next_id;
            c.next_id += 1;
            let job = Job {
                id,
                dir: dir.clone(),
                tmp: tmp.to_os_string(),
                it: it.clone(),
            };
            // The copiers end only when the queue closes, so the send fails only if every
            // one of them is gone, which a panic (resumed below) would explain.
            if c.jobs.send(job).is_ok() {
                c.in_flight += 1;
                return Ok(Some(id));
            }
            self.collect_copies(true)?;
            self.copiers = None;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let progress = &mut self.progress;
        let copied = write_file(self.src, dir, tmp, it, &mut buf, &mut |n| {
            if let Some(p) = progress {
                p.add(n, 0);
            }
        });
        self.buf = buf;
        self.stats.bytes += copied?;
        self.done(true, 0);
        Ok(None)
    }

    /// Takes the reports of finished copies; with `wait`, until none is in flight. Returns a
    /// failure not returned before (a copy that failed has removed its temp file).
    fn collect_copies(&mut self, wait: bool) -> Result<()> {
        let Some(c) = self.copiers.as_mut() else {
            return Ok(());
        };
        while c.in_flight > 0 {
            let report = if wait {
                c.done.recv().ok()
            } else {
                c.done.try_recv().ok()
            };
            let Some(Done { id, outcome }) = report else {
                if wait {
                    // Every copier is gone with copies unreported, which a panic resumed
                    // here would have explained: none of those copies can be trusted.
                    c.in_flight = 0;
                    c.lost = true;
                    let why = io::Error::other("the restore's copier threads ended early");
                    c.unreported.get_or_insert(wr(&self.base.dpath)(why));
                }
                break;
            };
            c.in_flight -= 1;
            match outcome {
                Ok(Ok(bytes)) => {
                    self.stats.bytes += bytes;
                    if let Some(p) = &mut self.progress {
                        p.add(bytes, 1);
                    }
                }
                Ok(Err(e)) => {
                    c.failed.insert(id);
                    c.unreported.get_or_insert(e);
                }
                Err(panicked) => panic::resume_unwind(panicked),
            }
        }
        match c.unreported.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Builds `it`, neither a regular file nor a directory, as `tmp` in `dir`, metadata
    /// included.
    fn create(&mut self, dir: BorrowedFd<'_>, tmp: &OsStr, it: &Item) -> Result<()> {
        let (rel, meta) = (&it.rel, &it.meta);
        let xattrs = self.src.xattrs(rel).map_err(rd(rel))?;
        let t = cstring(tmp).map_err(it.wr())?;
        let ifmt = match meta.kind {
            EntryKind::File | EntryKind::Dir => {
                unreachable!("regular files are written by write_file(), directories by entry()")
            }
            EntryKind::Symlink => {
                let target = self.src.read_link(rel).map_err(rd(rel))?;
                let target = cstring(target.as_os_str()).map_err(it.wr())?;
                // SAFETY: both strings are NUL-terminated.
                let r = unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), t.as_ptr()) };
                cvt(r).map_err(it.wr())?;
                return apply_meta(&Target::At(dir, &t), meta, &xattrs, &it.dpath);
            }
            EntryKind::Fifo => libc::S_IFIFO,
            EntryKind::Socket => libc::S_IFSOCK,
            EntryKind::CharDev => libc::S_IFCHR,
            EntryKind::BlockDev => libc::S_IFBLK,
        };
        let mode = ifmt | (meta.perm & 0o7777) as libc::mode_t;
        // SAFETY: `t` is NUL-terminated.
        let r =
            unsafe { libc::mknodat(dir.as_raw_fd(), t.as_ptr(), mode, meta.rdev as libc::dev_t) };
        cvt(r).map_err(it.wr())?;
        apply_meta(&Target::At(dir, &t), meta, &xattrs, &it.dpath)
    }

    fn done(&mut self, file: bool, bytes: u64) {
        if let Some(p) = &mut self.progress {
            p.add(bytes, u64::from(file));
        }
    }

    fn flush_if_full(&mut self) -> Result<()> {
        if self.batch.is_full() {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Makes the batch's leaves durable, renames them into place, then sets the directory
    /// metadata that waited on them. On failure, the leaves not yet in place are removed.
    /// A copy that failed leaves its directories' metadata unset (a directory this restore
    /// made stays 0700, so a rerun can fill it) and is reported once the rest is in place.
    fn flush(&mut self) -> Result<()> {
        let copies = self.collect_copies(true);
        let mut batch = std::mem::take(&mut self.batch);
        let failed = self.copiers.as_mut().map(|c| {
            let lost = std::mem::take(&mut c.lost);
            (std::mem::take(&mut c.failed), lost)
        });
        if let Some((failed, lost)) = failed.filter(|(f, lost)| !f.is_empty() || *lost) {
            let (copied, rest): (Vec<Pending>, Vec<Pending>) =
                batch.leaves.into_iter().partition(|p| p.job.is_some());
            let (kept, dropped): (Vec<Pending>, Vec<Pending>) = copied
                .into_iter()
                .partition(|p| !lost && p.job.is_some_and(|id| !failed.contains(&id)));
            discard(&dropped); // a failed copy removed its own; a lost one may not have
            batch.leaves = rest.into_iter().chain(kept).collect();
            batch.dir_metas.clear();
        }
        // A copy's failure returned after these would go unsaid.
        let unsaid = |copies: &Result<()>| {
            if let Err(e) = copies {
                tracing::warn!("restoring: {e}");
            }
        };
        if let Err(e) = self.sync(&batch.leaves) {
            discard(&batch.leaves);
            unsaid(&copies);
            return Err(e);
        }
        for (i, p) in batch.leaves.iter().enumerate() {
            if let Err(e) = rename_at(p.dir.fd(), &p.tmp, &p.name) {
                discard(&batch.leaves[i..]);
                unsaid(&copies);
                return Err(wr(&p.dpath)(e));
            }
        }
        for d in &batch.dir_metas {
            apply_meta(&Target::Fd(d.dir.fd()), &d.meta, &d.xattrs, &d.dir.dpath)?;
        }
        // Where no syncfs will follow: the renames and the metadata, each directory once.
        let mut seen = HashSet::new();
        let dirs = batch.leaves.iter().map(|p| &p.dir);
        for d in dirs.chain(batch.dir_metas.iter().map(|d| &d.dir)) {
            if self.by_file.contains(&d.dev) && seen.insert((d.dev, d.ino)) {
                fsync(d.fd()).map_err(wr(&d.dpath))?;
            }
        }
        copies
    }

    /// Makes `leaves` durable, data and metadata: one syncfs per filesystem they are on, or an
    /// fsync per file where syncfs cannot.
    fn sync(&mut self, leaves: &[Pending]) -> Result<()> {
        let mut filesystems: HashMap<u64, &Dir> = HashMap::new();
        for p in leaves {
            filesystems.entry(p.dir.dev).or_insert(&p.dir);
        }
        for d in filesystems.into_values() {
            if self.by_file.contains(&d.dev) {
                continue;
            }
            match syncfs(d.fd()) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) => {
                    tracing::warn!("syncfs in {}: {e}; syncing file by file", d.dpath.display());
                    self.by_file.insert(d.dev);
                }
                Err(e) => return Err(sync_error(&d.dpath, e)),
            }
        }
        for p in leaves {
            if p.file && self.by_file.contains(&p.dir.dev) {
                let f = open_at(p.dir.fd(), &p.tmp, libc::O_RDONLY, 0).map_err(wr(&p.dpath))?;
                fsync(f.as_fd()).map_err(wr(&p.dpath))?;
            }
        }
        Ok(())
    }

    /// Notes the filesystem `d` is on, the first time one of its directories is opened.
    fn note_filesystem(&mut self, d: &Arc<Dir>) -> Result<()> {
        if self.filesystems.contains_key(&d.dev) {
            return Ok(());
        }
        // SAFETY: statfs is plain data; fstatfs fills it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::fstatfs(d.fd().as_raw_fd(), &mut st) }).map_err(wr(&d.dpath))?;
        if st.f_type as i64 == FUSE_MAGIC {
            // syncfs writes dirty pages to the daemon but, except on virtiofs, asks it to make
            // nothing durable; fsync does.
            self.by_file.insert(d.dev);
        }
        self.filesystems.insert(d.dev, d.clone());
        Ok(())
    }

    /// Flushes the last batch, then makes the renames and the metadata durable.
    fn finish(&mut self) -> Result<()> {
        self.flush()?;
        for d in self.filesystems.values() {
            if self.by_file.contains(&d.dev) {
                // The flushes synced every directory they touched; this is also the one DEST
                // was made in, when it is on this filesystem.
                fsync(d.fd()).map_err(wr(&d.dpath))?;
            } else {
                syncfs(d.fd()).map_err(|e| sync_error(&d.dpath, e))?;
            }
        }
        Ok(())
    }

    /// Whether an existing destination entry is already what the snapshot holds.
    fn matches(&self, dir: BorrowedFd<'_>, st: &libc::stat, it: &Item) -> io::Result<bool> {
        let (kind, meta) = (kind_of(st.st_mode), &it.meta);
        if kind != meta.kind {
            return Ok(false);
        }
        if kind == EntryKind::Symlink {
            let target = self.src.read_link(&it.rel)?;
            return Ok(readlink_at(dir, &it.name)? == target.into_os_string());
        }
        let mtime = st.st_mtime * 1_000_000_000 + st.st_mtime_nsec;
        let dev = matches!(kind, EntryKind::CharDev | EntryKind::BlockDev);
        Ok(st.st_size as u64 == meta.size
            && mtime == meta.mtime_ns
            && st.st_mode & 0o7777 == meta.perm
            && (!dev || st.st_rdev == meta.rdev))
    }

    /// Runs `f` on (directory, name) of `loc`, walking from `base` without following symlinks.
    fn at_loc<T>(
        &self,
        loc: &Path,
        f: impl FnOnce(BorrowedFd<'_>, &OsStr) -> io::Result<T>,
    ) -> io::Result<T> {
        let comps: Vec<&OsStr> = loc.iter().collect();
        let (last, dirs) = comps.split_last().ok_or(io::ErrorKind::InvalidInput)?;
        let mut cur: Option<OwnedFd> = None;
        for d in dirs {
            let at = cur.as_ref().map_or(self.base.fd(), |c| c.as_fd());
            cur = Some(open_at(at, d, libc::O_RDONLY | libc::O_DIRECTORY, 0)?);
        }
        f(cur.as_ref().map_or(self.base.fd(), |c| c.as_fd()), last)
    }
}

/// Removes leaves that will not be renamed into place; a rerun would replace them anyway.
fn discard(leaves: &[Pending]) {
    for p in leaves {
        let _ = unlink_at(p.dir.fd(), &p.tmp, 0);
    }
}

fn sync_error(dpath: &Path, e: io::Error) -> RestoreError {
    let why = io::Error::new(e.kind(), format!("syncing its filesystem: {e}"));
    wr(dpath)(why)
}

/// Writes `data` at `off` but its all-zero `HOLE_BLOCK`s, each run of other blocks in one
/// call; returns where the last write ended, None if nothing was written.
fn write_sparse(f: &File, data: &[u8], off: u64) -> io::Result<Option<u64>> {
    let (mut end, mut run) = (None, None);
    for (i, block) in data.chunks(HOLE_BLOCK).enumerate() {
        let at = i * HOLE_BLOCK;
        match (is_zero(block), run) {
            (false, None) => run = Some(at),
            (true, Some(start)) => {
                f.write_all_at(&data[start..at], off + start as u64)?;
                (end, run) = (Some(off + at as u64), None);
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        f.write_all_at(&data[start..], off + start as u64)?;
        end = Some(off + data.len() as u64);
    }
    Ok(end)
}

/// A byte loop with an early exit does not vectorize; an OR over a few hundred bytes does,
/// and data that is not zero usually shows it in its first bytes.
fn is_zero(block: &[u8]) -> bool {
    block
        .chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The kind from `st_mode` bits.
pub(crate) fn kind_of(mode: u32) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        libc::S_IFIFO => EntryKind::Fifo,
        libc::S_IFSOCK => EntryKind::Socket,
        libc::S_IFCHR => EntryKind::CharDev,
        libc::S_IFBLK => EntryKind::BlockDev,
        _ => EntryKind::File,
    }
}

/// Reads until `buf` is full or the end of the input; returns the bytes read.
pub(crate) fn fill(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Where metadata goes: an open file or directory, or a name in a directory (symlinks,
/// special files), never followed.
enum Target<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a CStr),
}

/// Owner, then mode (chown clears setuid), then xattrs (chown clears capabilities), then times.
fn apply_meta(
    t: &Target<'_>,
    meta: &SourceMeta,
    xattrs: &[(OsString, Vec<u8>)],
    dpath: &Path,
) -> Result<()> {
    let (uid, gid) = (meta.uid, meta.gid);
    // SAFETY (all calls here): descriptors are open, strings NUL-terminated, buffers sized.
    let r = match t {
        Target::Fd(fd) => unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) },
        Target::At(d, n) => unsafe {
            libc::fchownat(
                d.as_raw_fd(),
                n.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
    };
    match cvt(r) {
        // Like tar and cp -p: a user restores what they can, as themselves.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && unsafe { libc::geteuid() } != 0 => {}
        r => r.map(drop).map_err(wr(dpath))?,
    }
    if meta.kind != EntryKind::Symlink {
        let mode = meta.perm as libc::mode_t & 0o7777;
        let r = match t {
            Target::Fd(fd) => unsafe { libc::fchmod(fd.as_raw_fd(), mode) },
            Target::At(d, n) => unsafe {
                libc::fchmodat(d.as_raw_fd(), n.as_ptr(), mode, libc::AT_SYMLINK_NOFOLLOW)
            },
        };
        cvt(r).map_err(wr(dpath))?;
    }
    for (name, value) in xattrs {
        let n = cstring(name).map_err(wr(dpath))?;
        let (v, len) = (value.as_ptr().cast(), value.len());
        let r = match t {
            Target::Fd(fd) => unsafe { libc::fsetxattr(fd.as_raw_fd(), n.as_ptr(), v, len, 0) },
            Target::At(d, entry) => {
                let mut p = format!("/proc/self/fd/{}/", d.as_raw_fd()).into_bytes();
                p.extend_from_slice(entry.to_bytes());
                let p = cstring(OsStr::from_bytes(&p)).map_err(wr(dpath))?;
                unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), v, len, 0) }
            }
        };
        let Err(e) = cvt(r) else { continue };
        let b = name.as_bytes();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) && b.starts_with(b"system.posix_acl_") {
            continue; // no ACL support here; the mode bits still hold
        }
        if e.raw_os_error() == Some(libc::EPERM)
            && b.starts_with(b"user.")
            && matches!(t, Target::At(..))
        {
            // The kernel keeps user.* only on files and directories.
            tracing::warn!("restoring {}: dropped xattr {name:?}: {e}", dpath.display());
            continue;
        }
        let why = io::Error::new(e.kind(), format!("setting xattr {name:?}: {e}"));
        return Err(wr(dpath)(why));
    }
    let ts = [timespec(meta.atime_ns), timespec(meta.mtime_ns)];
    let r = match t {
        Target::Fd(fd) => unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) },
        Target::At(d, n) => unsafe {
            libc::utimensat(
                d.as_raw_fd(),
                n.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
    };
    cvt(r).map(drop).map_err(wr(dpath))
}

fn timespec(ns: i64) -> libc::timespec {
    // SAFETY: timespec is plain data; zero is a valid value.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    t.tv_sec = ns.div_euclid(1_000_000_000) as libc::time_t;
    t.tv_nsec = ns.rem_euclid(1_000_000_000) as _;
    t
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

/// Calls `f(buf, len)` (a listxattr/getxattr-style call) with a buffer that fits.
fn sized(mut f: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let need = f(std::ptr::null_mut(), 0);
        if need < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; need as usize];
        let got = f(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e); // ERANGE: it grew meanwhile; ask again
        }
    }
}

/// `openat` that never follows a symlink in the last component.
fn open_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: libc::c_int,
    mode: libc::c_uint,
) -> io::Result<OwnedFd> {
    let n = cstring(name)?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `n` is NUL-terminated; the returned descriptor is ours to own.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), n.as_ptr(), flags, mode) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// lstat of `name` in `dir`; None when it does not exist.
fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<libc::stat>> {
    let n = cstring(name)?;
    // SAFETY: stat is plain data; fstatat fills it; `n` is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    match cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            n.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    }) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is open.
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

/// Writes back the whole filesystem `fd` is on; reports a writeback error met since `fd` was
/// opened (Linux 5.8 and later).
fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is open.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

fn readlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OsString> {
    let n = cstring(name)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `n` is NUL-terminated; `buf` holds `buf.len()` bytes.
        let r = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                n.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if (r as usize) < buf.len() {
            buf.truncate(r as usize);
            return Ok(OsString::from_vec(buf));
        }
        buf.resize(buf.len() * 2, 0);
    }
}

fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int) -> io::Result<()> {
    let n = cstring(name)?;
    // SAFETY: `n` is NUL-terminated.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) }).map(drop)
}

fn rename_at(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr) -> io::Result<()> {
    let (f, t) = (cstring(from)?, cstring(to)?);
    // SAFETY: both names are NUL-terminated.
    cvt(unsafe { libc::renameat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr()) })
        .map(drop)
}

/// Hard link without following a symlink at `from`.
fn link_at(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> io::Result<()> {
    let (f, t) = (cstring(from)?, cstring(to)?);
    // SAFETY: both names are NUL-terminated.
    cvt(unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// Removes `name` from `dir`, a directory with its contents; a symlink is removed, not followed.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match unlink_at(dir, name, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {}
        r => return r,
    }
    let sub = open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    for child in fs::read_dir(format!("/proc/self/fd/{}", sub.as_raw_fd()))? {
        remove_at(sub.as_fd(), &child?.file_name())?;
    }
    unlink_at(dir, name, libc::AT_REMOVEDIR)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// In 2100: relatime leaves an atime in the future alone, so reads do not disturb it.
    const ATIME: i64 = 4_102_444_800_123_456_789;
    const MTIME: i64 = 1_000_000_000_987_654_321;

    fn c(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }
    fn times(p: &Path, a: i64, m: i64) {
        let ts = [timespec(a), timespec(m)];
        let r = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c(p).as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(r, 0, "{}", p.display());
    }
    fn xattr(p: &Path, n: &str, v: &[u8]) {
        let n = CString::new(n).unwrap();
        assert_eq!(
            unsafe { libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) },
            0
        );
    }
    fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) {
        assert_eq!(
            unsafe { libc::mknod(c(p).as_ptr(), mode, dev) },
            0,
            "{}",
            p.display()
        );
    }
    fn lchown(p: &Path, uid: u32, gid: u32) {
        assert_eq!(unsafe { libc::lchown(c(p).as_ptr(), uid, gid) }, 0);
    }
    fn root() -> bool {
        unsafe { libc::geteuid() == 0 }
    }
    fn write(p: &Path, data: &[u8], perm: u32) {
        fs::write(p, data).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(perm)).unwrap();
    }

    /// Everything a restore must reproduce, per path; contents read only after every lstat,
    /// since a read can move the atime of another link to the same inode.
    #[derive(Debug, PartialEq)]
    struct Desc(
        EntryKind,
        u32,
        u32,
        u32,
        u64,
        i64,
        i64,
        u64,
        Vec<(OsString, Vec<u8>)>,
        Option<PathBuf>,
        Option<Vec<u8>>,
    );

    fn describe(root: &Path) -> BTreeMap<PathBuf, Desc> {
        let s = DirSource::new(root.into());
        let (mut out, mut stack) = (BTreeMap::new(), vec![PathBuf::new()]);
        while let Some(p) = stack.pop() {
            let m = s.stat(&p).unwrap();
            let mut x = s.xattrs(&p).unwrap();
            x.sort();
            let link = (m.kind == EntryKind::Symlink).then(|| s.read_link(&p).unwrap());
            if m.kind == EntryKind::Dir {
                stack.extend(s.read_dir(&p).unwrap().into_iter().map(|n| p.join(n)));
            }
            let size = if m.kind == EntryKind::Dir { 0 } else { m.size };
            out.insert(
                p,
                Desc(
                    m.kind, m.perm, m.uid, m.gid, size, m.atime_ns, m.mtime_ns, m.rdev, x, link,
                    None,
                ),
            );
        }
        for (p, d) in out.iter_mut() {
            if d.0 == EntryKind::File {
                d.10 = Some(fs::read(root.join(p)).unwrap());
            }
        }
        out
    }

    /// Every path under `root` with its content (or link target), to show nothing changed.
    fn listing(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            let m = fs::symlink_metadata(&p).unwrap();
            let v = if m.is_symlink() {
                fs::read_link(&p).unwrap().into_os_string().into_vec()
            } else if m.is_dir() {
                stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
                vec![]
            } else {
                fs::read(&p).unwrap()
            };
            out.insert(p, v);
        }
        out
    }

    /// Gives every entry under `root` the test times, directories last.
    fn freeze(root: &Path) {
        let mut paths: Vec<_> = listing(root).into_keys().collect();
        paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in paths {
            times(&p, ATIME, MTIME);
        }
    }

    fn tmp_files(root: &Path) -> Vec<PathBuf> {
        listing(root)
            .into_keys()
            .filter(|p| p.to_string_lossy().ends_with(TMP_SUFFIX))
            .collect()
    }

    fn run(src: &dyn Source, rel: &str, dest: &Path, overwrite: bool) -> Result<RestoreStats> {
        restore(
            src,
            Path::new(rel),
            dest,
            &RestoreOptions {
                overwrite,
                ..Default::default()
            },
        )
    }

    #[test]
    fn metadata_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let (s, dest) = (t.path().join("src"), t.path().join("out"));
        fs::create_dir_all(s.join("sticky")).unwrap();
        fs::create_dir(s.join("sub")).unwrap();
        write(&s.join("file"), b"hello", 0o640);
        xattr(&s.join("file"), "user.k", b"v\0binary");
        write(&s.join("suid"), b"#!/bin/sh\n", 0o4755);
        write(&s.join("sticky/inner"), b"in", 0o600);
        write(&s.join("empty"), b"", 0o444);
        fs::hard_link(s.join("file"), s.join("sub/hard")).unwrap();
        symlink("file", s.join("link")).unwrap();
        symlink("../../../outside/nowhere", s.join("dangling")).unwrap();
        mknod(&s.join("fifo"), libc::S_IFIFO | 0o620, 0);
        if root() {
            mknod(&s.join("cdev"), libc::S_IFCHR | 0o600, libc::makedev(1, 3));
            mknod(&s.join("bdev"), libc::S_IFBLK | 0o660, libc::makedev(7, 0));
            lchown(&s.join("suid"), 1234, 5678);
            lchown(&s.join("link"), 42, 43);
            lchown(&s.join("sub"), 7, 8);
            fs::set_permissions(s.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
            // chown cleared it
        }
        for (i, p) in [
            "file",
            "suid",
            "sticky/inner",
            "empty",
            "link",
            "dangling",
            "fifo",
        ]
        .iter()
        .enumerate()
        {
            times(&s.join(p), ATIME + i as i64, MTIME + i as i64);
        }
        fs::set_permissions(s.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::set_permissions(&s, fs::Permissions::from_mode(0o750)).unwrap();
        for d in ["sticky", "sub", ""] {
            times(&s.join(d), ATIME, MTIME - 5);
        }
        let before = describe(&s);
        let stats = run(&DirSource::new(s.clone()), "", &dest, false).unwrap();
        assert_eq!(describe(&dest), before);
        let n = if root() { 2 } else { 0 };
        let want = RestoreStats {
            files: 4,
            dirs: 3,
            symlinks: 2,
            hard_links: 1,
            specials: 1 + n,
            bytes: 17,
            skipped: 0,
        };
        assert_eq!(stats, want);
        let again = run(&DirSource::new(s.clone()), "", &dest, false).unwrap();
        let leaves = want.files + want.symlinks + want.hard_links + want.specials;
        assert_eq!(
            again,
            RestoreStats {
                dirs: 3,
                skipped: leaves,
                ..Default::default()
            }
        );
        assert_eq!(describe(&dest), before);
        let m = |p: &str| fs::symlink_metadata(dest.join(p)).unwrap();
        assert_eq!(m("suid").mode() & 0o7777, 0o4755);
        assert_eq!(m("sticky").mode() & 0o7777, 0o1777);
        assert_eq!(
            (m("file").mtime_nsec(), m("link").atime_nsec()),
            (987_654_321, 123_456_793)
        );
        assert_eq!(
            m("").mtime(),
            (MTIME - 5) / 1_000_000_000,
            "directory times are set after contents"
        );
        assert_eq!(m("file").ino(), m("sub/hard").ino());
        assert_eq!(
            fs::read_link(dest.join("dangling")).unwrap(),
            Path::new("../../../outside/nowhere")
        );
        if root() {
            assert_eq!(
                (m("suid").uid(), m("suid").gid(), m("link").uid()),
                (1234, 5678, 42)
            );
            assert_eq!(m("cdev").rdev(), libc::makedev(1, 3));
        }
    }

    #[test]
    fn holes_stay_sparse() {
        let t = tempfile::tempdir().unwrap();
        let f = File::create(t.path().join("big")).unwrap();
        f.set_len(64 << 20).unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        f.write_all_at(&data, 32 << 20).unwrap();
        let dest = t.path().join("restored");
        let stats = run(&DirSource::new(t.path().into()), "big", &dest, false).unwrap();
        assert_eq!((stats.files, stats.bytes), (1, 64 << 20));
        let m = fs::metadata(&dest).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() * 512 <= 2 << 20,
            "{} bytes allocated",
            m.blocks() * 512
        );
        assert!(fs::read(&dest).unwrap() == fs::read(t.path().join("big")).unwrap());
    }

    /// A DirSource that lists one extra (hostile) name in its root, or whose reader for one
    /// file fails with EIO after some bytes, like a damaged chunk.
    struct Rigged {
        src: DirSource,
        extra: Option<&'static str>,
        /// (file, bytes before the failure, destination path it must not yet appear under)
        fail: Option<(&'static str, usize, PathBuf)>,
        /// The failure is a panic, which unwinds past every cleanup, as a kill would.
        kill: bool,
        /// A path whose stat waits until the failing read has failed and its copy is over
        /// (its temp file gone), so that the walk meets the failure while it queues more.
        hold: Option<&'static str>,
    }
    /// Destination paths of the reads `FailAfter` failed, in every test of this process.
    static FAILED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    struct FailAfter(File, usize, PathBuf, bool);
    impl Read for FailAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1 == 0 {
                let tmp = self.2.with_file_name(tmp_name(self.2.file_name().unwrap()));
                assert!(
                    !self.2.exists() && tmp.exists(),
                    "written under a temp name"
                );
                assert!(!self.3, "killed");
                FAILED.lock().unwrap().push(self.2.clone());
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let k = buf.len().min(self.1);
            let n = self.0.read(&mut buf[..k])?;
            self.1 -= n;
            Ok(n)
        }
    }
    impl Source for Rigged {
        fn stat(&self, rel: &Path) -> io::Result<SourceMeta> {
            if let (Some(h), Some((_, _, watch))) = (self.hold, &self.fail) {
                if rel == Path::new(h) {
                    let tmp = watch.with_file_name(tmp_name(watch.file_name().unwrap()));
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let over = || FAILED.lock().unwrap().contains(watch) && !tmp.exists();
                    while !over() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    std::thread::sleep(Duration::from_millis(50)); // the report's send
                }
            }
            self.src.stat(rel)
        }
        fn read_dir(&self, rel: &Path) -> io::Result<Vec<OsString>> {
            let mut v = self.src.read_dir(rel)?;
            if let (Some(x), true) = (self.extra, rel.as_os_str().is_empty()) {
                v.push(OsString::from_vec(x.as_bytes().to_vec()));
            }
            Ok(v)
        }
        fn read_link(&self, rel: &Path) -> io::Result<PathBuf> {
            self.src.read_link(rel)
        }
        fn open(&self, rel: &Path) -> io::Result<Box<dyn Read + Send + '_>> {
            match &self.fail {
                Some((f, n, watch)) if rel == Path::new(f) => {
                    let file = File::open(self.src.path(rel))?;
                    Ok(Box::new(FailAfter(file, *n, watch.clone(), self.kill)))
                }
                _ => self.src.open(rel),
            }
        }
        fn xattrs(&self, rel: &Path) -> io::Result<Vec<(OsString, Vec<u8>)>> {
            self.src.xattrs(rel)
        }
    }

    #[test]
    fn hostile_names_write_nothing() {
        let t = tempfile::tempdir().unwrap();
        let (s, dest, outside) = (
            t.path().join("src"),
            t.path().join("out"),
            t.path().join("outside"),
        );
        fs::create_dir_all(s.join("a")).unwrap();
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(s.join("a/b"), b"payload").unwrap();
        fs::write(t.path().join("x"), b"original").unwrap(); // what "../x" would reach
        fs::write(s.join("x"), b"payload").unwrap();
        symlink(&outside, dest.join("a")).unwrap(); // what "a/b" would traverse
        let before = listing(t.path());
        for name in ["../x", "a/b", "..", ".", "", "n\0ul"] {
            let err = run(
                &Rigged {
                    src: DirSource::new(s.clone()),
                    extra: Some(name),
                    fail: None,
                    kill: false,
                    hold: None,
                },
                "",
                &dest,
                true,
            )
            .unwrap_err();
            assert!(
                matches!(&err, RestoreError::InvalidName { name: n, .. } if n.as_bytes() == name.as_bytes()),
                "{err}"
            );
            assert!(
                err.to_string()
                    .starts_with("/ in the snapshot holds an entry named"),
                "{err}"
            );
            assert_eq!(listing(t.path()), before, "{name:?}");
        }
        let err = run(&DirSource::new(s), "../x", &dest, true).unwrap_err();
        assert!(matches!(err, RestoreError::InvalidPath { .. }), "{err}");
        assert_eq!(listing(t.path()), before);
    }

    #[test]
    fn symlinks_in_dest_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let (s, dest, outside) = (
            t.path().join("src"),
            t.path().join("out"),
            t.path().join("outside"),
        );
        fs::create_dir_all(s.join("sub")).unwrap();
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(s.join("sub/f"), b"new").unwrap();
        fs::write(s.join("file"), b"new").unwrap();
        fs::write(outside.join("secret"), b"secret").unwrap();
        fs::write(outside.join("t2"), b"t2").unwrap();
        symlink(&outside, dest.join("sub")).unwrap();
        symlink(outside.join("secret"), dest.join("file")).unwrap();
        symlink(outside.join("t2"), dest.join(tmp_name(OsStr::new("file")))).unwrap();
        let before = listing(&outside);
        let err = run(&DirSource::new(s.clone()), "", &dest, false).unwrap_err();
        assert!(matches!(err, RestoreError::Exists { .. }), "{err}");
        assert_eq!(listing(&outside), before);
        run(&DirSource::new(s.clone()), "", &dest, true).unwrap();
        assert_eq!(listing(&outside), before);
        assert!(fs::symlink_metadata(dest.join("sub")).unwrap().is_dir());
        assert_eq!(fs::read(dest.join("sub/f")).unwrap(), b"new");
        assert!(fs::symlink_metadata(dest.join("file")).unwrap().is_file());
        assert!(tmp_files(&dest).is_empty());
        // DEST itself a symlink: replaced only with --overwrite.
        let dest2 = t.path().join("out2");
        symlink(&outside, &dest2).unwrap();
        assert!(matches!(
            run(&DirSource::new(s.clone()), "", &dest2, false),
            Err(RestoreError::Exists { .. })
        ));
        run(&DirSource::new(s), "", &dest2, true).unwrap();
        assert_eq!(listing(&outside), before);
    }

    #[test]
    fn interrupted_restore_finishes_on_rerun() {
        let t = tempfile::tempdir().unwrap();
        let (s, dest) = (t.path().join("src"), t.path().join("out"));
        for d in ["d", "m", "z"] {
            fs::create_dir_all(s.join(d)).unwrap();
        }
        let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
        fs::write(s.join("a"), &big[..100_000]).unwrap();
        fs::write(s.join("d/f"), b"d").unwrap();
        fs::write(s.join("m/big"), &big).unwrap();
        fs::write(s.join("z/f"), b"z").unwrap();
        symlink("a", s.join("l")).unwrap();
        freeze(&s);
        let fail = Some(("m/big", 3 << 19, dest.join("m/big")));
        let err = run(
            &Rigged {
                src: DirSource::new(s.clone()),
                extra: None,
                fail,
                kill: false,
                hold: None,
            },
            "",
            &dest,
            false,
        )
        .unwrap_err();
        assert!(
            matches!(&err, RestoreError::Read { path, source } if path == Path::new("/m/big") && source.raw_os_error() == Some(libc::EIO))
        );
        assert!(
            err.to_string()
                .starts_with("reading /m/big from the snapshot: Input/output error"),
            "{err}"
        );
        assert!(!dest.join("m/big").exists() && tmp_files(&dest).is_empty());
        assert_eq!(fs::read(dest.join("a")).unwrap(), &big[..100_000]);
        fs::write(
            dest.join("m").join(tmp_name(OsStr::new("big"))),
            b"left by a killed run",
        )
        .unwrap();

        let stats = run(&DirSource::new(s.clone()), "", &dest, false).unwrap();
        assert_eq!((stats.files, stats.skipped), (2, 3), "{stats:?}"); // a, d/f and l were there
        assert_eq!(describe(&dest), describe(&s));
        assert!(tmp_files(&dest).is_empty());
        let again = run(&DirSource::new(s), "", &dest, false).unwrap();
        assert_eq!(
            (again.files, again.symlinks, again.bytes, again.skipped),
            (0, 0, 0, 5)
        );
    }

    /// A copier's failure among many small files: met by the flush that ends its batch
    /// (f05 is a batch's 7th leaf, after d2's metadata), or while the walk queues more (f01,
    /// the walk held at f04 until the copy is over). The restore reports it, leaves no temp
    /// file and none of the failed file, keeps the files that completed, leaves the batch's
    /// directories 0700, and a rerun finishes the tree.
    #[test]
    fn a_failed_copy_among_parallel_copies_is_reported_and_the_rest_kept() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("src");
        for d in 0..6 {
            fs::create_dir_all(s.join(format!("d{d}"))).unwrap();
            fs::set_permissions(s.join(format!("d{d}")), fs::Permissions::from_mode(0o755))
                .unwrap();
            for f in 0..12 {
                let body = format!("{d}/{f}").repeat(200 + 10 * f);
                fs::write(s.join(format!("d{d}/f{f:02}")), body).unwrap();
            }
        }
        freeze(&s);
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        for (case, (failing, hold)) in [("d3/f05", None), ("d3/f01", Some("d3/f04"))]
            .into_iter()
            .enumerate()
        {
            assert!(fs::metadata(s.join(failing)).unwrap().len() <= PARALLEL_MAX);
            let dest = t.path().join(format!("out{case}"));
            let err = run(
                &Rigged {
                    src: DirSource::new(s.clone()),
                    extra: None,
                    fail: Some((failing, 100, dest.join(failing))),
                    kill: false,
                    hold,
                },
                "",
                &dest,
                false,
            )
            .unwrap_err();
            let want = Path::new("/").join(failing);
            assert!(
                matches!(&err, RestoreError::Read { path, source } if *path == want && source.raw_os_error() == Some(libc::EIO)),
                "{err}"
            );
            assert!(!dest.join(failing).exists(), "{failing}");
            assert_eq!(tmp_files(&dest), Vec::<PathBuf>::new(), "{failing}");
            for f in 0..12 {
                let (got, want) = (
                    dest.join(format!("d0/f{f:02}")),
                    s.join(format!("d0/f{f:02}")),
                );
                assert_eq!(fs::read(got).unwrap(), fs::read(want).unwrap());
            }
            assert_eq!(mode(dest.join("d0")), 0o755);
            assert_eq!(mode(dest.join("d3")), 0o700);
            if case == 0 {
                assert_eq!(
                    mode(dest.join("d2")),
                    0o700,
                    "d2's metadata was in the batch"
                );
            }
            let stats = run(&DirSource::new(s.clone()), "", &dest, false).unwrap();
            assert!(stats.files >= 1 && stats.skipped >= 36, "{stats:?}");
            assert_eq!(stats.files + stats.skipped, 72, "{stats:?}");
            assert_eq!(describe(&dest), describe(&s));
            assert!(tmp_files(&dest).is_empty());
        }
    }

    /// A tree of many batches (7 leaves or 3 directories each under test): hard links within
    /// one batch and across batches, names that meet a sibling's temp name, a sparse file;
    /// then a run killed mid-batch, which leaves temp files, and the rerun that finishes it.
    #[test]
    fn batches_keep_links_and_names_and_finish_after_a_kill() {
        let t = tempfile::tempdir().unwrap();
        let (s, dest) = (t.path().join("src"), t.path().join("out"));
        for d in ["d0/e", "d1", "d2", "d3"] {
            fs::create_dir_all(s.join(d)).unwrap();
        }
        let mut files = Vec::new();
        for d in ["", "d0", "d0/e", "d1", "d2", "d3"] {
            for i in 0..9 {
                let p = s.join(d).join(format!("f{i}"));
                write(&p, &vec![i as u8 + 1; i * 1000], 0o640 + (i as u32 % 8));
                files.push(p);
            }
        }
        fs::hard_link(s.join("d0/f1"), s.join("d3/across")).unwrap();
        fs::hard_link(s.join("d1/f7"), s.join("d1/f9")).unwrap(); // likely one batch
        fs::hard_link(s.join("d2/f8"), s.join("d2/f9")).unwrap();
        write(&s.join("x"), b"x", 0o600);
        write(&s.join(tmp_name(OsStr::new("x"))), b"not a temp", 0o600);
        write(&s.join("y"), b"y", 0o600);
        fs::create_dir(s.join(tmp_name(OsStr::new("y")))).unwrap();
        // Both temp names are cut to the same 255 bytes.
        let long = "L".repeat(TMP_KEEP);
        write(&s.join(&long), b"short", 0o600);
        write(&s.join(format!("{long}-longer")), b"longer", 0o600);
        assert_eq!(
            tmp_name(OsStr::new(&long)),
            tmp_name(OsStr::new(&format!("{long}-longer")))
        );
        symlink("f1", s.join("d2/link")).unwrap();
        let f = File::create(s.join("d2/sparse")).unwrap();
        f.set_len(4 * HOLE_BLOCK as u64).unwrap();
        f.write_all_at(b"middle", HOLE_BLOCK as u64 + 5).unwrap();
        freeze(&s);
        let src = DirSource::new(s.clone());
        // Temp files, not counting the two source entries named like them.
        let temps = |root: &Path| -> Vec<PathBuf> {
            let of_source = |p: &PathBuf| s.join(p.strip_prefix(root).unwrap()).exists();
            tmp_files(root)
                .into_iter()
                .filter(|p| !of_source(p))
                .collect()
        };

        let whole = t.path().join("whole");
        let stats = run(&src, "", &whole, false).unwrap();
        assert_eq!(describe(&whole), describe(&s));
        assert!(temps(&whole).is_empty());
        let ino = |p: &str| fs::symlink_metadata(whole.join(p)).unwrap().ino();
        assert_eq!(ino("d0/f1"), ino("d3/across"));
        assert_eq!(ino("d1/f7"), ino("d1/f9"));
        assert_eq!(ino("d2/f8"), ino("d2/f9"));
        assert_eq!(
            (stats.files, stats.hard_links, stats.symlinks, stats.dirs),
            (files.len() as u64 + 6, 3, 1, 7)
        );
        let sparse = fs::metadata(whole.join("d2/sparse")).unwrap();
        assert!(sparse.blocks() * 512 <= 2 * HOLE_BLOCK as u64, "{sparse:?}");

        let kill = Rigged {
            src: DirSource::new(s.clone()),
            extra: None,
            fail: Some(("d2/f8", 10, dest.join("d2/f8"))),
            kill: true,
            hold: None,
        };
        let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&kill, "", &dest, false)
        }));
        assert!(killed.is_err());
        let left = temps(&dest);
        assert!(left.len() > 1, "{left:?}");
        for tmp in &left {
            let name = tmp.file_name().unwrap().as_bytes();
            let name = OsStr::from_bytes(&name[1..name.len() - TMP_SUFFIX.len()]);
            assert!(!tmp.with_file_name(name).exists(), "{}", tmp.display());
        }
        fs::write(&left[0], b"torn").unwrap();
        let done = fs::read_dir(&dest).unwrap().count() as u64;

        let rerun = run(&src, "", &dest, false).unwrap();
        assert_eq!(describe(&dest), describe(&s));
        assert!(temps(&dest).is_empty());
        assert!(
            rerun.skipped > 0 && rerun.files > 0,
            "{rerun:?} after {done} entries"
        );
        let again = run(&src, "", &dest, false).unwrap();
        assert_eq!((again.files, again.bytes), (0, 0));
    }

    #[test]
    fn differing_entries_need_overwrite() {
        let t = tempfile::tempdir().unwrap();
        let (s, dest) = (t.path().join("src"), t.path().join("out"));
        fs::create_dir_all(s.join("d")).unwrap();
        fs::write(s.join("f"), b"snapshot").unwrap();
        fs::write(s.join("g"), b"snapshot").unwrap();
        fs::create_dir_all(dest.join("g/deep")).unwrap();
        fs::write(dest.join("f"), b"local").unwrap();
        fs::write(dest.join("d"), b"a file where a dir goes").unwrap();
        freeze(&s);
        for _ in 0..2 {
            let err = run(&DirSource::new(s.clone()), "", &dest, false).unwrap_err();
            assert!(matches!(err, RestoreError::Exists { .. }), "{err}");
            fs::write(dest.join("f"), b"local").unwrap_or(());
        }
        assert_eq!(fs::read(dest.join("f")).unwrap(), b"local");
        run(&DirSource::new(s.clone()), "", &dest, true).unwrap();
        assert_eq!(describe(&dest), describe(&s));
    }

    #[test]
    fn single_file_goes_into_a_dir_or_to_a_path() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("src");
        fs::create_dir_all(s.join("d")).unwrap();
        fs::write(s.join("d/f"), b"one").unwrap();
        let into = t.path().join("into");
        fs::create_dir(&into).unwrap();
        assert_eq!(
            run(&DirSource::new(s.clone()), "/d/f", &into, false)
                .unwrap()
                .files,
            1
        );
        assert_eq!(fs::read(into.join("f")).unwrap(), b"one");
        run(
            &DirSource::new(s.clone()),
            "d/f",
            &t.path().join("renamed"),
            false,
        )
        .unwrap();
        assert_eq!(fs::read(t.path().join("renamed")).unwrap(), b"one");
        let err = run(&DirSource::new(s), "d/nope", &into, false).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("reading /d/nope from the snapshot: No such file"),
            "{err}"
        );
    }

    #[test]
    fn progress_counts_hard_links_once() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("a"), vec![1u8; 3000]).unwrap();
        fs::hard_link(t.path().join("a"), t.path().join("b")).unwrap();
        fs::write(t.path().join("c"), vec![1u8; 500]).unwrap();
        let src = DirSource::new(t.path().into());
        assert_eq!(total_bytes(&src, Path::new("")).unwrap(), 3500);
        let opts = RestoreOptions {
            progress: true,
            ..Default::default()
        };
        let stats = restore(&src, Path::new(""), &t.path().join("out"), &opts).unwrap();
        assert_eq!((stats.files, stats.hard_links, stats.bytes), (2, 1, 3500));
        let line = progress_line(3 << 20, 12 << 20, 1234, Duration::from_secs(1));
        assert_eq!(
            line,
            "3.0 MiB / 12.0 MiB (25%), 1,234 files, 3.0 MiB/s, ETA 0:00:03"
        );
    }

    #[test]
    fn summary_reads_well() {
        let stats = RestoreStats {
            files: 1234,
            dirs: 56,
            symlinks: 3,
            hard_links: 2,
            specials: 0,
            bytes: 1_288_490_189,
            skipped: 10,
        };
        assert_eq!(
            summary(&stats, Duration::from_millis(3400)),
            "restored 1,234 files, 56 dirs, 3 symlinks, 2 hard links: 1.2 GiB in 3.4 s (361 MiB/s); 10 already there"
        );
        let one = RestoreStats {
            files: 1,
            specials: 1,
            bytes: 5,
            ..Default::default()
        };
        assert_eq!(summary(&one, Duration::ZERO), "restored 1 file, 0 dirs, 0 symlinks, 0 hard links, 1 special file: 5 B in 0.0 s (0 B/s)");
    }
}
