//! The namespace as a library, without a mount: a store in a temp dir, operations through
//! `Namespace`, and fsck clean at the end of every test.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dedupfs::chunking::{self, ChunkerParams, Compression};
use dedupfs::format::Kind;
use dedupfs::fsck;
use dedupfs::ids::{ChunkId, InodeNo};
use dedupfs::namespace::{Caller, Counters, FsError, Namespace, SetAttr};
use dedupfs::stats;
use dedupfs::store::Store;
use rand::{RngCore, SeedableRng};

const ROOT: Caller = Caller::ROOT;
const MIB: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    ns: Option<Arc<Namespace>>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(ChunkerParams::default(), Compression::Zstd(1))
    }

    fn with(params: ChunkerParams, compression: Compression) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        Store::init(&path, params, compression).expect("init");
        let ns = open(&path);
        Fixture {
            _dir: dir,
            path,
            ns: Some(ns),
        }
    }

    fn ns(&self) -> &Namespace {
        self.ns.as_ref().expect("namespace is open")
    }

    fn shared(&self) -> Arc<Namespace> {
        self.ns.clone().expect("namespace is open")
    }

    /// Drops the namespace (and the store lock) without a shutdown, then opens it again.
    fn reopen(&mut self) {
        self.ns = None;
        self.ns = Some(open(&self.path));
    }

    fn fsck_clean(&self) {
        fsck_clean(self.ns());
    }
}

fn open(path: &Path) -> Arc<Namespace> {
    Namespace::new(Store::open(path).expect("open store"), 16 << 20).expect("namespace")
}

fn fsck_clean(ns: &Namespace) {
    let store = ns.store();
    let report = fsck::fsck(&store.kv, &store.config).expect("fsck runs");
    assert!(report.is_clean(), "fsck is not clean:\n{report}");
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn mkdir(ns: &Namespace, parent: InodeNo, name: &str) -> InodeNo {
    ns.make_node(parent, name.as_bytes(), Kind::Dir, 0o755, 0, b"", ROOT)
        .expect("mkdir")
        .ino
}

fn create(ns: &Namespace, parent: InodeNo, name: &str) -> InodeNo {
    ns.create_file(parent, name.as_bytes(), 0o644, ROOT)
        .expect("create")
        .ino
}

/// A file holding `data`, written in one commit.
fn file_with(ns: &Namespace, parent: InodeNo, name: &str, data: &[u8]) -> InodeNo {
    let ino = create(ns, parent, name);
    ns.write(ino, 0, data).expect("write");
    ino
}

fn read_all(ns: &Namespace, ino: InodeNo) -> Vec<u8> {
    let size = ns.getattr(ino).expect("getattr").rec.size;
    let mut out = Vec::with_capacity(size as usize);
    while (out.len() as u64) < size {
        let piece = ns.read(ino, out.len() as u64, 4 << 20).expect("read");
        assert!(!piece.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&piece);
    }
    out
}

fn truncate(ns: &Namespace, ino: InodeNo, size: u64) {
    let set = SetAttr {
        size: Some(size),
        ..Default::default()
    };
    ns.setattr(ino, &set, ROOT).expect("truncate");
}

fn names(ns: &Namespace, dir: InodeNo) -> Vec<String> {
    ns.readdir(dir)
        .expect("readdir")
        .into_iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect()
}

fn nlink(ns: &Namespace, ino: InodeNo) -> u32 {
    ns.getattr(ino).expect("getattr").rec.nlink
}

#[test]
fn writes_at_offsets_read_back() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = create(ns, c.root, "f");
    assert_eq!(ns.write(f, 0, b"hello world"), Ok(11));
    assert_eq!(ns.write(f, 6, b"WORLD"), Ok(5));
    assert_eq!(ns.write(f, 20, b"tail"), Ok(4));
    assert_eq!(
        ns.read(f, 0, 100).expect("read"),
        b"hello WORLD\0\0\0\0\0\0\0\0\0tail"
    );
    assert_eq!(ns.read(f, 6, 3).expect("read"), b"WOR");
    assert_eq!(ns.read(f, 24, 10).expect("read"), b"");
    assert_eq!(ns.read(f, 1000, 10).expect("read"), b"");
    assert_eq!(ns.getattr(f).expect("getattr").rec.size, 24);

    // Overwrites inside a multi-chunk file, across chunk boundaries.
    let mut model = random(3 * MIB as usize, 1);
    let g = file_with(ns, c.root, "g", &model);
    for (i, off) in [0usize, 65_535, 1_000_000, 2_500_000, 3 * MIB as usize - 10]
        .into_iter()
        .enumerate()
    {
        let patch = random(100_000.min(model.len() - off), 10 + i as u64);
        ns.write(g, off as u64, &patch).expect("write");
        model[off..off + patch.len()].copy_from_slice(&patch);
    }
    assert_eq!(read_all(ns, g), model);
    assert_eq!(
        ns.read(g, 999_990, 20).expect("read"),
        &model[999_990..1_000_010]
    );
    fx.fsck_clean();
}

#[test]
fn holes_read_as_zeros_and_take_no_blocks() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = create(ns, c.root, "sparse");
    let a = random(4096, 2);
    let b = random(4096, 3);
    ns.write(f, 0, &a).expect("write");
    ns.write(f, 10 * MIB, &b).expect("write");
    let attr = ns.getattr(f).expect("getattr");
    assert_eq!(attr.rec.size, 10 * MIB + 4096);
    assert_eq!(attr.blocks(), 16, "two 4 KiB pieces hold 16 sectors");
    assert!(attr.blocks() * 512 < attr.rec.size);
    assert_eq!(ns.read(f, 0, 4096).expect("read"), a);
    assert_eq!(ns.read(f, 5 * MIB, 8192).expect("read"), vec![0u8; 8192]);
    let across = ns.read(f, 10 * MIB - 100, 200).expect("read");
    assert_eq!(&across[..100], &[0u8; 100][..]);
    assert_eq!(&across[100..], &b[..100]);
    assert_eq!(ns.counters().logical_bytes, 8192);

    // Growing by truncate adds a hole, not data.
    truncate(ns, f, 20 * MIB);
    let attr = ns.getattr(f).expect("getattr");
    assert_eq!(attr.rec.size, 20 * MIB);
    assert_eq!(attr.blocks(), 16);
    assert_eq!(ns.read(f, 20 * MIB - 10, 100).expect("read"), vec![0u8; 10]);

    // Filling part of a hole.
    ns.write(f, 15 * MIB, b"middle").expect("write");
    assert_eq!(
        ns.read(f, 15 * MIB - 2, 10).expect("read"),
        b"\0\0middle\0\0"
    );
    assert_eq!(ns.counters().logical_bytes, 8192 + 6);
    fx.fsck_clean();
}

#[test]
fn files_beyond_4_gib() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = create(ns, c.root, "big");
    let at = 5u64 << 30;
    let data = random(200_000, 4);
    ns.write(f, at, &data).expect("write at 5 GiB");
    // A write straddling 4 GiB, where a 32-bit offset would wrap.
    let four = 4u64 << 30;
    let across = random(10_000, 5);
    ns.write(f, four - 5_000, &across)
        .expect("write across 4 GiB");

    let attr = ns.getattr(f).expect("getattr");
    assert_eq!(attr.rec.size, at + data.len() as u64);
    assert!(attr.blocks() * 512 < 1 << 20, "blocks {}", attr.blocks());
    assert_eq!(ns.read(f, at, data.len() as u32).expect("read"), data);
    assert_eq!(ns.read(f, four - 5_000, 10_000).expect("read"), across);
    assert_eq!(ns.read(f, 1 << 30, 4096).expect("read"), vec![0u8; 4096]);
    assert_eq!(ns.read(f, at - 10, 20).expect("read")[..10], [0u8; 10]);

    // Shrinking below 4 GiB drops the far data.
    truncate(ns, f, four);
    assert_eq!(ns.getattr(f).expect("getattr").rec.size, four);
    assert_eq!(
        ns.read(f, four - 5_000, 10_000).expect("read"),
        &across[..5_000]
    );
    assert_eq!(ns.counters().logical_bytes, 5_000);
    fx.fsck_clean();
}

#[test]
fn appends_are_visible_before_commit_and_after_release() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = create(ns, c.root, "log");
    ns.open(f).expect("open");
    let mut model = Vec::new();
    for i in 0..40u64 {
        let piece = random(7_000 + (i as usize * 997) % 50_000, 100 + i);
        let size = ns.getattr(f).expect("getattr").rec.size;
        assert_eq!(size, model.len() as u64);
        ns.write(f, size, &piece).expect("append");
        model.extend_from_slice(&piece);
        // Pending bytes are visible to stat and to reads.
        assert_eq!(ns.getattr(f).expect("getattr").rec.size, model.len() as u64);
        let tail = ns
            .read(f, (model.len() - piece.len()) as u64, piece.len() as u32)
            .expect("read");
        assert_eq!(tail, piece);
        if i % 10 == 9 {
            ns.flush(f).expect("flush");
        }
    }
    ns.release(f).expect("release");
    assert_eq!(read_all(ns, f), model);
    assert_eq!(ns.counters().logical_bytes, model.len() as u64);
    fx.fsck_clean();
}

#[test]
fn truncate_shrinks_and_grows() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let data = random(2 * MIB as usize, 6);
    let f = file_with(ns, c.root, "f", &data);
    let full = ns.counters();

    // Shrink into the middle of a chunk.
    truncate(ns, f, 100_001);
    assert_eq!(read_all(ns, f), &data[..100_001]);
    let small = ns.counters();
    assert_eq!(small.logical_bytes, 100_001);
    assert!(small.chunks < full.chunks);
    assert!(small.unique_bytes < 200_000, "{small:?}");
    assert_eq!(ns.getattr(f).expect("getattr").rec.data_bytes, 100_001);

    // Grow: the new part reads as zeros and holds no data.
    truncate(ns, f, 1_000_000);
    let got = read_all(ns, f);
    assert_eq!(&got[..100_001], &data[..100_001]);
    assert!(got[100_001..].iter().all(|b| *b == 0));
    assert_eq!(ns.counters().logical_bytes, 100_001);

    // Truncate while open with pending writes past the new end.
    ns.open(f).expect("open");
    ns.write(f, 900_000, &data[..300_000]).expect("write");
    truncate(ns, f, 950_000);
    assert_eq!(ns.getattr(f).expect("getattr").rec.size, 950_000);
    assert_eq!(ns.read(f, 900_000, 100_000).expect("read"), &data[..50_000]);
    ns.release(f).expect("release");
    assert_eq!(ns.read(f, 900_000, 100_000).expect("read"), &data[..50_000]);

    truncate(ns, f, 0);
    assert_eq!(ns.read(f, 0, 10).expect("read"), b"");
    let empty = ns.counters();
    assert_eq!(
        (empty.logical_bytes, empty.chunks, empty.stored_bytes),
        (0, 0, 0)
    );
    fx.fsck_clean();
}

#[test]
fn unlinked_open_file_stays_readable_until_release() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let data = random(MIB as usize, 7);
    let f = file_with(ns, c.root, "f", &data);
    let with_file = ns.counters();
    assert!(with_file.chunks > 0);

    ns.open(f).expect("open");
    ns.unlink(c.root, b"f", ROOT).expect("unlink");
    assert_eq!(ns.lookup(c.root, b"f").map(|_| ()), Err(FsError::NotFound));
    assert_eq!(nlink(ns, f), 0);
    assert_eq!(read_all(ns, f), data);
    // Still writable, and the data is still stored.
    ns.write(f, 0, b"changed").expect("write to unlinked file");
    assert_eq!(ns.read(f, 0, 7).expect("read"), b"changed");
    assert!(ns.counters().chunks > 0);
    assert_eq!(ns.counters().files, 0);
    // Consistent at this point too: the inode is on the orphan list.
    ns.flush(f).expect("flush");
    fx.fsck_clean();

    ns.release(f).expect("release");
    let after = ns.counters();
    assert_eq!(after.chunks, 0);
    assert_eq!(after.stored_bytes, 0);
    assert_eq!(after.logical_bytes, 0);
    assert_eq!(ns.getattr(f).map(|_| ()), Err(FsError::NotFound));
    assert_eq!(ns.container_by_name("c").expect("c").logical_bytes, 0);
    fx.fsck_clean();
}

#[test]
fn orphan_left_open_at_drop_is_reclaimed_at_next_open() {
    let mut fx = Fixture::new();
    let c = fx
        .ns()
        .create_container("c", ROOT, 0o755)
        .expect("container");
    let f = file_with(fx.ns(), c.root, "f", &random(MIB as usize, 8));
    fx.ns().open(f).expect("open");
    fx.ns().unlink(c.root, b"f", ROOT).expect("unlink");
    assert!(fx.ns().counters().chunks > 0);
    // The process "dies" with the file open.
    fx.reopen();
    let c2 = fx.ns().counters();
    assert_eq!((c2.chunks, c2.logical_bytes, c2.files), (0, 0, 0));
    assert_eq!(fx.ns().getattr(f).map(|_| ()), Err(FsError::NotFound));
    fx.fsck_clean();
}

#[test]
fn container_with_an_open_orphan_is_busy() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = file_with(ns, c.root, "f", &random(MIB as usize, 9));
    ns.open(f).expect("open");
    ns.unlink(c.root, b"f", ROOT).expect("unlink");
    assert_eq!(ns.delete_container("c", true), Err(FsError::Busy));
    ns.release(f).expect("release");
    ns.delete_container("c", true).expect("delete");
    assert_eq!(ns.counters(), Counters::default());
    fx.fsck_clean();
}

#[test]
fn rename_moves_replaces_and_exchanges() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let a = mkdir(ns, c.root, "a");
    let b = mkdir(ns, c.root, "b");
    let x = file_with(ns, a, "x", b"xxx");
    let y = file_with(ns, a, "y", &random(300_000, 10));

    // Within a directory.
    ns.rename(a, b"x", a, b"x2", false, false, ROOT)
        .expect("rename");
    assert_eq!(names(ns, a), ["x2", "y"]);
    assert_eq!(ns.lookup(a, b"x2").expect("lookup").ino, x);

    // Over an existing file: the replaced file's data goes.
    let before = ns.counters();
    ns.rename(a, b"x2", a, b"y", false, false, ROOT)
        .expect("rename over");
    assert_eq!(names(ns, a), ["y"]);
    assert_eq!(ns.read(x, 0, 10).expect("read"), b"xxx");
    assert_eq!(ns.getattr(y).map(|_| ()), Err(FsError::NotFound));
    let after = ns.counters();
    assert_eq!(after.files, before.files - 1);
    assert_eq!(after.logical_bytes, 3);
    assert!(after.chunks < before.chunks);

    // NOREPLACE refuses an existing name and leaves both alone.
    file_with(ns, b, "z", b"zzz");
    assert_eq!(
        ns.rename(a, b"y", b, b"z", true, false, ROOT),
        Err(FsError::Exists)
    );
    assert_eq!(ns.rename(a, b"y", b, b"y", true, false, ROOT), Ok(()));
    assert_eq!(names(ns, a), Vec::<String>::new());
    assert_eq!(names(ns, b), ["y", "z"]);
    ns.rename(b, b"y", a, b"y", false, false, ROOT)
        .expect("back");

    // EXCHANGE across directories, file with directory: link counts follow the directory.
    let d = mkdir(ns, b, "d");
    assert_eq!((nlink(ns, a), nlink(ns, b)), (2, 3));
    ns.rename(a, b"y", b, b"d", false, true, ROOT)
        .expect("exchange");
    assert_eq!(ns.lookup(a, b"y").expect("lookup").ino, d);
    assert_eq!(ns.lookup(b, b"d").expect("lookup").ino, x);
    assert_eq!((nlink(ns, a), nlink(ns, b)), (3, 2));
    assert_eq!(ns.getattr(d).expect("getattr").rec.parent, a);
    assert_eq!(
        ns.rename(a, b"nope", b, b"d", false, true, ROOT),
        Err(FsError::NotFound)
    );
    assert_eq!(
        ns.rename(a, b"y", b, b"nope", false, true, ROOT),
        Err(FsError::NotFound)
    );

    // A directory across directories, and the errors of directory renames.
    ns.rename(a, b"y", b, b"dir", false, false, ROOT)
        .expect("move dir");
    assert_eq!((nlink(ns, a), nlink(ns, b)), (2, 3));
    assert_eq!(ns.getattr(d).expect("getattr").rec.parent, b);
    let inner = mkdir(ns, d, "inner");
    assert_eq!(
        ns.rename(b, b"dir", inner, b"loop", false, false, ROOT),
        Err(FsError::Invalid)
    );
    let e = mkdir(ns, a, "e");
    assert_eq!(
        ns.rename(a, b"e", b, b"dir", false, false, ROOT),
        Err(FsError::NotEmpty)
    );
    assert_eq!(
        ns.rename(a, b"e", b, b"z", false, false, ROOT),
        Err(FsError::NotDir)
    );
    assert_eq!(
        ns.rename(b, b"z", a, b"e", false, false, ROOT),
        Err(FsError::IsDir)
    );
    // A directory over an empty directory replaces it.
    ns.rmdir(d, b"inner", ROOT).expect("rmdir");
    ns.rename(a, b"e", b, b"dir", false, false, ROOT)
        .expect("dir over empty dir");
    assert_eq!(ns.getattr(d).map(|_| ()), Err(FsError::NotFound));
    assert_eq!(ns.lookup(b, b"dir").expect("lookup").ino, e);
    assert_eq!((nlink(ns, a), nlink(ns, b)), (2, 3));
    assert_eq!(ns.container_by_name("c").expect("c").dirs, 3);

    // Across containers.
    let other = ns
        .create_container("other", ROOT, 0o755)
        .expect("container");
    assert_eq!(
        ns.rename(b, b"z", other.root, b"z", false, false, ROOT),
        Err(FsError::CrossDevice)
    );
    fx.fsck_clean();
}

#[test]
fn mkdir_and_rmdir() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let a = mkdir(ns, c.root, "a");
    let b = mkdir(ns, a, "b");
    file_with(ns, b, "f", b"data");
    assert_eq!(nlink(ns, c.root), 3);
    assert_eq!(nlink(ns, a), 3);
    assert_eq!(ns.getattr(b).expect("getattr").rec.parent, a);
    assert_eq!(
        ns.make_node(c.root, b"a", Kind::Dir, 0o755, 0, b"", ROOT)
            .map(|_| ()),
        Err(FsError::Exists)
    );
    assert_eq!(ns.rmdir(c.root, b"a", ROOT), Err(FsError::NotEmpty));
    assert_eq!(ns.rmdir(a, b"b", ROOT), Err(FsError::NotEmpty));
    assert_eq!(ns.rmdir(b, b"f", ROOT), Err(FsError::NotDir));
    assert_eq!(ns.unlink(a, b"b", ROOT), Err(FsError::IsDir));
    assert_eq!(ns.rmdir(a, b"missing", ROOT), Err(FsError::NotFound));
    ns.unlink(b, b"f", ROOT).expect("unlink");
    ns.rmdir(a, b"b", ROOT).expect("rmdir b");
    assert_eq!(nlink(ns, a), 2);
    ns.rmdir(c.root, b"a", ROOT).expect("rmdir a");
    assert_eq!(nlink(ns, c.root), 2);
    assert!(names(ns, c.root).is_empty());
    let rec = ns.container_by_name("c").expect("c");
    assert_eq!((rec.files, rec.dirs, rec.logical_bytes), (0, 0, 0));
    assert_eq!(ns.counters().dirs, 1, "the container root");
    fx.fsck_clean();
}

#[test]
fn hard_links_share_one_inode() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let a = mkdir(ns, c.root, "a");
    let data = random(500_000, 11);
    let f = file_with(ns, c.root, "f", &data);
    ns.link(f, a, b"g", ROOT).expect("link");
    ns.link(f, c.root, b"h", ROOT).expect("link");
    for (dir, name) in [(c.root, "f"), (a, "g"), (c.root, "h")] {
        let attr = ns.lookup(dir, name.as_bytes()).expect("lookup");
        assert_eq!((attr.ino, attr.rec.nlink), (f, 3), "{name}");
    }
    let one = ns.counters();
    assert_eq!((one.files, one.logical_bytes), (1, data.len() as u64));
    assert_eq!(ns.link(f, a, b"g", ROOT).map(|_| ()), Err(FsError::Exists));
    assert_eq!(
        ns.link(a, c.root, b"dirlink", ROOT).map(|_| ()),
        Err(FsError::NotPermitted)
    );

    ns.unlink(c.root, b"f", ROOT).expect("unlink");
    assert_eq!(nlink(ns, f), 2);
    ns.write(f, 0, b"through g").expect("write");
    assert_eq!(
        ns.read(ns.lookup(c.root, b"h").expect("h").ino, 0, 9)
            .expect("read"),
        b"through g"
    );
    ns.unlink(a, b"g", ROOT).expect("unlink");
    assert_eq!(nlink(ns, f), 1);
    assert_eq!(ns.counters().files, 1);
    fx.fsck_clean();
    ns.unlink(c.root, b"h", ROOT).expect("unlink");
    let none = ns.counters();
    assert_eq!((none.files, none.chunks, none.logical_bytes), (0, 0, 0));
    fx.fsck_clean();
}

#[test]
fn symlinks_and_special_files() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let target = b"../some/where/else";
    let l = ns
        .make_node(c.root, b"link", Kind::Symlink, 0o777, 0, target, ROOT)
        .expect("symlink");
    assert_eq!(l.rec.size, target.len() as u64);
    assert_eq!(ns.readlink(l.ino).expect("readlink"), target);
    assert_eq!(
        ns.lookup(c.root, b"link").expect("lookup").kind(),
        Kind::Symlink
    );
    assert_eq!(
        ns.make_node(c.root, b"empty", Kind::Symlink, 0o777, 0, b"", ROOT)
            .map(|_| ()),
        Err(FsError::NotFound)
    );
    let fifo = ns
        .make_node(c.root, b"fifo", Kind::Fifo, 0o644, 0, b"", ROOT)
        .expect("mkfifo");
    assert_eq!(ns.readlink(fifo.ino), Err(FsError::Invalid));
    assert_eq!(ns.open(l.ino).map(|_| ()), Err(FsError::Invalid));
    // Hard links to a symlink count like any other.
    ns.link(l.ino, c.root, b"link2", ROOT).expect("link");
    assert_eq!(nlink(ns, l.ino), 2);
    fx.fsck_clean();
    ns.unlink(c.root, b"link", ROOT).expect("unlink");
    ns.unlink(c.root, b"link2", ROOT).expect("unlink");
    ns.unlink(c.root, b"fifo", ROOT).expect("unlink");
    assert!(names(ns, c.root).is_empty());
    fx.fsck_clean();
}

#[test]
fn xattrs_set_get_list_remove() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = file_with(ns, c.root, "f", b"x");
    ns.setxattr(f, b"user.a", b"1", false, false, ROOT)
        .expect("set");
    ns.setxattr(f, b"user.b", &[7u8; 1000], false, false, ROOT)
        .expect("set");
    ns.setxattr(c.root, b"user.dir", b"yes", false, false, ROOT)
        .expect("set on dir");
    assert_eq!(ns.getxattr(f, b"user.a").expect("get"), b"1");
    assert_eq!(ns.listxattr(f).expect("list"), b"user.a\0user.b\0");
    assert_eq!(
        ns.setxattr(f, b"user.a", b"2", true, false, ROOT),
        Err(FsError::Exists)
    );
    assert_eq!(
        ns.setxattr(f, b"user.c", b"2", false, true, ROOT),
        Err(FsError::NoAttr)
    );
    ns.setxattr(f, b"user.a", b"22", false, true, ROOT)
        .expect("replace");
    assert_eq!(ns.getxattr(f, b"user.a").expect("get"), b"22");
    ns.removexattr(f, b"user.a", ROOT).expect("remove");
    assert_eq!(ns.getxattr(f, b"user.a"), Err(FsError::NoAttr));
    assert_eq!(ns.removexattr(f, b"user.a", ROOT), Err(FsError::NoAttr));
    assert_eq!(ns.listxattr(f).expect("list"), b"user.b\0");
    let user = Caller {
        uid: 1000,
        gid: 1000,
    };
    assert_eq!(
        ns.setxattr(f, b"trusted.x", b"1", false, false, user),
        Err(FsError::NotPermitted)
    );
    fx.fsck_clean();
    // The attributes go with the file.
    ns.unlink(c.root, b"f", ROOT).expect("unlink");
    fx.fsck_clean();
}

#[test]
fn containers_count_what_they_hold_and_delete_gives_it_back() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let empty = ns.counters();
    let c = ns
        .create_container("backups", ROOT, 0o755)
        .expect("container");
    assert_eq!(
        ns.create_container("backups", ROOT, 0o755).map(|_| ()),
        Err(FsError::Exists)
    );
    assert_eq!(nlink(ns, InodeNo::ROOT), 3);
    let d1 = mkdir(ns, c.root, "d1");
    let d2 = mkdir(ns, d1, "d2");
    let mut total = 0;
    for (i, dir) in [c.root, d1, d2, d2].into_iter().enumerate() {
        let data = random(100_000 * (i + 1), 20 + i as u64);
        total += data.len() as u64;
        file_with(ns, dir, &format!("f{i}"), &data);
    }
    ns.make_node(d1, b"l", Kind::Symlink, 0o777, 0, b"f1", ROOT)
        .expect("symlink");
    let rec = ns.container_by_name("backups").expect("record");
    assert_eq!((rec.files, rec.dirs, rec.logical_bytes), (4, 2, total));
    let info = ns.container_info("backups").expect("info");
    assert_eq!((info.files, info.dirs, info.entries), (4, 2, 2));
    let full = ns.counters();
    assert_eq!((full.files, full.dirs, full.logical_bytes), (4, 3, total));
    fx.fsck_clean();

    assert_eq!(
        ns.delete_container("backups", false),
        Err(FsError::NotEmpty)
    );
    ns.delete_container("backups", true).expect("delete");
    assert!(ns.container_by_name("backups").is_none());
    assert_eq!(
        ns.lookup(InodeNo::ROOT, b"backups").map(|_| ()),
        Err(FsError::NotFound)
    );
    assert_eq!(nlink(ns, InodeNo::ROOT), 2);
    assert_eq!(ns.counters(), empty);
    // An empty container goes without force.
    ns.create_container("empty", ROOT, 0o755)
        .expect("container");
    ns.delete_container("empty", false).expect("delete empty");
    assert_eq!(ns.delete_container("empty", false), Err(FsError::NotFound));
    assert_eq!(ns.counters(), empty);
    fx.fsck_clean();
}

#[test]
fn identical_files_in_two_containers_share_chunks() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let params = fx.ns().config().chunker;
    let one = ns.create_container("one", ROOT, 0o755).expect("container");
    let two = ns.create_container("two", ROOT, 0o755).expect("container");
    let data = random(2 * MIB as usize, 30);
    let ids: Vec<ChunkId> = chunking::split(&params, &data)
        .iter()
        .map(|c| ChunkId::of(c))
        .collect();
    file_with(ns, one.root, "f", &data);
    let single = ns.counters();
    let f2 = file_with(ns, two.root, "f", &data);
    let double = ns.counters();
    assert_eq!(double.chunks, single.chunks);
    assert_eq!(double.stored_bytes, single.stored_bytes);
    assert_eq!(double.unique_bytes, data.len() as u64);
    assert_eq!(double.logical_bytes, 2 * data.len() as u64);
    for id in &ids {
        assert_eq!(ns.chunks.refcount(id).expect("refcount"), 2, "chunk {id}");
    }
    let s = stats::stats(&ns.store().kv).expect("stats");
    assert!((s.dedup_ratio - 2.0).abs() < 1e-9, "{s:?}");
    assert!(s.savings_percent > 49.0, "{s:?}");
    assert_eq!(s.containers.len(), 2);
    for c in &s.containers {
        assert_eq!(c.logical_bytes, data.len() as u64);
        assert_eq!(c.referenced_stored_bytes, double.stored_bytes);
        assert_eq!(c.files, 1);
    }
    assert!(s.render_text().contains("2.00x"), "{}", s.render_text());
    fx.fsck_clean();

    // Deleting one copy keeps the chunks for the other.
    ns.delete_container("one", true).expect("delete");
    for id in &ids {
        assert_eq!(ns.chunks.refcount(id).expect("refcount"), 1, "chunk {id}");
    }
    assert_eq!(ns.counters().stored_bytes, single.stored_bytes);
    assert_eq!(read_all(ns, f2), data);
    fx.fsck_clean();
}

#[test]
fn deleting_files_gives_space_back() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let baseline = ns.counters();
    let d = mkdir(ns, c.root, "d");
    for i in 0..5u64 {
        file_with(ns, d, &format!("f{i}"), &random(400_000, 40 + i));
    }
    // A second copy of one file dedups; compressible data compresses.
    file_with(ns, d, "copy", &random(400_000, 40));
    file_with(ns, d, "zeros", &vec![0u8; 1 << 20]);
    let full = ns.counters();
    assert!(full.stored_bytes < full.logical_bytes);
    assert!(full.stored_bytes > 5 * 400_000);
    for name in names(ns, d) {
        ns.unlink(d, name.as_bytes(), ROOT).expect("unlink");
    }
    ns.rmdir(c.root, b"d", ROOT).expect("rmdir");
    assert_eq!(ns.counters(), baseline);
    fx.fsck_clean();
}

#[test]
fn state_persists_across_reopen() {
    let mut fx = Fixture::new();
    let data = random(3 * MIB as usize, 50);
    let (c_root, f, d, counters) = {
        let ns = fx.ns();
        let c = ns.create_container("c", ROOT, 0o750).expect("container");
        let d = mkdir(ns, c.root, "dir");
        let f = file_with(ns, d, "f", &data);
        ns.link(f, c.root, b"f-link", ROOT).expect("link");
        ns.make_node(d, b"sym", Kind::Symlink, 0o777, 0, b"f", ROOT)
            .expect("symlink");
        ns.setxattr(f, b"user.k", b"v", false, false, ROOT)
            .expect("setxattr");
        // A pending write committed by the shutdown.
        ns.open(f).expect("open");
        ns.write(f, data.len() as u64, b"pending").expect("write");
        ns.shutdown().expect("shutdown");
        (c.root, f, d, ns.counters())
    };
    fx.reopen();
    let ns = fx.ns();
    let c = ns.container_by_name("c").expect("container survives");
    assert_eq!(c.root, c_root);
    assert_eq!(ns.getattr(c_root).expect("root").rec.perm, 0o750);
    assert_eq!(ns.counters(), counters);
    assert_eq!(ns.lookup(d, b"f").expect("lookup").ino, f);
    assert_eq!(nlink(ns, f), 2);
    let mut want = data.clone();
    want.extend_from_slice(b"pending");
    assert_eq!(read_all(ns, f), want);
    assert_eq!(ns.getxattr(f, b"user.k").expect("xattr"), b"v");
    let sym = ns.lookup(d, b"sym").expect("symlink").ino;
    assert_eq!(ns.readlink(sym).expect("readlink"), b"f");
    // Inode numbers are not reused after a reopen.
    let g = create(ns, d, "g");
    assert!(g.0 > sym.0 && g.0 > f.0, "new inode {g:?}");
    fx.fsck_clean();
}

/// One byte changed in the middle of a large file re-chunks only the chunks around it.
/// A second file keeps the original chunks referenced, so the growth of `unique_bytes`
/// is exactly the new chunk data the change stored.
#[test]
fn one_byte_change_in_a_large_file_adds_little_new_data() {
    const SIZE: usize = 100 << 20;
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let mut data = random(SIZE, 60);
    let mut files = Vec::new();
    for name in ["original", "edited"] {
        let f = create(ns, c.root, name);
        ns.open(f).expect("open");
        for (i, piece) in data.chunks(MIB as usize).enumerate() {
            ns.write(f, i as u64 * MIB, piece).expect("write");
        }
        ns.release(f).expect("release");
        files.push(f);
    }
    let before = ns.counters();
    assert_eq!(before.logical_bytes, 2 * SIZE as u64);
    assert_eq!(before.unique_bytes, SIZE as u64, "the copy dedups entirely");

    let f = files[1];
    let mid = SIZE / 2 + 12_345;
    data[mid] ^= 0xff;
    ns.write(f, mid as u64, &data[mid..mid + 1])
        .expect("write one byte");
    let after = ns.counters();
    let added = after.unique_bytes - before.unique_bytes;
    assert!(added > 0, "the changed chunk is new");
    assert!(added < MIB, "one changed byte stored {added} new bytes");
    assert!(after.chunks - before.chunks <= 4, "{before:?} -> {after:?}");
    assert_eq!(after.logical_bytes, 2 * SIZE as u64);
    assert_eq!(
        ns.read(f, mid as u64 - 5, 11).expect("read"),
        &data[mid - 5..mid + 6]
    );
    assert_eq!(read_all(ns, f), data);
    fx.fsck_clean();
}

/// Random writes, truncates, reads, flushes and handle churn on a few files against an
/// in-memory model. Small chunks (1 KiB average) make every file many chunks long, and the
/// data comes from a shared pool so that chunks dedup within and across files.
#[test]
fn random_operations_match_a_model() {
    for seed in model_seeds(1) {
        run_model(seed, 300, None);
    }
}

/// The same with a tiny dirty bound: most writes start a background commit, so reads and
/// later writes overlay pending, sealed and committed bytes.
#[test]
fn random_operations_with_background_commits_match_a_model() {
    for seed in model_seeds(1001) {
        run_model(seed, 300, Some(8 << 10));
    }
}

/// Three seeds from `first`; `DEDUPFS_MODEL_SEEDS=N` runs N of them (a longer soak).
fn model_seeds(first: u64) -> std::ops::Range<u64> {
    let n = std::env::var("DEDUPFS_MODEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    first..first + n
}

fn run_model(seed: u64, steps: usize, dirty_limit: Option<usize>) {
    use rand::Rng;
    let params = ChunkerParams::with_average(1024).expect("params");
    let mut fx = Fixture::with(params, Compression::Zstd(1));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pool = random(256 << 10, seed + 1000);
    let (files, c_root) = {
        let ns = fx.ns();
        let c = ns.create_container("m", ROOT, 0o755).expect("container");
        let sub = mkdir(ns, c.root, "sub");
        let files = vec![
            create(ns, c.root, "a"),
            create(ns, c.root, "b"),
            create(ns, sub, "c"),
        ];
        if let Some(limit) = dirty_limit {
            ns.set_dirty_limit(limit);
        }
        (files, c.root)
    };
    let mut model: Vec<Vec<u8>> = vec![Vec::new(); files.len()];
    let mut handles = vec![0u32; files.len()];
    for step in 0..steps {
        let ns = fx.ns();
        let i = rng.gen_range(0..files.len());
        let (f, m) = (files[i], &mut model[i]);
        let ctx = format!("seed {seed} step {step} file {i}");
        match rng.gen_range(0..100) {
            0..=44 => {
                let off = if rng.gen_bool(0.05) {
                    m.len() + rng.gen_range(0..200_000)
                } else {
                    rng.gen_range(0..m.len() + 8192)
                };
                let len = rng.gen_range(1..20_000);
                let data: Vec<u8> = match rng.gen_range(0..4) {
                    0 => vec![0u8; len],
                    1 => pool[..len].to_vec(),
                    _ => {
                        let at = rng.gen_range(0..pool.len() - len);
                        pool[at..at + len].to_vec()
                    }
                };
                ns.write(f, off as u64, &data).expect(&ctx);
                if m.len() < off + len {
                    m.resize(off + len, 0);
                }
                m[off..off + len].copy_from_slice(&data);
            }
            45..=54 => {
                let size = rng.gen_range(0..m.len() + 20_000);
                truncate(ns, f, size as u64);
                m.resize(size, 0);
            }
            55..=79 => {
                let off = rng.gen_range(0..m.len() + 100);
                let len = rng.gen_range(1..60_000);
                let got = ns.read(f, off as u64, len as u32).expect(&ctx);
                let end = (off + len).min(m.len());
                let want = if off < m.len() { &m[off..end] } else { &[][..] };
                assert!(got == want, "{ctx}: read {len} at {off} differs");
            }
            80..=84 => ns.flush(f).expect(&ctx),
            85 => ns.fsync(f).expect(&ctx),
            86..=92 => {
                ns.open(f).expect(&ctx);
                handles[i] += 1;
            }
            _ => {
                if handles[i] > 0 {
                    ns.release(f).expect(&ctx);
                    handles[i] -= 1;
                }
            }
        }
        let attr = ns.getattr(f).expect(&ctx);
        assert_eq!(attr.rec.size, model[i].len() as u64, "{ctx}: size");
        if step % 50 == 49 {
            // fsck reads without a database snapshot: let background commits finish.
            for f in &files {
                ns.flush(*f).expect(&ctx);
            }
            fx.fsck_clean();
        }
    }
    for (i, f) in files.iter().enumerate() {
        for _ in 0..handles[i] {
            fx.ns().release(*f).expect("release");
        }
        assert!(read_all(fx.ns(), *f) == model[i], "seed {seed} file {i}");
    }
    let live: u64 = model.iter().map(|m| m.len() as u64).sum();
    assert!(fx.ns().counters().logical_bytes <= live);
    fx.fsck_clean();
    fx.reopen();
    for (i, f) in files.iter().enumerate() {
        assert!(
            read_all(fx.ns(), *f) == model[i],
            "seed {seed} file {i} after reopen"
        );
    }
    assert_eq!(fx.ns().readdir(c_root).expect("readdir").len(), 3);
    fx.fsck_clean();
}

/// The directory tree as the model sees it.
#[derive(Default)]
struct Tree {
    /// Entries of every directory.
    dirs: std::collections::BTreeMap<InodeNo, std::collections::BTreeMap<Vec<u8>, InodeNo>>,
    kind: std::collections::BTreeMap<InodeNo, Kind>,
    /// Parent of every directory but the container root.
    parent: std::collections::BTreeMap<InodeNo, InodeNo>,
    data: std::collections::BTreeMap<InodeNo, Vec<u8>>,
}

impl Tree {
    /// Adds the entry `name` of `dir`, naming `ino`.
    fn add_entry(&mut self, dir: InodeNo, name: &[u8], ino: InodeNo) {
        self.dirs
            .get_mut(&dir)
            .expect("dir")
            .insert(name.to_vec(), ino);
    }

    fn lookup(&self, dir: InodeNo, name: &[u8]) -> Option<InodeNo> {
        self.dirs[&dir].get(name).copied()
    }

    /// True when `dir` is `node` or below it.
    fn is_ancestor(&self, node: InodeNo, mut dir: InodeNo) -> bool {
        loop {
            if dir == node {
                return true;
            }
            match self.parent.get(&dir) {
                Some(p) => dir = *p,
                None => return false,
            }
        }
    }

    fn nlink(&self, ino: InodeNo) -> u32 {
        if self.kind[&ino] == Kind::Dir {
            let subdirs = self.dirs[&ino]
                .values()
                .filter(|c| self.kind[c] == Kind::Dir)
                .count();
            2 + subdirs as u32
        } else {
            self.dirs
                .values()
                .flat_map(|e| e.values())
                .filter(|c| **c == ino)
                .count() as u32
        }
    }

    /// Drops one name of `ino`; forgets it when that was the last.
    fn unref(&mut self, ino: InodeNo) {
        if self.kind[&ino] == Kind::Dir {
            self.dirs.remove(&ino);
            self.parent.remove(&ino);
            self.kind.remove(&ino);
        } else if self.nlink(ino) == 0 {
            self.kind.remove(&ino);
            self.data.remove(&ino);
        }
    }

    /// Applies rename in the model, returning what the namespace must answer.
    fn rename(
        &mut self,
        (sp, sn): (InodeNo, &[u8]),
        (dp, dn): (InodeNo, &[u8]),
        noreplace: bool,
        exchange: bool,
    ) -> Result<(), FsError> {
        if noreplace && exchange {
            return Err(FsError::Invalid);
        }
        let src = self.lookup(sp, sn).ok_or(FsError::NotFound)?;
        let target = self.lookup(dp, dn);
        if sp == dp && sn == dn {
            return if exchange && target.is_none() {
                Err(FsError::NotFound)
            } else {
                Ok(())
            };
        }
        let src_dir = self.kind[&src] == Kind::Dir;
        if src_dir && self.is_ancestor(src, dp) {
            return Err(FsError::Invalid);
        }
        if exchange {
            let other = target.ok_or(FsError::NotFound)?;
            if self.kind[&other] == Kind::Dir && self.is_ancestor(other, sp) {
                return Err(FsError::Invalid);
            }
            self.dirs
                .get_mut(&sp)
                .expect("dir")
                .insert(sn.to_vec(), other);
            self.dirs
                .get_mut(&dp)
                .expect("dir")
                .insert(dn.to_vec(), src);
            if src_dir {
                self.parent.insert(src, dp);
            }
            if self.kind[&other] == Kind::Dir {
                self.parent.insert(other, sp);
            }
            return Ok(());
        }
        if let Some(t) = target {
            if noreplace {
                return Err(FsError::Exists);
            }
            if t == src {
                return Ok(());
            }
            match (src_dir, self.kind[&t] == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !self.dirs[&t].is_empty() => return Err(FsError::NotEmpty),
                _ => {}
            }
        }
        self.dirs.get_mut(&sp).expect("dir").remove(sn);
        self.dirs
            .get_mut(&dp)
            .expect("dir")
            .insert(dn.to_vec(), src);
        if src_dir {
            self.parent.insert(src, dp);
        }
        if let Some(t) = target {
            self.unref(t);
        }
        Ok(())
    }
}

/// Random creates, links, unlinks, renames (plain, NOREPLACE, EXCHANGE) and removals in a
/// small tree, each answer checked against a model; listings, link counts, contents and
/// fsck checked along the way.
#[test]
fn random_tree_operations_match_a_model() {
    for seed in model_seeds(2001) {
        run_tree_model(seed, 400);
    }
}

fn run_tree_model(seed: u64, steps: usize) {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let fx = Fixture::new();
    let ns = fx.ns();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c = ns.create_container("t", ROOT, 0o755).expect("container");
    let mut tree = Tree::default();
    tree.dirs.insert(c.root, Default::default());
    tree.kind.insert(c.root, Kind::Dir);
    let names: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        let dirs: Vec<InodeNo> = tree.dirs.keys().copied().collect();
        let dir = *dirs.choose(&mut rng).expect("a directory");
        let name = *names.choose(&mut rng).expect("a name");
        let exists = tree.lookup(dir, name);
        match rng.gen_range(0..100) {
            0..=19 => {
                let got = ns.create_file(dir, name, 0o644, ROOT).map(|a| a.ino);
                match exists {
                    Some(_) => assert_eq!(got, Err(FsError::Exists), "{ctx}"),
                    None => {
                        let ino = got.expect(&ctx);
                        tree.add_entry(dir, name, ino);
                        tree.kind.insert(ino, Kind::File);
                        let data = random(rng.gen_range(0..3000), seed * 1000 + step as u64);
                        ns.write(ino, 0, &data).expect(&ctx);
                        tree.data.insert(ino, data);
                    }
                }
            }
            20..=34 => {
                let got = ns
                    .make_node(dir, name, Kind::Dir, 0o755, 0, b"", ROOT)
                    .map(|a| a.ino);
                match exists {
                    Some(_) => assert_eq!(got, Err(FsError::Exists), "{ctx}"),
                    None => {
                        let ino = got.expect(&ctx);
                        tree.add_entry(dir, name, ino);
                        tree.dirs.insert(ino, Default::default());
                        tree.kind.insert(ino, Kind::Dir);
                        tree.parent.insert(ino, dir);
                    }
                }
            }
            35..=39 => {
                let got = ns
                    .make_node(dir, name, Kind::Symlink, 0o777, 0, b"target", ROOT)
                    .map(|a| a.ino);
                match exists {
                    Some(_) => assert_eq!(got, Err(FsError::Exists), "{ctx}"),
                    None => {
                        let ino = got.expect(&ctx);
                        tree.add_entry(dir, name, ino);
                        tree.kind.insert(ino, Kind::Symlink);
                    }
                }
            }
            40..=49 => {
                let inodes: Vec<InodeNo> = tree.kind.keys().copied().collect();
                let Some(&src) = inodes.choose(&mut rng) else {
                    continue;
                };
                let got = ns.link(src, dir, name, ROOT).map(|a| a.ino);
                if tree.kind[&src] == Kind::Dir {
                    assert_eq!(got, Err(FsError::NotPermitted), "{ctx}");
                } else if exists.is_some() {
                    assert_eq!(got, Err(FsError::Exists), "{ctx}");
                } else {
                    assert_eq!(got, Ok(src), "{ctx}");
                    tree.add_entry(dir, name, src);
                }
            }
            50..=61 => {
                let got = ns.unlink(dir, name, ROOT);
                match exists {
                    None => assert_eq!(got, Err(FsError::NotFound), "{ctx}"),
                    Some(ino) if tree.kind[&ino] == Kind::Dir => {
                        assert_eq!(got, Err(FsError::IsDir), "{ctx}")
                    }
                    Some(ino) => {
                        assert_eq!(got, Ok(()), "{ctx}");
                        tree.dirs.get_mut(&dir).expect("dir").remove(name);
                        tree.unref(ino);
                    }
                }
            }
            62..=69 => {
                let got = ns.rmdir(dir, name, ROOT);
                match exists {
                    None => assert_eq!(got, Err(FsError::NotFound), "{ctx}"),
                    Some(ino) if tree.kind[&ino] != Kind::Dir => {
                        assert_eq!(got, Err(FsError::NotDir), "{ctx}")
                    }
                    Some(ino) if !tree.dirs[&ino].is_empty() => {
                        assert_eq!(got, Err(FsError::NotEmpty), "{ctx}")
                    }
                    Some(ino) => {
                        assert_eq!(got, Ok(()), "{ctx}");
                        tree.dirs.get_mut(&dir).expect("dir").remove(name);
                        tree.unref(ino);
                    }
                }
            }
            70..=94 => {
                let to = *dirs.choose(&mut rng).expect("a directory");
                let to_name = *names.choose(&mut rng).expect("a name");
                let (noreplace, exchange) = match rng.gen_range(0..6) {
                    0 => (true, false),
                    1 | 2 => (false, true),
                    3 => (true, true),
                    _ => (false, false),
                };
                let got = ns.rename(dir, name, to, to_name, noreplace, exchange, ROOT);
                let want = tree.rename((dir, name), (to, to_name), noreplace, exchange);
                assert_eq!(
                    got,
                    want,
                    "{ctx}: rename {dir:?}/{} -> {to:?}/{} noreplace {noreplace} exchange {exchange}",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(to_name)
                );
            }
            _ => {
                let files: Vec<InodeNo> = tree.data.keys().copied().collect();
                if let Some(&f) = files.choose(&mut rng) {
                    let extra = random(rng.gen_range(1..2000), seed * 7000 + step as u64);
                    let m = tree.data.get_mut(&f).expect("file");
                    let off = rng.gen_range(0..=m.len());
                    ns.write(f, off as u64, &extra).expect(&ctx);
                    if m.len() < off + extra.len() {
                        m.resize(off + extra.len(), 0);
                    }
                    m[off..off + extra.len()].copy_from_slice(&extra);
                }
            }
        }
        if step % 40 == 39 || step + 1 == steps {
            check_tree(ns, &tree, &ctx);
            fx.fsck_clean();
        }
    }
}

/// Every listing, link count, parent and file content agrees with the model.
fn check_tree(ns: &Namespace, tree: &Tree, ctx: &str) {
    for (dir, entries) in &tree.dirs {
        let got: Vec<(Vec<u8>, InodeNo)> = ns
            .readdir(*dir)
            .expect(ctx)
            .into_iter()
            .map(|e| (e.name, e.ino))
            .collect();
        let want: Vec<(Vec<u8>, InodeNo)> = entries.iter().map(|(n, i)| (n.clone(), *i)).collect();
        assert_eq!(got, want, "{ctx}: listing of {dir:?}");
    }
    for (ino, kind) in &tree.kind {
        let attr = ns.getattr(*ino).expect(ctx);
        assert_eq!(attr.kind(), *kind, "{ctx}: kind of {ino:?}");
        assert_eq!(attr.rec.nlink, tree.nlink(*ino), "{ctx}: nlink of {ino:?}");
        if let Some(p) = tree.parent.get(ino) {
            assert_eq!(attr.rec.parent, *p, "{ctx}: parent of {ino:?}");
        }
    }
    for (ino, data) in &tree.data {
        assert!(read_all(ns, *ino) == *data, "{ctx}: contents of {ino:?}");
    }
    let rec = ns.container_by_name("t").expect("container");
    let files = tree.data.len() as u64;
    let dirs = tree.dirs.len() as u64 - 1;
    assert_eq!(
        (rec.files, rec.dirs),
        (files, dirs),
        "{ctx}: container counts"
    );
}

#[test]
fn rename_over_an_open_file_keeps_it_readable_until_release() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let old = random(600_000, 70);
    let victim = file_with(ns, c.root, "victim", &old);
    let winner = file_with(ns, c.root, "winner", b"new contents");
    ns.open(victim).expect("open");
    ns.rename(c.root, b"winner", c.root, b"victim", false, false, ROOT)
        .expect("rename over");
    assert_eq!(ns.lookup(c.root, b"victim").expect("lookup").ino, winner);
    assert_eq!(nlink(ns, victim), 0);
    assert_eq!(read_all(ns, victim), old);
    fx.fsck_clean();
    ns.release(victim).expect("release");
    let after = ns.counters();
    assert_eq!((after.files, after.logical_bytes), (1, 12));
    fx.fsck_clean();
}

#[test]
fn unlinking_one_of_two_names_of_an_open_file_is_no_orphan() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = file_with(ns, c.root, "a", b"shared");
    ns.link(f, c.root, b"b", ROOT).expect("link");
    ns.open(f).expect("open");
    ns.unlink(c.root, b"a", ROOT).expect("unlink");
    ns.write(f, 6, b" and more").expect("write");
    ns.release(f).expect("release");
    assert_eq!(nlink(ns, f), 1);
    assert_eq!(ns.read(f, 0, 100).expect("read"), b"shared and more");
    assert_eq!(ns.counters().files, 1);
    fx.fsck_clean();
}

#[test]
fn bad_names_and_kinds_are_refused() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let long = vec![b'x'; 256];
    for (name, err) in [
        (&b""[..], FsError::Invalid),
        (b".", FsError::Invalid),
        (b"..", FsError::Invalid),
        (b"a/b", FsError::Invalid),
        (b"a\0b", FsError::Invalid),
        (&long[..], FsError::NameTooLong),
    ] {
        assert_eq!(
            ns.create_file(c.root, name, 0o644, ROOT).map(|_| ()),
            Err(err),
            "{name:?}"
        );
    }
    ns.create_file(c.root, &long[..255], 0o644, ROOT)
        .expect("NAME_MAX is allowed");
    // Files are made in containers, never in the mount root.
    assert_eq!(
        ns.create_file(InodeNo::ROOT, b"f", 0o644, ROOT).map(|_| ()),
        Err(FsError::NotPermitted)
    );
    let d = mkdir(ns, c.root, "d");
    let set = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    assert_eq!(ns.setattr(d, &set, ROOT).map(|_| ()), Err(FsError::IsDir));
    assert_eq!(ns.open(d).map(|_| ()), Err(FsError::IsDir));
    let f = create(ns, d, "f");
    assert_eq!(
        ns.create_file(f, b"inside-a-file", 0o644, ROOT).map(|_| ()),
        Err(FsError::NotDir)
    );
    assert_eq!(ns.write(f, u64::MAX - 2, b"abc"), Err(FsError::TooBig));
    fx.fsck_clean();
}

/// Several threads write their own files (with background commits) while another creates,
/// renames and unlinks in the same container; every file reads back as written and fsck
/// is clean.
#[test]
fn concurrent_writers_and_metadata_changes() {
    use rand::Rng;
    let fx = Fixture::with(
        ChunkerParams::with_average(4096).expect("params"),
        Compression::Zstd(1),
    );
    let ns = fx.shared();
    ns.set_dirty_limit(64 << 10);
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let pool = Arc::new(random(1 << 20, 80));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let ns = ns.clone();
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let f = create(&ns, c.root, &format!("w{t}"));
                ns.open(f).expect("open");
                let mut model = Vec::new();
                for _ in 0..150 {
                    let off = rng.gen_range(0..model.len() + 50_000);
                    let len = rng.gen_range(1..100_000);
                    let at = rng.gen_range(0..pool.len() - len);
                    ns.write(f, off as u64, &pool[at..at + len]).expect("write");
                    if model.len() < off + len {
                        model.resize(off + len, 0);
                    }
                    model[off..off + len].copy_from_slice(&pool[at..at + len]);
                    if rng.gen_bool(0.1) {
                        let size = rng.gen_range(0..model.len() + 1);
                        truncate(&ns, f, size as u64);
                        model.truncate(size);
                    }
                }
                ns.release(f).expect("release");
                (f, model)
            })
        })
        .collect();
    let meta = {
        let ns = ns.clone();
        std::thread::spawn(move || {
            let d = mkdir(&ns, c.root, "meta");
            for i in 0..200 {
                let name = format!("n{}", i % 7);
                let other = format!("m{}", i % 5);
                match i % 4 {
                    0 => {
                        let _ = ns.create_file(d, name.as_bytes(), 0o644, ROOT);
                    }
                    1 => {
                        let _ =
                            ns.rename(d, name.as_bytes(), d, other.as_bytes(), false, false, ROOT);
                    }
                    2 => {
                        let _ = ns.unlink(d, other.as_bytes(), ROOT);
                    }
                    _ => {
                        if let Ok(a) = ns.lookup(d, name.as_bytes()) {
                            let _ = ns.write(a.ino, 0, &[i as u8; 5000]);
                        }
                    }
                }
            }
        })
    };
    meta.join().expect("metadata thread");
    for w in writers {
        let (f, model) = w.join().expect("writer thread");
        assert!(read_all(&ns, f) == model, "{f:?}");
    }
    fx.fsck_clean();
}

/// Two threads store the same data and delete it again, over and over: a chunk one of them
/// found present may be reclaimed by the other before it commits.
#[test]
fn identical_data_written_and_deleted_concurrently() {
    let fx = Fixture::with(
        ChunkerParams::with_average(4096).expect("params"),
        Compression::Zstd(1),
    );
    let ns = fx.shared();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let data = Arc::new(random(200_000, 90));
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let (ns, data) = (ns.clone(), data.clone());
            std::thread::spawn(move || {
                for i in 0..40 {
                    let name = format!("t{t}-{i}");
                    let f = file_with(&ns, c.root, &name, &data);
                    assert!(read_all(&ns, f) == *data, "{name}");
                    ns.unlink(c.root, name.as_bytes(), ROOT).expect("unlink");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let left = ns.counters();
    assert_eq!((left.chunks, left.logical_bytes, left.files), (0, 0, 0));
    fx.fsck_clean();
}
