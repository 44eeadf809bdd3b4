//! `dedupfs::ingest` as a library: a source tree mirrored into a container, then changed and
//! mirrored again; the container must equal the source each time (content, kinds, modes,
//! owners, times, xattrs, symlinks, special files), and fsck must stay clean.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dedupfs::chunking::{ChunkerParams, Compression};
use dedupfs::format::Kind;
use dedupfs::fsck;
use dedupfs::ids::InodeNo;
use dedupfs::ingest::{self, IngestReport};
use dedupfs::namespace::{Caller, Namespace};
use dedupfs::store::Store;

use common::random;

struct Fixture {
    dir: tempfile::TempDir,
    ns: Arc<Namespace>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        Store::init(&path, ChunkerParams::default(), Compression::Zstd(1)).expect("init");
        let ns = Namespace::new(Store::open(&path).expect("open"), 16 << 20).expect("ns");
        ns.create_container("c", Caller::ROOT, 0o755)
            .expect("container");
        std::fs::create_dir(dir.path().join("src")).expect("mkdir src");
        Fixture { dir, ns }
    }

    fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }

    fn ingest(&self, target: &str, jobs: usize) -> IngestReport {
        let t = ingest::resolve_target(&self.ns, target).expect("target");
        ingest::ingest(&self.ns, &self.src(), t, jobs, &[], &mut |_| true).expect("ingest")
    }

    fn dir(&self, path: &str) -> InodeNo {
        let mut ino = InodeNo::ROOT;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            ino = self.ns.lookup(ino, c.as_bytes()).expect("lookup").ino;
        }
        ino
    }

    fn fsck_clean(&self) {
        let store = self.ns.store();
        let report = fsck::fsck(&store.kv, &store.config).expect("fsck runs");
        assert!(report.is_clean(), "fsck is not clean:\n{report}");
    }
}

/// What a comparison looks at for one entry.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    /// Times of directories and symlinks, mtime of files (atime of files is the reader's).
    mtime: i64,
    data: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    rdev: u64,
}

fn lxattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: buffers of the given sizes; NUL-terminated path.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0);
        v.truncate(m as usize);
        out.insert(name.to_vec(), v);
    }
    out
}

fn source_tree(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let m = std::fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_fifo() {
                Kind::Fifo
            } else if ft.is_char_device() {
                Kind::CharDev
            } else if ft.is_block_device() {
                Kind::BlockDev
            } else {
                Kind::Socket
            }
        };
        let data = match kind {
            Kind::File => std::fs::read(&p).unwrap(),
            Kind::Symlink => std::fs::read_link(&p)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec(),
            _ => Vec::new(),
        };
        if kind == Kind::Dir {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        out.insert(
            rel.to_string_lossy().into_owned(),
            Entry {
                kind,
                perm: if kind == Kind::Symlink {
                    0
                } else {
                    m.mode() & 0o7777
                },
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                data,
                xattrs: lxattrs(&p),
                rdev: if matches!(kind, Kind::CharDev | Kind::BlockDev) {
                    m.rdev()
                } else {
                    0
                },
            },
        );
    }
    out
}

fn container_tree(ns: &Namespace, top: InodeNo) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(PathBuf::new(), top)];
    while let Some((rel, ino)) = stack.pop() {
        let rec = ns.getattr(ino).unwrap().rec;
        let data = match rec.kind {
            Kind::File => {
                let mut d = Vec::new();
                while (d.len() as u64) < rec.size {
                    let piece = ns.read(ino, d.len() as u64, 1 << 20).unwrap();
                    assert!(!piece.is_empty());
                    d.extend_from_slice(&piece);
                }
                d
            }
            Kind::Symlink => ns.readlink(ino).unwrap(),
            _ => Vec::new(),
        };
        if rec.kind == Kind::Dir {
            for e in ns.readdir(ino).unwrap() {
                stack.push((rel.join(std::ffi::OsStr::from_bytes(&e.name)), e.ino));
            }
        }
        let mut xattrs = BTreeMap::new();
        for name in ns
            .listxattr(ino)
            .unwrap()
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
        {
            xattrs.insert(name.to_vec(), ns.getxattr(ino, name).unwrap());
        }
        out.insert(
            rel.to_string_lossy().into_owned(),
            Entry {
                kind: rec.kind,
                perm: if rec.kind == Kind::Symlink {
                    0
                } else {
                    u32::from(rec.perm)
                },
                uid: rec.uid,
                gid: rec.gid,
                mtime: rec.mtime,
                data,
                xattrs,
                rdev: u64::from(rec.rdev),
            },
        );
    }
    out
}

fn assert_mirrors(f: &Fixture, target: &str) {
    let want = source_tree(&f.src());
    let got = container_tree(&f.ns, f.dir(target));
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "names differ"
    );
    for (name, w) in &want {
        assert_eq!(Some(w), got.get(name), "{name:?} differs");
    }
}

fn set_mtime(p: &Path, secs: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 123_456_789,
    };
    // SAFETY: NUL-terminated path, two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings, a value of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "lsetxattr {}", p.display());
}

fn remove_xattr(p: &Path, name: &str) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings.
    assert_eq!(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }, 0);
}

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
}

/// A tree with every kind of entry and metadata the ingest copies.
fn build_source(src: &Path) {
    std::fs::create_dir_all(src.join("a/b/c")).unwrap();
    std::fs::create_dir(src.join("ro")).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::fs::write(src.join("small"), b"hello\n").unwrap();
    std::fs::write(src.join("a/big"), random(3 << 20, 1)).unwrap();
    std::fs::write(src.join("a/b/copy-of-big"), random(3 << 20, 1)).unwrap();
    // Sparse: data, a 1 MiB hole, data, a hole at the end.
    let mut sparse = random(100_000, 2);
    sparse.resize(100_000 + (1 << 20), 0);
    sparse.extend_from_slice(&random(5000, 3));
    sparse.resize(sparse.len() + (256 << 10), 0);
    std::fs::write(src.join("a/sparse"), &sparse).unwrap();
    // Small enough to be made in one batch: a data block, two hole blocks, a data block, a
    // hole block at the end (64 KiB blocks).
    let mut small_sparse = random(10_000, 4);
    small_sparse.resize(192 << 10, 0);
    small_sparse.extend_from_slice(&random(3000, 5));
    small_sparse.resize(320 << 10, 0);
    std::fs::write(src.join("a/small-sparse"), &small_sparse).unwrap();
    for i in 0..300 {
        std::fs::write(src.join(format!("a/b/c/f{i:03}")), format!("file {i}\n")).unwrap();
    }
    std::os::unix::fs::symlink("a/big", src.join("link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", src.join("a/dangling")).unwrap();
    mkfifo(&src.join("a/fifo"));
    std::fs::write(src.join("suid"), b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(src.join("suid"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(src.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::lchown(src.join("link"), Some(42), Some(43)).unwrap();
    set_xattr(&src.join("small"), "user.note", b"kept");
    set_xattr(&src.join("a"), "user.dir", b"on a directory");
    set_xattr(&src.join("suid"), "user.gone", b"soon");
    std::fs::write(src.join("ro/inside"), b"x").unwrap();
    std::fs::set_permissions(src.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
    // Names like the ingest's own temp names are ordinary names to it.
    std::fs::write(src.join(".small.dedupfs-ingest.tmp"), b"mine").unwrap();
    std::fs::create_dir(src.join(".small.1-0.dedupfs-ingest.tmp")).unwrap();
    set_mtime(&src.join("link"), 1_000_000_000);
    set_mtime(&src.join("a/b"), 1_500_000_000);
    set_mtime(&src.join("a"), 1_600_000_000);
}

#[test]
fn mirrors_a_tree_then_its_changes() {
    let f = Fixture::new();
    let src = f.src();
    build_source(&src);
    let first = f.ingest("c", 3);
    assert_eq!(first.errors, Vec::<String>::new());
    let s = &first.stats;
    assert_eq!((s.files, s.written, s.unchanged), (309, 309, 0), "{s:?}");
    assert_eq!((s.symlinks, s.specials, s.removed), (2, 1, 0), "{s:?}");
    assert_mirrors(&f, "c");
    // The sparse file's holes stay holes.
    let sparse = f.ns.lookup(f.dir("c/a"), b"sparse").unwrap().rec;
    assert!(
        sparse.data_bytes < 300_000,
        "holes written: {}",
        sparse.data_bytes
    );
    let small_sparse = f.ns.lookup(f.dir("c/a"), b"small-sparse").unwrap().rec;
    assert_eq!(
        (small_sparse.size, small_sparse.data_bytes),
        (320 << 10, 128 << 10),
        "only the two data blocks are stored"
    );
    f.fsck_clean();

    // Nothing changed: nothing written, the container stays equal.
    let again = f.ingest("c", 2);
    assert_eq!((again.stats.written, again.stats.unchanged), (0, 309));
    assert_mirrors(&f, "c");

    // Every kind of change.
    std::fs::write(src.join("small"), b"HELLO\n").unwrap(); // same size, new mtime
    set_mtime(&src.join("small"), 1_700_000_000);
    std::fs::remove_dir_all(src.join("a/b/c")).unwrap();
    std::fs::write(src.join("a/b/c"), b"a file where a directory was").unwrap();
    std::fs::remove_file(src.join("empty")).unwrap();
    std::fs::create_dir(src.join("empty")).unwrap();
    std::fs::write(src.join("empty/new"), random(70_000, 9)).unwrap();
    std::fs::remove_file(src.join("link")).unwrap();
    std::os::unix::fs::symlink("small", src.join("link")).unwrap();
    std::fs::set_permissions(src.join("a/big"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(src.join("a/big"), Some(7), Some(8)).unwrap();
    set_xattr(&src.join("a/big"), "user.added", b"new");
    remove_xattr(&src.join("suid"), "user.gone");
    remove_xattr(&src.join("a"), "user.dir");
    let changed = f.ingest("c", 4);
    assert_eq!(changed.errors, Vec::<String>::new());
    // a/b/c and its 300 files, the file "empty", the old symlink.
    assert_eq!(
        changed.stats.removed,
        300 + 1 + 1 + 1,
        "{:?}",
        changed.stats
    );
    assert_mirrors(&f, "c");
    f.fsck_clean();
}

#[test]
fn ingests_into_a_path_and_reports_what_it_cannot_copy() {
    let f = Fixture::new();
    let src = f.src();
    std::fs::create_dir(src.join(".snapshots")).unwrap();
    std::fs::write(src.join("kept"), b"k").unwrap();
    // Into the container root, ".snapshots" is reserved: reported, the rest copied.
    let t = ingest::resolve_target(&f.ns, "c").unwrap();
    let r = ingest::ingest(&f.ns, &src, t, 2, &[], &mut |_| true).unwrap();
    assert_eq!(r.stats.errors, 1);
    assert!(
        r.errors[0].contains(".snapshots") && r.errors[0].contains("reserved"),
        "{:?}",
        r.errors
    );
    assert!(f.ns.lookup(f.dir("c"), b"kept").is_ok());
    // Below the root the name is an ordinary one; missing directories are created.
    let r = f.ingest("c/deep/er", 2);
    assert_eq!(r.stats.errors, 0);
    assert_mirrors(&f, "c/deep/er");
    // Bad targets.
    for bad in ["", "nosuch", "c/../c", "c/kept"] {
        assert!(
            ingest::resolve_target(&f.ns, bad).is_err(),
            "{bad:?} accepted"
        );
    }
    f.fsck_clean();
}

#[test]
fn a_cancelled_ingest_leaves_a_consistent_store_and_a_rerun_finishes() {
    let f = Fixture::new();
    let src = f.src();
    for d in 0..20 {
        std::fs::create_dir(src.join(format!("d{d}"))).unwrap();
        for i in 0..50 {
            std::fs::write(src.join(format!("d{d}/f{i}")), random(20_000, d * 100 + i)).unwrap();
        }
    }
    let t = ingest::resolve_target(&f.ns, "c").unwrap();
    let err = ingest::ingest(&f.ns, &src, t, 2, &[], &mut |_| false);
    assert!(
        matches!(err, Err(ingest::IngestError::Cancelled)),
        "{err:?}"
    );
    f.fsck_clean();
    let r = f.ingest("c", 2);
    assert_eq!(r.stats.errors, 0);
    assert_mirrors(&f, "c");
    f.fsck_clean();
}
