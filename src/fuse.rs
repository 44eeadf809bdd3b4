//! The FUSE adapter: the only module that names `fuser`.
//!
//! Each method decodes the request, calls one namespace function and replies once. There
//! is no filesystem logic here that a test could not reach through the namespace.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::format::Kind;
use crate::ids::InodeNo;
use crate::namespace::{Attr, Caller, DirEntry, FsError, Invalidation, Namespace, SetAttr};

/// How long the kernel may cache the mount root and its entries (the containers). Short,
/// because the control socket creates and deletes containers behind the kernel's back.
const ROOT_TTL: Duration = Duration::from_secs(1);

/// How long the kernel may cache entries and attributes inside containers. Every change
/// there goes through this mount, so the kernel's copy stays true; a long TTL spares a
/// lookup round trip per path component (measured: unlink of 10,000 files 1.5x faster).
const TTL: Duration = Duration::from_secs(10);

/// The TTL for an inode: short for the mount root and container roots.
fn ttl(a: &Attr) -> &'static Duration {
    if a.ino == InodeNo::ROOT
        || a.rec.parent == InodeNo::ROOT
        || Namespace::changes_outside_mount(a.ino)
        || Namespace::changes_outside_mount(a.rec.parent)
    {
        &ROOT_TTL
    } else {
        &TTL
    }
}

/// Largest write the kernel sends in one request; larger requests mean fewer round trips.
const MAX_WRITE: u32 = 1 << 20;

/// Keep the kernel's page cache of a file across opens: every change to file data goes
/// through this mount, so cached pages stay true, and warm re-reads never reach the daemon.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;

/// A read-only open also asks the kernel not to send FLUSH at close: there is nothing for
/// it to report (a flush reports failed background commits of writes), and the round trip
/// is one of the four a reader of many small files pays per file (open, read, flush,
/// release; the release does not make the closer wait). Kernels before 5.16 ignore it.
const READ_ONLY_OPEN_FLAGS: FopenFlags = OPEN_FLAGS.union(FopenFlags::FOPEN_NOFLUSH);

/// Mount options, parsed from `-o` strings.
pub struct MountOptions {
    config: fuser::Config,
}

impl MountOptions {
    /// Parses comma-separated `-o` options. `default_permissions` is always on: the kernel
    /// checks permissions against modes.
    pub fn parse(store: &Path, options: &[String]) -> Result<MountOptions, String> {
        Self::parse_named(format!("dedupfs:{}", store.display()), options)
    }

    /// Options of a snapshot mount that the store's running daemon serves beside its main
    /// mount: read-only, and named so that `dedupfs umount` does not wait for the daemon to
    /// release the store.
    pub fn parse_snapshot(store: &Path, options: &[String]) -> Result<MountOptions, String> {
        let mut o = Self::parse_named(format!("dedupfs-snapshot:{}", store.display()), options)?;
        o.config.mount_options.push(fuser::MountOption::RO);
        Ok(o)
    }

    /// Adds `ro`.
    pub fn read_only(mut self) -> MountOptions {
        self.config.mount_options.push(fuser::MountOption::RO);
        self
    }

    fn parse_named(fsname: String, options: &[String]) -> Result<MountOptions, String> {
        use fuser::MountOption as M;
        let mut config = fuser::Config::default();
        let mut opts = vec![
            M::FSName(fsname),
            M::Subtype("dedupfs".into()),
            M::DefaultPermissions,
        ];
        for opt in options.iter().flat_map(|o| o.split(',')) {
            match opt.trim() {
                "" | "default_permissions" | "rw" => {}
                "allow_other" => config.acl = fuser::SessionACL::All,
                "allow_root" => config.acl = fuser::SessionACL::RootAndOwner,
                "ro" => opts.push(M::RO),
                "auto_unmount" => opts.push(M::AutoUnmount),
                "exec" => opts.push(M::Exec),
                "noexec" => opts.push(M::NoExec),
                "suid" => opts.push(M::Suid),
                "nosuid" => opts.push(M::NoSuid),
                "dev" => opts.push(M::Dev),
                "nodev" => opts.push(M::NoDev),
                "atime" => opts.push(M::Atime),
                "noatime" => opts.push(M::NoAtime),
                "sync" => opts.push(M::Sync),
                "async" => opts.push(M::Async),
                "dirsync" => opts.push(M::DirSync),
                other => {
                    return Err(format!(
                        "unknown mount option {other:?} (known: allow_other, allow_root, \
                         default_permissions, ro, rw, auto_unmount, exec, noexec, suid, nosuid, \
                         dev, nodev, atime, noatime, sync, async, dirsync)"
                    ))
                }
            }
        }
        config.mount_options = opts;
        // Several request threads, so a slow read of one file does not stall a stat of
        // another.
        config.n_threads = Some(4);
        config.clone_fd = true;
        Ok(MountOptions { config })
    }
}

/// A mounted FUSE session, not yet serving.
pub struct FuseSession {
    session: fuser::Session<DedupFs>,
}

/// Unmounts a session from another thread (a signal handler).
pub struct Unmounter(fuser::SessionUnmounter);

impl Unmounter {
    pub fn unmount(&mut self) -> std::io::Result<()> {
        self.0.unmount()
    }
}

impl FuseSession {
    /// Mounts the namespace with `root` as the mount's root directory: the mount root
    /// (`InodeNo::ROOT`), or a snapshot's root for a restore mount.
    pub fn mount(
        ns: Arc<Namespace>,
        mountpoint: &Path,
        options: &MountOptions,
        root: InodeNo,
    ) -> std::io::Result<FuseSession> {
        let fs = DedupFs::new(ns.clone(), root);
        let stale_attrs = fs.stale_attrs.clone();
        let session = fuser::Session::new(fs, mountpoint, &options.config)?;
        let (sender, receiver) = std::sync::mpsc::channel::<INodeNo>();
        let notifier = session.notifier();
        // One thread for the session: a notification sent from inside a request on the same
        // inode may wait on that request. It ends when the filesystem (the sender) is dropped.
        std::thread::Builder::new()
            .name("inval-attr".into())
            .spawn(move || {
                for i in receiver {
                    let _ = notifier.inval_inode(i, -1, 0);
                }
            })?;
        let _ = stale_attrs.set(sender);
        if root == InodeNo::ROOT {
            // A rollback changes files under the kernel's caches: drop what it touched. Node
            // ids are inode numbers in the main mount.
            let notifier = session.notifier();
            ns.set_invalidator(Box::new(move |items: &[Invalidation]| {
                for item in items {
                    let _ = match item {
                        Invalidation::Inode(ino) => notifier.inval_inode(INodeNo(ino.0), 0, -1),
                        Invalidation::Entry(parent, name) => {
                            notifier.inval_entry(INodeNo(parent.0), OsStr::from_bytes(name))
                        }
                    };
                }
            }));
        }
        Ok(FuseSession { session })
    }

    pub fn unmounter(&mut self) -> Unmounter {
        Unmounter(self.session.unmount_callable())
    }

    /// Serves requests until the filesystem is unmounted.
    pub fn run(self) -> std::io::Result<()> {
        self.session.run()
    }
}

pub struct DedupFs {
    ns: Arc<Namespace>,
    /// Node ids whose cached attributes the kernel must drop: the namespace changed them
    /// without a setattr the kernel would see. Served by a thread the mount starts.
    stale_attrs: Arc<std::sync::OnceLock<std::sync::mpsc::Sender<INodeNo>>>,
    /// Listings of open directories, by handle: a readdir offset is an index into one, so
    /// a listing resumes in O(1) however large the directory.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    /// The namespace inode the kernel sees as the mount's root (node 1): the mount root,
    /// or a snapshot's root for a restore mount.
    root: InodeNo,
    /// A restore mount: nothing in it changes, so files need no open state (see `open`).
    restore_mount: bool,
    /// A restore mount on a kernel that takes ENOSYS for OPEN as "no open needed" (4.19 on,
    /// FUSE_NO_OPEN_SUPPORT); set at INIT.
    no_open: bool,
}

impl DedupFs {
    pub fn new(ns: Arc<Namespace>, root: InodeNo) -> DedupFs {
        DedupFs {
            ns,
            root,
            restore_mount: root != InodeNo::ROOT,
            no_open: false,
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            stale_attrs: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// The namespace inode of a kernel node id.
    fn ino(&self, i: INodeNo) -> InodeNo {
        if i.0 == 1 {
            self.root
        } else {
            InodeNo(i.0)
        }
    }

    /// The kernel node id of a namespace inode.
    fn fuse_ino(&self, ino: InodeNo) -> INodeNo {
        if ino == self.root {
            INodeNo(1)
        } else {
            INodeNo(ino.0)
        }
    }

    /// Drops the kernel's cached attributes of `ino` after a reply: an ACL xattr changes
    /// the mode without a setattr the kernel would see.
    fn invalidate_attr_later(&self, i: INodeNo) {
        if let Some(stale) = self.stale_attrs.get() {
            let _ = stale.send(i);
        }
    }
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// A time from a request, in ns. fuser 0.18 decodes a kernel time before 1970, (s < 0, n),
/// as -(|s| + n) rather than s + n (its `system_time_from_time` has a TODO for it), so
/// whole seconds and nanoseconds are taken apart again here.
fn time_ns(t: SystemTime) -> i64 {
    const NS: i128 = 1_000_000_000;
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => {
            let before = e.duration().as_nanos() as i128;
            (-(before / NS) * NS + before % NS) as i64
        }
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(ino: INodeNo, a: &Attr) -> FileAttr {
    let r = &a.rec;
    FileAttr {
        ino,
        size: r.size,
        blocks: a.blocks(),
        atime: time(r.atime),
        mtime: time(r.mtime),
        ctime: time(r.ctime),
        crtime: time(r.crtime),
        kind: file_type(r.kind),
        perm: r.perm,
        nlink: r.nlink,
        uid: r.uid,
        gid: r.gid,
        rdev: r.rdev,
        blksize: 65536,
        flags: 0,
    }
}

/// The attributes of a cached "no such name" entry: node id 0, the rest unused.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn opt_time(t: Option<TimeOrNow>) -> Option<Option<i64>> {
    t.map(|t| match t {
        TimeOrNow::Now => None,
        TimeOrNow::SpecificTime(st) => Some(time_ns(st)),
    })
}

impl DedupFs {
    fn reply_entry(&self, result: Result<Attr, FsError>, reply: ReplyEntry) {
        match result {
            Ok(a) => reply.entry(
                ttl(&a),
                &file_attr(self.fuse_ino(a.ino), &a),
                Generation(a.rec.generation),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn reply_empty(result: Result<(), FsError>, reply: ReplyEmpty) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn reply_xattr(result: Result<Vec<u8>, FsError>, size: u32, reply: ReplyXattr) {
        match result {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Adds one READDIRPLUS entry with its attributes; true when the reply is full.
    fn add_plus(
        &self,
        reply: &mut ReplyDirectoryPlus,
        offset: u64,
        name: &OsStr,
        a: &Attr,
    ) -> bool {
        let ino = self.fuse_ino(a.ino);
        reply.add(
            ino,
            offset,
            name,
            ttl(a),
            &file_attr(ino, a),
            Generation(a.rec.generation),
        )
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }
}

impl Filesystem for DedupFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        // Kernels without it keep sending READDIR and LOOKUP.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // Older kernels fail the open(2) itself on ENOSYS.
        self.no_open = self.restore_mount
            && config
                .capabilities()
                .contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.ns.lookup(self.ino(parent), name.as_bytes()) {
            // Inside a container a missing name can be cached as a negative entry (node id
            // 0): only this mount creates names there, and the kernel drops the negative
            // entry when it does. Not at the root, where containers come and go through
            // the control socket.
            Err(FsError::NotFound) if !Namespace::changes_outside_mount(self.ino(parent)) => {
                reply.entry(&TTL, &negative_entry(), Generation(0));
            }
            result => self.reply_entry(result, reply),
        }
    }

    fn getattr(&self, _req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ns.getattr(self.ino(i)) {
            Ok(a) => reply.attr(ttl(&a), &file_attr(self.fuse_ino(a.ino), &a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        i: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: opt_time(atime),
            mtime: opt_time(mtime),
        };
        // A handle comes only with a truncate through an open file (ftruncate, O_TRUNC):
        // the kernel checked the descriptor's access mode, which stands even when the
        // file's mode no longer grants write (a file created 0444 with O_WRONLY).
        let who = match fh {
            Some(_) if mode.is_none() && uid.is_none() && gid.is_none() => Caller::ROOT,
            _ => caller(req),
        };
        match self.ns.setattr(self.ino(i), &set, who) {
            Ok(a) => reply.attr(ttl(&a), &file_attr(self.fuse_ino(a.ino), &a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, i: INodeNo, reply: ReplyData) {
        match self.ns.readlink(self.ino(i)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = Kind::from_mode(mode) else {
            reply.error(Errno::EINVAL);
            return;
        };
        if kind == Kind::Dir || kind == Kind::Symlink {
            reply.error(Errno::EINVAL);
            return;
        }
        let perm = (mode & !umask & 0o7777) as u16;
        self.reply_entry(
            self.ns.make_node(
                self.ino(parent),
                name.as_bytes(),
                kind,
                perm,
                rdev,
                b"",
                caller(req),
            ),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        self.reply_entry(
            self.ns.make_node(
                self.ino(parent),
                name.as_bytes(),
                Kind::Dir,
                perm,
                0,
                b"",
                caller(req),
            ),
            reply,
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::reply_empty(
            self.ns
                .unlink(self.ino(parent), name.as_bytes(), caller(req)),
            reply,
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::reply_empty(
            self.ns
                .rmdir(self.ino(parent), name.as_bytes(), caller(req)),
            reply,
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.reply_entry(
            self.ns.make_node(
                self.ino(parent),
                link_name.as_bytes(),
                Kind::Symlink,
                0o777,
                0,
                target.as_os_str().as_bytes(),
                caller(req),
            ),
            reply,
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        Self::reply_empty(
            self.ns.rename(
                self.ino(parent),
                name.as_bytes(),
                self.ino(newparent),
                newname.as_bytes(),
                flags.contains(RenameFlags::RENAME_NOREPLACE),
                flags.contains(RenameFlags::RENAME_EXCHANGE),
                caller(req),
            ),
            reply,
        );
    }

    fn link(
        &self,
        req: &Request,
        i: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.reply_entry(
            self.ns.link(
                self.ino(i),
                self.ino(newparent),
                newname.as_bytes(),
                caller(req),
            ),
            reply,
        );
    }

    fn open(&self, _req: &Request, i: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            // A restore mount is read-only and its files never change: reads need no open
            // state (see `Namespace::snap_file`). ENOSYS tells the kernel to take this and
            // every later open as done, with the page cache kept (FOPEN_KEEP_CACHE), and to
            // send no RELEASE: of the three round trips a reader pays per small file (open,
            // read, release), only the read is left. The kernel refuses writes on the
            // read-only mount itself.
            reply.error(Errno::ENOSYS);
            return;
        }
        let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        if writing && crate::namespace::is_snapshot_ino(self.ino(i)) {
            reply.error(errno(FsError::ReadOnly));
            return;
        }
        let open_flags = if writing {
            OPEN_FLAGS
        } else {
            READ_ONLY_OPEN_FLAGS
        };
        match self.ns.open(self.ino(i)) {
            Ok(_) => reply.opened(FileHandle(self.new_fh()), open_flags),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.ns.read(self.ino(i), offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.ns.write(self.ino(i), offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.restore_mount {
            // Nothing to report on a read-only mount; ENOSYS: the kernel sends no more.
            reply.error(Errno::ENOSYS);
            return;
        }
        Self::reply_empty(self.ns.flush_on_close(self.ino(i)), reply);
    }

    fn release(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        Self::reply_empty(self.ns.release(self.ino(i)), reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::reply_empty(self.ns.fsync(self.ino(i)), reply);
    }

    /// fallocate(2): PUNCH_HOLE (with KEEP_SIZE, which the kernel insists on) and ZERO_RANGE
    /// make the range a hole, which reads as zeros and holds no chunk; ZERO_RANGE without
    /// KEEP_SIZE also extends the size. Reserving space (mode 0, KEEP_SIZE alone) means
    /// nothing in a deduplicating store and stays EOPNOTSUPP, which glibc's posix_fallocate
    /// answers by writing; so do COLLAPSE, INSERT and UNSHARE.
    fn fallocate(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO_KEEP: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let ino = self.ino(i);
        let result = match mode {
            PUNCH | ZERO_KEEP => self.ns.punch_hole(ino, offset, length),
            libc::FALLOC_FL_ZERO_RANGE => self.ns.zero_range(ino, offset, length, true),
            _ => {
                reply.error(Errno::EOPNOTSUPP);
                return;
            }
        };
        Self::reply_empty(result, reply);
    }

    /// copy_file_range(2): by reference where the shape allows, so `cp` of a file in the
    /// mount (or out of a snapshot into a container) stores nothing and reads nothing (see
    /// `Namespace::copy_by_reference`); otherwise EOPNOTSUPP, and the kernel copies the bytes
    /// itself (ENOSYS would stop it asking for good).
    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The reply counts bytes in 32 bits.
        let max = len.min(u64::from(u32::MAX));
        let (src, dst) = (self.ino(ino_in), self.ino(ino_out));
        match self
            .ns
            .copy_by_reference(src, dst, offset_in, offset_out, max)
        {
            Ok(Some(n)) => reply.written(n as u32),
            Ok(None) => reply.error(Errno::EOPNOTSUPP),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// SEEK_DATA and SEEK_HOLE; the kernel answers SEEK_SET, SEEK_CUR and SEEK_END itself.
    /// Tools that copy sparse files (cp, tar, qemu-img) skip holes by them.
    fn lseek(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let hole = match whence {
            libc::SEEK_DATA => false,
            libc::SEEK_HOLE => true,
            _ => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        // A negative offset is past every byte, as the kernel's own lseek treats it.
        let Ok(offset) = u64::try_from(offset) else {
            reply.error(Errno::ENXIO);
            return;
        };
        match self.ns.seek(self.ino(i), offset, hole) {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.ns.readdir(self.ino(i)) {
            Ok(entries) => {
                let fh = self.new_fh();
                self.dirs.lock().insert(fh, Arc::new(entries));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        i: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.dirs.lock().get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        // Offsets: 1 is ".", 2 is "..", 3 + n is entries[n]; each entry carries the offset
        // of the one after it.
        let mut next = offset;
        if next == 0 {
            if reply.add(i, 1, FileType::Directory, ".") {
                reply.ok();
                return;
            }
            next = 1;
        }
        if next == 1 {
            let parent = self
                .ns
                .getattr(self.ino(i))
                .map(|a| a.rec.parent.0)
                .ok()
                .filter(|p| *p != 0 && i.0 != 1)
                .unwrap_or(i.0);
            if reply.add(INodeNo(parent), 2, FileType::Directory, "..") {
                reply.ok();
                return;
            }
            next = 2;
        }
        let start = (next - 2) as usize;
        for (n, e) in entries.iter().enumerate().skip(start) {
            if reply.add(
                self.fuse_ino(e.ino),
                n as u64 + 3,
                file_type(e.kind),
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    /// READDIR and LOOKUP in one: each entry comes with its attributes, so the kernel has
    /// the dentries and attributes when a reader opens or stats the files it listed (find
    /// and cat, rsync, ls -l) and sends no LOOKUP for each. The kernel asks for it when it
    /// pays (FUSE_READDIRPLUS_AUTO: the first batch of a directory, and later ones after
    /// lookups in it); plain listings stay plain.
    fn readdirplus(
        &self,
        _req: &Request,
        i: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.dirs.lock().get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        // A directory removed while open lists as empty, as with plain READDIR.
        let Ok(dir) = self.ns.getattr(self.ino(i)) else {
            reply.ok();
            return;
        };
        // "." and ".." (offsets 1 and 2) carry attributes too, though the kernel makes no
        // dentries of them.
        let mut next = offset;
        while next < 2 {
            let (name, a) = if next == 0 {
                (".", dir.clone())
            } else {
                let parent = (dir.rec.parent.0 != 0 && i.0 != 1)
                    .then(|| self.ns.getattr(dir.rec.parent).ok())
                    .flatten();
                ("..", parent.unwrap_or_else(|| dir.clone()))
            };
            if self.add_plus(&mut reply, next + 1, OsStr::new(name), &a) {
                reply.ok();
                return;
            }
            next += 1;
        }
        let start = (next - 2) as usize;
        for (n, e) in entries.iter().enumerate().skip(start) {
            // The names were listed at opendir; the kernel makes dentries of what this
            // returns, so each name is looked up again: a name removed since is left out,
            // and a name renamed over since gets what it names now.
            let Ok(a) = self.ns.lookup(self.ino(i), &e.name) else {
                continue;
            };
            if self.add_plus(&mut reply, n as u64 + 3, OsStr::from_bytes(&e.name), &a) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::reply_empty(self.ns.sync_all(), reply);
    }

    fn statfs(&self, _req: &Request, _i: INodeNo, reply: ReplyStatfs) {
        match self.ns.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        i: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let result = self.ns.setxattr(
            self.ino(i),
            name.as_bytes(),
            value,
            flags & libc::XATTR_CREATE != 0,
            flags & libc::XATTR_REPLACE != 0,
            caller(req),
        );
        let mode_may_change = result.is_ok() && name.as_bytes() == b"system.posix_acl_access";
        Self::reply_empty(result, reply);
        if mode_may_change {
            self.invalidate_attr_later(i);
        }
    }

    fn getxattr(&self, _req: &Request, i: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        Self::reply_xattr(self.ns.getxattr(self.ino(i), name.as_bytes()), size, reply);
    }

    fn listxattr(&self, _req: &Request, i: INodeNo, size: u32, reply: ReplyXattr) {
        Self::reply_xattr(self.ns.listxattr(self.ino(i)), size, reply);
    }

    fn removexattr(&self, req: &Request, i: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::reply_empty(
            self.ns
                .removexattr(self.ino(i), name.as_bytes(), caller(req)),
            reply,
        );
    }

    fn access(&self, _req: &Request, i: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); existence is ours.
        Self::reply_empty(self.ns.getattr(self.ino(i)).map(|_| ()), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        let created = self
            .ns
            .create_file(self.ino(parent), name.as_bytes(), perm, caller(req))
            .and_then(|a| self.ns.open(a.ino).map(|_| a));
        match created {
            Ok(a) => reply.created(
                ttl(&a),
                &file_attr(self.fuse_ino(a.ino), &a),
                Generation(a.rec.generation),
                FileHandle(self.new_fh()),
                OPEN_FLAGS,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }
}
