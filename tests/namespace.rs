//! The namespace as a library, without a mount: a store in a temp dir, operations through
//! `Namespace`, and fsck clean at the end of every test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dedupfs::chunking::{self, ChunkerParams, Compression};
use dedupfs::format::{key, ExtentRecord, InodeRecord, Kind};
use dedupfs::fsck;
use dedupfs::ids::{ChunkId, InodeNo};
use dedupfs::kv::Cf;
use dedupfs::namespace::{
    is_snapshot_ino, Caller, Counters, FsError, Namespace, SetAttr, SnapshotRecord, WholeFile,
    SNAPSHOTS_DIR,
};
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

/// A file made whole in one batch reads back with its holes, owner, mode and times; it
/// dedups against what is stored, a snapshot taken before it does not see it, and bad
/// requests change nothing.
#[test]
fn make_file_stores_data_and_attributes_in_one_batch() {
    let mut fx = Fixture::new();
    let c = fx
        .ns()
        .create_container("c", ROOT, 0o755)
        .expect("container");
    let a = random(200_000, 7);
    let b = random(5000, 8);
    let size = 3 * MIB + 100;
    let data = [(0u64, &a[..]), (2 * MIB, &b[..])];
    let whole = WholeFile {
        perm: 0o4750,
        uid: 1234,
        gid: 5678,
        atime_ns: 1_000_000_000_123,
        mtime_ns: 2_000_000_000_456,
        size,
        data: &data,
        replace: false,
    };
    let ns = fx.ns();
    file_with(ns, c.root, "same-as-a", &a);
    ns.create_snapshot("c", Some("before")).expect("snapshot");
    let dir_before = ns.getattr(c.root).expect("getattr").rec;
    let stored_before = ns.counters().stored_bytes;
    let made = ns.make_file(c.root, b"f", &whole, ROOT).expect("make_file");
    let rec = ns.getattr(made.ino).expect("getattr").rec;
    assert_eq!(rec, made.rec);
    assert_eq!(
        (rec.kind, rec.perm, rec.uid, rec.gid, rec.nlink),
        (Kind::File, 0o4750, 1234, 5678, 1)
    );
    assert_eq!((rec.atime, rec.mtime), (whole.atime_ns, whole.mtime_ns));
    assert_eq!((rec.size, rec.data_bytes), (size, 205_000));
    let mut want = vec![0u8; size as usize];
    want[..a.len()].copy_from_slice(&a);
    want[2 * MIB as usize..2 * MIB as usize + b.len()].copy_from_slice(&b);
    assert!(read_all(ns, made.ino) == want, "contents with holes");
    let dir = ns.getattr(c.root).expect("getattr").rec;
    assert!(dir.mtime > dir_before.mtime, "the directory's mtime moves");
    // `a` was stored already: only `b` is new (compressed random bytes are not smaller).
    let added = ns.counters().stored_bytes - stored_before;
    assert!(added < 10_000, "stored {added} bytes for 5000 new ones");
    // The snapshot from before does not have it.
    let snap = snapshot_root(ns, c.root, "before");
    assert_eq!(ns.lookup(snap, b"f").map(|a| a.ino), Err(FsError::NotFound));

    // Refused, changing nothing: a taken name, the reserved name, the mount root, a
    // snapshot, data out of order or past the size.
    let counters = ns.counters();
    let refused = [
        (c.root, &b"f"[..], whole, FsError::Exists),
        (c.root, SNAPSHOTS_DIR, whole, FsError::Exists),
        (InodeNo::ROOT, b"g", whole, FsError::NotPermitted),
        (snap, b"g", whole, FsError::ReadOnly),
        (
            c.root,
            b"g",
            WholeFile { size: 100, ..whole },
            FsError::Invalid,
        ),
        (
            c.root,
            b"g",
            WholeFile {
                data: &[(10, &b[..]), (0, &a[..])],
                ..whole
            },
            FsError::Invalid,
        ),
    ];
    for (parent, name, file, err) in refused {
        let got = ns.make_file(parent, name, &file, ROOT).map(|a| a.ino);
        assert_eq!(got, Err(err), "{}", String::from_utf8_lossy(name));
    }
    assert_eq!(ns.counters(), counters);
    assert_eq!(names(ns, c.root), ["f", "same-as-a"]);
    fx.fsck_clean();

    fx.reopen();
    let ns = fx.ns();
    let f = ns.lookup(c.root, b"f").expect("lookup");
    assert_eq!(f.rec, rec);
    assert!(read_all(ns, f.ino) == want, "contents after a reopen");
    ns.delete_snapshot("c", "before").expect("delete");
    ns.unlink(c.root, b"f", ROOT).expect("unlink");
    fx.fsck_clean();
}

/// Many files of one directory in one batch: the refused ones are left out and reported
/// one by one, the rest are made, identical data is stored once.
#[test]
fn make_files_makes_the_good_ones_and_refuses_the_rest() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    file_with(ns, c.root, "taken", b"old");
    let shared = random(150_000, 9);
    let other = random(70_000, 10);
    fn file<'a>(data: &'a [(u64, &'a [u8])], size: u64) -> WholeFile<'a> {
        WholeFile {
            perm: 0o644,
            uid: 1,
            gid: 2,
            atime_ns: 3,
            mtime_ns: 4,
            size,
            data,
            replace: false,
        }
    }
    let one = [(0u64, &shared[..])];
    let two = [(0u64, &other[..])];
    let stored_before = ns.counters().stored_bytes;
    let files = [
        (&b"a"[..], file(&one, shared.len() as u64)),
        (b"taken", file(&two, other.len() as u64)),
        (b"b", file(&one, shared.len() as u64)),
        (b"a", file(&two, other.len() as u64)),
        (b"bad/name", file(&two, other.len() as u64)),
        (b"past-size", file(&two, 10)),
        (b"c", file(&two, other.len() as u64)),
        (b"empty", file(&[], 0)),
    ];
    let results = ns.make_files(c.root, &files, ROOT).expect("make_files");
    let refused: Vec<Option<FsError>> = results.iter().map(|r| r.as_ref().err().copied()).collect();
    assert_eq!(
        refused,
        [
            None,
            Some(FsError::Exists),
            None,
            Some(FsError::Exists),
            Some(FsError::Invalid),
            Some(FsError::Invalid),
            None,
            None
        ]
    );
    assert_eq!(names(ns, c.root), ["a", "b", "c", "empty", "taken"]);
    assert_eq!(
        read_all(ns, ns.lookup(c.root, b"taken").expect("lookup").ino),
        b"old"
    );
    for (name, want) in [
        ("a", &shared),
        ("b", &shared),
        ("c", &other),
        ("empty", &vec![]),
    ] {
        let a = ns.lookup(c.root, name.as_bytes()).expect("lookup");
        assert!(read_all(ns, a.ino) == *want, "{name}");
        assert_eq!((a.rec.uid, a.rec.gid, a.rec.mtime), (1, 2, 4), "{name}");
    }
    let inos: std::collections::BTreeSet<InodeNo> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|a| a.ino))
        .collect();
    assert_eq!(inos.len(), 4, "an inode each");
    // `shared` twice and `other` once: about 220 KB of incompressible bytes stored.
    let added = ns.counters().stored_bytes - stored_before;
    assert!(added < 230_000, "stored {added} bytes");
    fx.fsck_clean();
}

/// With `replace`, a made file takes the place of the file of that name in its batch: the
/// old one is gone (or lives on while open, or in a snapshot), as after a rename over it.
#[test]
fn make_files_replace_old_files_as_a_rename_over_them_would() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let old_data = random(300_000, 11);
    let plain = file_with(ns, c.root, "plain", &old_data);
    let open = file_with(ns, c.root, "open", &old_data);
    let linked = file_with(ns, c.root, "linked", b"linked");
    ns.link(linked, c.root, b"linked-too", ROOT).expect("link");
    mkdir(ns, c.root, "dir");
    ns.create_snapshot("c", Some("before")).expect("snapshot");
    ns.open(open).expect("open");
    let new_data = random(20_000, 12);
    let data = [(0u64, &new_data[..])];
    let whole = WholeFile {
        perm: 0o600,
        uid: 5,
        gid: 6,
        atime_ns: 7,
        mtime_ns: 8,
        size: new_data.len() as u64,
        data: &data,
        replace: true,
    };
    let files = [
        (&b"plain"[..], whole),
        (b"open", whole),
        (b"linked", whole),
        (b"linked-too", whole),
        (b"dir", whole),
        (
            b"plain-no",
            WholeFile {
                replace: false,
                ..whole
            },
        ),
    ];
    file_with(ns, c.root, "plain-no", b"kept");
    let results = ns.make_files(c.root, &files, ROOT).expect("make_files");
    let refused: Vec<Option<FsError>> = results.iter().map(|r| r.as_ref().err().copied()).collect();
    assert_eq!(
        refused,
        [
            None,
            None,
            None,
            Some(FsError::Busy),
            Some(FsError::IsDir),
            Some(FsError::Exists)
        ]
    );
    for name in ["plain", "open", "linked"] {
        let a = ns.lookup(c.root, name.as_bytes()).expect("lookup");
        assert!(read_all(ns, a.ino) == new_data, "{name}");
        assert_eq!((a.rec.uid, a.rec.mtime, a.rec.nlink), (5, 8, 1), "{name}");
    }
    assert_eq!(ns.getattr(plain).map(|a| a.ino), Err(FsError::NotFound));
    // Still open: readable until released, then gone.
    assert!(read_all(ns, open) == old_data);
    ns.release(open).expect("release");
    assert_eq!(ns.getattr(open).map(|a| a.ino), Err(FsError::NotFound));
    // The other name of the linked file keeps it, with one link less.
    let other = ns.lookup(c.root, b"linked-too").expect("lookup");
    assert_eq!((other.ino, other.rec.nlink), (linked, 1));
    assert_eq!(read_all(ns, other.ino), b"linked");
    // The snapshot still has the old files.
    let snap = snapshot_root(ns, c.root, "before");
    let old = ns.lookup(snap, b"plain").expect("in the snapshot");
    assert!(read_all(ns, old.ino) == old_data);
    fx.fsck_clean();
    ns.delete_snapshot("c", "before").expect("delete");
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

/// st_blocks of a file with pending writes counts each byte once: an overwrite of stored
/// bytes adds nothing, writes into a hole or past the end add their bytes, and the commit
/// leaves the count where the pending state put it.
#[test]
fn blocks_of_pending_writes_count_each_byte_once() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = file_with(ns, c.root, "f", &random(MIB as usize, 41));
    truncate(ns, f, 3 * MIB); // a hole from 1 MiB to 3 MiB
    let data_bytes = |f| ns.getattr(f).expect("getattr").rec.data_bytes;
    assert_eq!(data_bytes(f), MIB);
    ns.open(f).expect("open");
    ns.write(f, 200_000, &random(100_000, 42))
        .expect("overwrite");
    ns.write(f, 250_000, &random(100_000, 43))
        .expect("overlapping overwrite");
    assert_eq!(data_bytes(f), MIB, "overwrites replace stored bytes");
    ns.write(f, 2 * MIB, &random(50_000, 44))
        .expect("into the hole");
    ns.write(f, 3 * MIB - 10, &[7u8; 30])
        .expect("across the end");
    let pending = data_bytes(f);
    assert_eq!(pending, MIB + 50_000 + 30);
    ns.flush(f).expect("commit");
    assert_eq!(data_bytes(f), pending, "the commit stores what was counted");
    ns.release(f).expect("release");
    fx.fsck_clean();
}

/// SEEK_DATA and SEEK_HOLE over committed chunks, holes, pending writes and the end of the
/// file, live and in a snapshot view.
#[test]
fn seek_data_and_hole() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = file_with(ns, c.root, "f", &random(MIB as usize, 51));
    truncate(ns, f, 4 * MIB); // data [0, 1 MiB), a hole to 4 MiB
    ns.open(f).expect("open");
    ns.write(f, 2 * MIB, &random(10_000, 52))
        .expect("pending write in the hole");
    let seek = |ino, at, hole| ns.seek(ino, at, hole);
    let live = [
        (0, false, Ok(0)),
        (0, true, Ok(MIB)),
        (500_000, false, Ok(500_000)),
        (MIB, false, Ok(2 * MIB)),
        (MIB, true, Ok(MIB)),
        (2 * MIB + 5, false, Ok(2 * MIB + 5)),
        (2 * MIB + 5, true, Ok(2 * MIB + 10_000)),
        (3 * MIB, false, Err(FsError::NoDataAfter)),
        (3 * MIB, true, Ok(3 * MIB)),
        (4 * MIB - 1, true, Ok(4 * MIB - 1)),
        (4 * MIB, false, Err(FsError::NoDataAfter)),
        (4 * MIB, true, Err(FsError::NoDataAfter)),
    ];
    for (at, hole, want) in live {
        assert_eq!(seek(f, at, hole), want, "pending: {at} hole={hole}");
    }
    ns.flush(f).expect("commit");
    ns.release(f).expect("release");
    for (at, hole, want) in live {
        assert_eq!(seek(f, at, hole), want, "committed: {at} hole={hole}");
    }
    ns.create_snapshot("c", Some("s")).expect("snapshot");
    ns.write(f, 3 * MIB, b"later")
        .expect("write after the snapshot");
    assert_eq!(seek(f, 3 * MIB, false), Ok(3 * MIB));
    let view = ns
        .lookup(snapshot_root(ns, c.root, "s"), b"f")
        .expect("in the snapshot")
        .ino;
    for (at, hole, want) in live {
        assert_eq!(seek(view, at, hole), want, "snapshot: {at} hole={hole}");
    }
    assert_eq!(seek(c.root, 0, false), Err(FsError::IsDir));
    fx.fsck_clean();
}

/// fallocate PUNCH_HOLE: the range reads as zeros and holds no chunk, the rest reads as
/// before, chunks wholly inside give their space back, pending writes in the range go, and a
/// snapshot taken before keeps the old bytes; ranges past the end change nothing.
#[test]
fn punch_hole_makes_a_hole() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let mut data = random(3 * MIB as usize, 61);
    let f = file_with(ns, c.root, "f", &data);
    ns.create_snapshot("c", Some("s")).expect("snapshot");
    let before = ns.counters();
    let blocks = |f| ns.getattr(f).expect("getattr").rec.data_bytes;
    assert_eq!(blocks(f), 3 * MIB);

    // Across chunk boundaries, with a pending write inside and one across its end.
    ns.open(f).expect("open");
    let over_start = random(100_000, 64);
    ns.write(f, 450_000, &over_start)
        .expect("pending across the start");
    data[450_000..500_000].copy_from_slice(&over_start[..50_000]);
    ns.write(f, 600_000, &random(5_000, 62))
        .expect("pending inside");
    let across = random(20_000, 63);
    ns.write(f, 1_990_000, &across)
        .expect("pending across the end");
    data[1_990_000..2_010_000].copy_from_slice(&across);
    ns.punch_hole(f, 500_000, 1_500_000).expect("punch");
    data[500_000..2_000_000].fill(0);
    assert!(read_all(ns, f) == data, "reads after the punch, pending");
    ns.release(f).expect("release");
    assert!(read_all(ns, f) == data, "reads after the punch, committed");
    assert_eq!(blocks(f), 3 * MIB - 1_500_000);
    assert_eq!(ns.seek(f, 0, true), Ok(500_000));
    assert_eq!(ns.seek(f, 500_000, false), Ok(2_000_000));
    let after = ns.counters();
    assert_eq!(after.logical_bytes, before.logical_bytes - 1_500_000);
    // The snapshot holds every old chunk: nothing is reclaimed yet.
    assert!(after.stored_bytes >= before.stored_bytes, "{after:?}");

    // A snapshot taken before still reads the old bytes.
    let view = ns
        .lookup(snapshot_root(ns, c.root, "s"), b"f")
        .expect("in the snapshot")
        .ino;
    assert!(
        read_all(ns, view) == random(3 * MIB as usize, 61),
        "the snapshot keeps them"
    );

    // Past the end, or empty: nothing changes; the size never does.
    ns.punch_hole(f, 3 * MIB, 4096).expect("past the end");
    ns.punch_hole(f, 100, 0).expect("empty");
    ns.punch_hole(f, 2_900_000, MIB).expect("to past the end");
    data[2_900_000..].fill(0);
    assert_eq!(ns.getattr(f).expect("getattr").rec.size, 3 * MIB);
    assert!(read_all(ns, f) == data);
    fx.fsck_clean();

    // Without the snapshot, punched chunks give their space back.
    ns.delete_snapshot("c", "s").expect("delete");
    let held = ns.counters().stored_bytes;
    ns.punch_hole(f, 0, 3 * MIB).expect("punch it all");
    assert_eq!(blocks(f), 0);
    assert!(read_all(ns, f).iter().all(|b| *b == 0));
    assert!(
        ns.counters().stored_bytes < held / 10,
        "{:?}",
        ns.counters()
    );

    // Inside one chunk, and ZERO_RANGE past the end, which extends the file.
    let mut small = random(MIB as usize, 65);
    let g = file_with(ns, c.root, "g", &small);
    ns.punch_hole(g, 300_000, 100)
        .expect("punch inside a chunk");
    small[300_000..300_100].fill(0);
    assert!(read_all(ns, g) == small);
    assert_eq!(blocks(g), MIB - 100);
    ns.zero_range(g, MIB - 10, 100, true)
        .expect("zero range past the end");
    small[MIB as usize - 10..].fill(0);
    small.resize(MIB as usize + 90, 0);
    assert_eq!(ns.getattr(g).expect("getattr").rec.size, MIB + 90);
    assert!(read_all(ns, g) == small);
    assert_eq!(blocks(g), MIB - 110);
    fx.fsck_clean();
}

/// Copies a file with `copy_by_reference` the way `cp` calls copy_file_range: windows from
/// the start until it reports 0.
fn copy_whole(ns: &Namespace, src: InodeNo, dst: InodeNo, window: u64) -> u64 {
    let mut at = 0;
    loop {
        match ns
            .copy_by_reference(src, dst, at, at, window)
            .expect("copy")
        {
            Some(0) => return at,
            Some(n) => at += n,
            None => panic!("no copy by reference at {at}"),
        }
    }
}

/// copy_file_range by reference: a whole-file copy (live, with the source's pending writes,
/// into an open destination, and out of a snapshot, also into a file truncated after that
/// snapshot) reads back the same and stores no chunk; the copies then change on their own,
/// also while open and across a snapshot; other shapes are left to the caller.
#[test]
fn copy_by_reference_shares_chunks() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let mut data = random(3 * MIB as usize, 81);
    let src = file_with(ns, c.root, "src", &data);
    ns.open(src).expect("open");
    ns.write(src, 100, b"pending").expect("pending write");
    data[100..107].copy_from_slice(b"pending");
    let early = create(ns, c.root, "early");
    assert_eq!(copy_whole(ns, src, early, MIB), 3 * MIB);
    assert!(
        read_all(ns, early) == data,
        "the source's pending write is copied"
    );

    let before = ns.counters();
    let dst = create(ns, c.root, "dst");
    ns.open(dst).expect("open the destination");
    assert_eq!(copy_whole(ns, src, dst, MIB), 3 * MIB);
    assert!(read_all(ns, dst) == data, "the copy reads the same");
    let after = ns.counters();
    assert_eq!(after.stored_bytes, before.stored_bytes, "no chunk stored");
    assert_eq!(after.chunks, before.chunks);
    assert_eq!(after.logical_bytes, before.logical_bytes + 3 * MIB);
    assert_eq!(ns.getattr(dst).expect("getattr").rec.data_bytes, 3 * MIB);
    fx.fsck_clean();

    // Other shapes: the caller copies bytes.
    let other = create(ns, c.root, "other");
    assert_eq!(
        ns.copy_by_reference(src, other, 0, 10, MIB),
        Ok(None),
        "offsets differ"
    );
    assert_eq!(
        ns.copy_by_reference(src, dst, 0, 0, MIB),
        Ok(None),
        "dst not at the offset"
    );
    truncate(ns, other, 100);
    assert_eq!(
        ns.copy_by_reference(src, other, 100, 100, MIB),
        Ok(None),
        "cuts a chunk"
    );
    assert_eq!(
        ns.copy_by_reference(src, src, 0, 0, MIB),
        Ok(None),
        "itself"
    );

    // The copies change on their own: the open copy across a snapshot, the source truncated.
    ns.create_snapshot("c", Some("t")).expect("snapshot");
    ns.write(dst, 0, b"changed").expect("write the open copy");
    truncate(ns, dst, 2 * MIB);
    ns.release(dst).expect("release");
    ns.release(src).expect("release");
    truncate(ns, src, 0);
    let mut want = data[..2 * MIB as usize].to_vec();
    want[..7].copy_from_slice(b"changed");
    assert!(read_all(ns, dst) == want, "the copy outlives its source");
    let in_t = ns
        .lookup(snapshot_root(ns, c.root, "t"), b"dst")
        .expect("in the snapshot")
        .ino;
    assert!(
        read_all(ns, in_t) == data,
        "the snapshot keeps the copy as it was"
    );
    ns.delete_snapshot("c", "t").expect("delete");
    fx.fsck_clean();

    // Out of a snapshot, also into a file truncated after it.
    ns.create_snapshot("c", Some("s")).expect("snapshot");
    ns.unlink(c.root, b"dst", ROOT).expect("unlink");
    truncate(ns, early, 0);
    let root = snapshot_root(ns, c.root, "s");
    let view = ns.lookup(root, b"dst").expect("in the snapshot").ino;
    let back = create(ns, c.root, "back");
    let stored = ns.counters().stored_bytes;
    assert_eq!(copy_whole(ns, view, back, 4 * MIB), 2 * MIB);
    assert!(read_all(ns, back) == want, "restored by reference");
    assert_eq!(ns.counters().stored_bytes, stored);
    let early_view = ns.lookup(root, b"early").expect("in the snapshot").ino;
    assert_eq!(copy_whole(ns, early_view, early, 4 * MIB), 3 * MIB);
    assert!(
        read_all(ns, early) == data,
        "into a file truncated after the snapshot"
    );
    fx.fsck_clean();
    ns.delete_snapshot("c", "s").expect("delete");
    assert!(
        read_all(ns, back) == want,
        "the restored copy holds its chunks"
    );
    assert!(read_all(ns, early) == data);
    fx.fsck_clean();

    // Into another container: its counters take the bytes.
    let d = ns.create_container("d", ROOT, 0o755).expect("container");
    let there = create(ns, d.root, "there");
    assert_eq!(copy_whole(ns, back, there, 4 * MIB), 2 * MIB);
    assert!(read_all(ns, there) == want);
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
fn links_stop_at_link_max_with_emlink() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = create(ns, c.root, "f");
    let max = dedupfs::namespace::LINK_MAX;
    let many = mkdir(ns, c.root, "many");
    for i in 1..max {
        ns.link(f, many, format!("l{i}").as_bytes(), ROOT)
            .expect("link below the limit");
    }
    assert_eq!(nlink(ns, f), max);
    let err = ns.link(f, many, b"one-too-many", ROOT).map(|_| ());
    assert_eq!(err, Err(FsError::TooManyLinks));
    assert_eq!(FsError::TooManyLinks.errno(), libc::EMLINK);
    assert_eq!(nlink(ns, f), max, "a refused link changes nothing");
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

/// Three seeds from `first`; `DEDUPFS_MODEL_SEEDS=N` runs N of them (a longer soak), and
/// `DEDUPFS_MODEL_SKIP=K` skips the first K (to rerun one failing seed).
fn model_seeds(first: u64) -> std::ops::Range<u64> {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    first + var("DEDUPFS_MODEL_SKIP", 0)..first + var("DEDUPFS_MODEL_SEEDS", 3)
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
#[derive(Clone, Default)]
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

// ---- snapshots ----

/// The live tree of the snapshot model: the structure ([`Tree`]) and what else a snapshot
/// must keep of every inode.
#[derive(Clone, Default)]
struct SnapModel {
    tree: Tree,
    perm: BTreeMap<InodeNo, u16>,
    target: BTreeMap<InodeNo, Vec<u8>>,
    xattrs: BTreeMap<InodeNo, BTreeMap<Vec<u8>, Vec<u8>>>,
    /// mtime of a non-directory set by utimens and not changed since.
    mtime: BTreeMap<InodeNo, i64>,
}

impl SnapModel {
    fn new(root: InodeNo, perm: u16) -> SnapModel {
        let mut m = SnapModel::default();
        m.tree.dirs.insert(root, Default::default());
        m.tree.kind.insert(root, Kind::Dir);
        m.perm.insert(root, perm);
        m
    }

    /// Adds a new inode `ino` named `name` in `dir`.
    fn add(&mut self, dir: InodeNo, name: &[u8], ino: InodeNo, kind: Kind, perm: u16) {
        self.tree.add_entry(dir, name, ino);
        self.tree.kind.insert(ino, kind);
        self.perm.insert(ino, perm);
        match kind {
            Kind::Dir => {
                self.tree.dirs.insert(ino, Default::default());
                self.tree.parent.insert(ino, dir);
            }
            Kind::File => {
                self.tree.data.insert(ino, Vec::new());
            }
            _ => {}
        }
    }
}

/// A snapshot as the model took it: the model at that moment and the live attributes of
/// every inode right after.
struct Frozen {
    rec: SnapshotRecord,
    model: SnapModel,
    attrs: BTreeMap<InodeNo, InodeRecord>,
    /// View inode of every model inode, from the first check on: later checks, and checks
    /// after a reopen, must find the same numbers.
    view_inos: Option<BTreeMap<InodeNo, InodeNo>>,
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Walks the tree under `root` (the live container root, or a snapshot view's root) and
/// checks it against `model`: names, kinds, inode numbers of hard links, link counts,
/// modes, mtimes set by utimens, sizes, contents, symlink targets and xattrs; with
/// `attrs`, every attribute but the parent equals the recorded one. Returns the inode
/// number found for every model inode.
fn check_against(
    ns: &Namespace,
    model: &SnapModel,
    attrs: Option<&BTreeMap<InodeNo, InodeRecord>>,
    root: InodeNo,
    model_root: InodeNo,
    ctx: &str,
) -> BTreeMap<InodeNo, InodeNo> {
    let view = attrs.is_some();
    let mut found: BTreeMap<InodeNo, InodeNo> = BTreeMap::new();
    let mut back: BTreeMap<InodeNo, InodeNo> = BTreeMap::new();
    found.insert(model_root, root);
    back.insert(root, model_root);
    let mut stack = vec![(root, model_root)];
    while let Some((dir, mdir)) = stack.pop() {
        let entries = ns.readdir(dir).expect(ctx);
        let got: Vec<String> = entries.iter().map(|e| lossy(&e.name)).collect();
        let want: Vec<String> = model.tree.dirs[&mdir].keys().map(|n| lossy(n)).collect();
        assert_eq!(got, want, "{ctx}: listing of {mdir:?} (seen as {dir:?})");
        for e in &entries {
            let m = model.tree.dirs[&mdir][&e.name];
            let kind = model.tree.kind[&m];
            let what = format!("{ctx}: {:?} in {mdir:?}", lossy(&e.name));
            assert_eq!(e.kind, kind, "{what}: kind in the listing");
            assert_eq!(is_snapshot_ino(e.ino), view, "{what}: {:?}", e.ino);
            let looked = ns.lookup(dir, &e.name).expect(&what);
            assert_eq!(looked.ino, e.ino, "{what}: lookup and readdir disagree");
            match found.insert(m, e.ino) {
                Some(prev) => assert_eq!(prev, e.ino, "{what}: two names of {m:?}"),
                None => {
                    if let Some(other) = back.insert(e.ino, m) {
                        panic!("{what}: {:?} names both {other:?} and {m:?}", e.ino);
                    }
                }
            }
            if kind == Kind::Dir {
                assert_eq!(looked.rec.parent, dir, "{what}: parent");
                stack.push((e.ino, m));
            }
        }
        assert_eq!(
            ns.lookup(dir, b"no-such-name").map(|a| a.ino),
            Err(FsError::NotFound),
            "{ctx}"
        );
    }
    assert_eq!(
        found.len(),
        model.tree.kind.len(),
        "{ctx}: inodes reachable"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(found.len() as u64);
    for (m, ino) in &found {
        use rand::Rng;
        let what = format!("{ctx}: {m:?} (seen as {ino:?})");
        let attr = ns.getattr(*ino).expect(&what);
        assert_eq!(attr.ino, *ino, "{what}");
        let kind = model.tree.kind[m];
        assert_eq!(attr.kind(), kind, "{what}: kind");
        assert_eq!(attr.rec.nlink, model.tree.nlink(*m), "{what}: nlink");
        assert_eq!(attr.rec.perm, model.perm[m], "{what}: mode");
        if let Some(t) = model.mtime.get(m) {
            assert_eq!(attr.rec.mtime, *t, "{what}: mtime");
        }
        if let Some(attrs) = attrs {
            let mut got = attr.rec.clone();
            got.parent = attrs[m].parent;
            assert_eq!(&got, &attrs[m], "{what}: attributes");
        }
        match kind {
            Kind::File => {
                let data = &model.tree.data[m];
                assert_eq!(attr.rec.size, data.len() as u64, "{what}: size");
                if view {
                    ns.open(*ino).expect(&what);
                }
                assert!(read_all(ns, *ino) == *data, "{what}: contents");
                if !data.is_empty() {
                    let off = rng.gen_range(0..data.len());
                    let len = rng.gen_range(1..100_000usize);
                    let got = ns.read(*ino, off as u64, len as u32).expect(&what);
                    let end = (off + len).min(data.len());
                    assert!(got == data[off..end], "{what}: {len} bytes at {off}");
                }
                assert_eq!(
                    ns.read(*ino, data.len() as u64, 10).expect(&what),
                    b"",
                    "{what}: read at the end"
                );
                if view {
                    ns.release(*ino).expect(&what);
                }
            }
            Kind::Symlink => {
                assert_eq!(ns.readlink(*ino).expect(&what), model.target[m], "{what}");
            }
            _ => {}
        }
        let empty = BTreeMap::new();
        let want = model.xattrs.get(m).unwrap_or(&empty);
        let list = ns.listxattr(*ino).expect(&what);
        let mut names: Vec<Vec<u8>> = list
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| n.to_vec())
            .collect();
        names.sort();
        let want_names: Vec<Vec<u8>> = want.keys().cloned().collect();
        assert_eq!(names, want_names, "{what}: xattr names");
        for (name, value) in want {
            assert_eq!(
                ns.getxattr(*ino, name).as_ref(),
                Ok(value),
                "{what}: xattr {}",
                lossy(name)
            );
        }
        assert_eq!(
            ns.getxattr(*ino, b"user.none"),
            Err(FsError::NoAttr),
            "{what}"
        );
    }
    found
}

/// Checks one snapshot through its `.snapshots` view against the model taken with it.
fn check_snapshot(ns: &Namespace, c_root: InodeNo, snap: &mut Frozen, ctx: &str) {
    let ctx = format!("{ctx}: snapshot {}", snap.rec.name);
    let dir = ns.lookup(c_root, SNAPSHOTS_DIR).expect(&ctx).ino;
    let root = ns.lookup(dir, snap.rec.name.as_bytes()).expect(&ctx);
    assert!(is_snapshot_ino(root.ino), "{ctx}: root {:?}", root.ino);
    assert_eq!(root.rec.parent, dir, "{ctx}: parent of the root");
    let found = check_against(ns, &snap.model, Some(&snap.attrs), root.ino, c_root, &ctx);
    match &snap.view_inos {
        None => snap.view_inos = Some(found),
        Some(before) => assert_eq!(&found, before, "{ctx}: view inode numbers changed"),
    }
}

/// Checks every snapshot, the `.snapshots` listing and the live tree.
fn check_all(ns: &Namespace, c_root: InodeNo, model: &SnapModel, snaps: &mut [Frozen], ctx: &str) {
    check_against(ns, model, None, c_root, c_root, &format!("{ctx}: live"));
    let dir = ns.lookup(c_root, SNAPSHOTS_DIR).expect(ctx);
    assert_eq!(
        dir.rec.nlink,
        2 + snaps.len() as u32,
        "{ctx}: nlink of .snapshots"
    );
    let listed: Vec<(String, InodeNo)> = ns
        .readdir(dir.ino)
        .expect(ctx)
        .into_iter()
        .map(|e| (lossy(&e.name), e.ino))
        .collect();
    let mut want = Vec::new();
    for s in snaps.iter_mut() {
        check_snapshot(ns, c_root, s, ctx);
        let root = s.view_inos.as_ref().expect("checked")[&c_root];
        want.push((s.rec.name.clone(), root));
    }
    assert_eq!(listed, want, "{ctx}: listing of .snapshots");
}

/// Every mutating call on inodes of a snapshot view (and on `.snapshots`) is EROFS, and
/// `.snapshots` is a reserved name in the container root.
fn check_read_only(ns: &Namespace, c_root: InodeNo, snap: &Frozen, ctx: &str) {
    let ctx = format!("{ctx}: read-only {}", snap.rec.name);
    let dir = ns.lookup(c_root, SNAPSHOTS_DIR).expect(&ctx).ino;
    let inos = snap.view_inos.as_ref().expect("checked");
    let root = inos[&c_root];
    let live_file = ns
        .create_file(c_root, b"ro-probe", 0o644, ROOT)
        .expect(&ctx)
        .ino;
    let chmod = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    let resize = SetAttr {
        size: Some(1),
        ..Default::default()
    };
    let touch = SetAttr {
        mtime: Some(Some(1)),
        ..Default::default()
    };
    for (m, ino) in inos.iter() {
        let what = format!("{ctx}: {m:?} seen as {ino:?}");
        let kind = snap.model.tree.kind[m];
        let erofs = Err(FsError::ReadOnly);
        assert_eq!(ns.write(*ino, 0, b"x"), erofs.map(|()| 0), "{what}: write");
        assert_eq!(
            ns.setattr(*ino, &chmod, ROOT).map(|_| ()),
            erofs,
            "{what}: chmod"
        );
        assert_eq!(
            ns.setattr(*ino, &resize, ROOT).map(|_| ()),
            erofs,
            "{what}: truncate"
        );
        assert_eq!(
            ns.setattr(*ino, &touch, ROOT).map(|_| ()),
            erofs,
            "{what}: utimens"
        );
        assert_eq!(
            ns.setxattr(*ino, b"user.ro", b"v", false, false, ROOT),
            erofs,
            "{what}: setxattr"
        );
        assert_eq!(
            ns.removexattr(*ino, b"user.a", ROOT),
            erofs,
            "{what}: removexattr"
        );
        if kind != Kind::Dir {
            assert_eq!(
                ns.link(*ino, c_root, b"ro-link", ROOT).map(|_| ()),
                erofs,
                "{what}: link out of the snapshot"
            );
            continue;
        }
        for k in [Kind::File, Kind::Dir, Kind::Symlink] {
            assert_eq!(
                ns.make_node(*ino, b"ro-new", k, 0o644, 0, b"t", ROOT)
                    .map(|_| ()),
                erofs,
                "{what}: create {k:?}"
            );
        }
        assert_eq!(
            ns.link(live_file, *ino, b"ro-link", ROOT).map(|_| ()),
            erofs,
            "{what}: link into the snapshot"
        );
        for name in snap.model.tree.dirs[m].keys() {
            assert_eq!(ns.unlink(*ino, name, ROOT), erofs, "{what}: unlink");
            assert_eq!(ns.rmdir(*ino, name, ROOT), erofs, "{what}: rmdir");
            assert_eq!(
                ns.rename(*ino, name, *ino, b"ro-renamed", false, false, ROOT),
                erofs,
                "{what}: rename"
            );
            assert_eq!(
                ns.rename(*ino, name, c_root, b"ro-renamed", false, false, ROOT),
                erofs,
                "{what}: rename out"
            );
        }
        assert_eq!(
            ns.rename(c_root, b"ro-probe", *ino, b"ro-probe", false, false, ROOT),
            erofs,
            "{what}: rename in"
        );
    }
    // `.snapshots` itself: no snapshot is made, renamed or removed through it.
    let erofs = Err(FsError::ReadOnly);
    assert_eq!(
        ns.make_node(dir, b"new", Kind::Dir, 0o755, 0, b"", ROOT)
            .map(|_| ()),
        erofs
    );
    let name = snap.rec.name.as_bytes();
    assert_eq!(
        ns.rmdir(dir, name, ROOT),
        erofs,
        "{ctx}: rmdir of a snapshot"
    );
    assert_eq!(
        ns.rename(dir, name, dir, b"renamed", false, false, ROOT),
        erofs,
        "{ctx}: rename of a snapshot"
    );
    assert_eq!(ns.setattr(dir, &chmod, ROOT).map(|_| ()), erofs);
    assert_eq!(ns.lookup(dir, name).map(|a| a.ino), Ok(root));
    // The reserved name.
    for kind in [Kind::File, Kind::Dir, Kind::Symlink] {
        assert_eq!(
            ns.make_node(c_root, SNAPSHOTS_DIR, kind, 0o755, 0, b"t", ROOT)
                .map(|_| ()),
            Err(FsError::Exists),
            "{ctx}: create .snapshots as {kind:?}"
        );
    }
    assert_eq!(
        ns.rename(
            c_root,
            b"ro-probe",
            c_root,
            SNAPSHOTS_DIR,
            false,
            false,
            ROOT
        ),
        Err(FsError::Exists)
    );
    assert_eq!(
        ns.link(live_file, c_root, SNAPSHOTS_DIR, ROOT).map(|_| ()),
        Err(FsError::Exists)
    );
    ns.unlink(c_root, b"ro-probe", ROOT).expect(&ctx);
}

/// Raw store after the last snapshot of every container is gone: no dead lists, one
/// version of every object and no tombstones; the stored bytes are exactly those of the
/// chunks live extents name.
fn check_no_snapshot_leftovers(ns: &Namespace, ctx: &str) {
    check_leftovers(ns, false, ctx)
}

/// [`check_no_snapshot_leftovers`], tolerating lone tombstones when `tombstones`
/// (rollbacks leave some: rollback_leaves_no_lone_tombstone).
fn check_leftovers(ns: &Namespace, tombstones: bool, ctx: &str) {
    let kv = &ns.store().kv;
    assert_eq!(
        kv.scan_prefix(Cf::Deadlist, b"").count(),
        0,
        "{ctx}: dead lists"
    );
    for cf in [Cf::Inode, Cf::Dirent, Cf::Extent, Cf::Xattr] {
        let mut objects = std::collections::HashSet::new();
        for item in kv.scan_prefix(cf, b"") {
            let (k, v) = item.expect("scan");
            assert!(
                tombstones || !dedupfs::format::is_tombstone(&v),
                "{ctx}: {cf:?} tombstone {} left behind",
                hex::encode(&k)
            );
            let (object, _) = key::split_versioned(&k).expect("versioned key");
            assert!(
                objects.insert(object.to_vec()),
                "{ctx}: {cf:?} {} has two versions",
                hex::encode(object)
            );
        }
    }
    let mut named = std::collections::HashSet::new();
    for item in kv.scan_prefix(Cf::Extent, b"") {
        let (_, v) = item.expect("scan");
        named.insert(ExtentRecord::decode(&v).expect("extent").chunk);
    }
    let mut stored = 0u64;
    for id in &named {
        stored += kv.get(Cf::Chunk, &id.0).expect("get").expect("chunk").len() as u64;
    }
    assert_eq!(
        kv.scan_prefix(Cf::Chunk, b"").count(),
        named.len(),
        "{ctx}: chunks"
    );
    assert_eq!(ns.counters().stored_bytes, stored, "{ctx}: stored bytes");
}

/// Random operations on a container (writes at random offsets, overwrites and large files
/// that re-chunk, truncates, renames, links, unlinks, mkdir/rmdir, chmod, utimens, xattrs,
/// symlinks, files held open with pending writes) interleaved with snapshot creation and
/// deletion and a reopen of the store. Every snapshot, read through `.snapshots`, must
/// equal a copy of the model taken when it was made, until it is deleted; the space a
/// deletion gives back is what `list_snapshots` promised; fsck is clean after every
/// snapshot creation and deletion; with every snapshot deleted, nothing of them is left.
#[test]
fn snapshots_match_a_model() {
    for seed in model_seeds(3001) {
        let avg = if seed % 2 == 1 { Some(4096) } else { None };
        run_snapshot_model(seed, 400, avg, None);
    }
}

/// The same with background commits: a snapshot is taken while commits are in flight.
#[test]
fn snapshots_with_background_commits_match_a_model() {
    for seed in model_seeds(4001) {
        run_snapshot_model(seed, 300, Some(4096), Some(16 << 10));
    }
}

/// Chooses a snapshot to delete: oldest, one in the middle, or newest.
fn pick_snapshot(rng: &mut impl rand::Rng, n: usize) -> usize {
    match rng.gen_range(0..3) {
        0 => 0,
        1 if n > 2 => rng.gen_range(1..n - 1),
        _ => n - 1,
    }
}

fn run_snapshot_model(seed: u64, steps: usize, avg: Option<u64>, dirty_limit: Option<usize>) {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let params = match avg {
        Some(a) => ChunkerParams::with_average(a).expect("params"),
        None => ChunkerParams::default(),
    };
    let mut fx = Fixture::with(params, Compression::Zstd(1));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pool = random(1 << 20, seed + 5000);
    let c = fx
        .ns()
        .create_container("s", ROOT, 0o755)
        .expect("container");
    let croot = c.root;
    if let Some(limit) = dirty_limit {
        fx.ns().set_dirty_limit(limit);
    }
    let mut model = SnapModel::new(croot, 0o755);
    let mut snaps: Vec<Frozen> = Vec::new();
    let mut handles: Vec<InodeNo> = Vec::new();
    // View inodes of deleted snapshots: they must stay unknown.
    let mut dead_views: Vec<InodeNo> = Vec::new();
    let mut deleted_names: Vec<String> = Vec::new();
    let mut next_name = 0;
    // Deletions by position: only one, oldest, middle, newest.
    let mut paths = [0usize; 4];
    let mut reopens = 0;
    let (mut rollbacks, mut clones) = (0, 0);
    // DEDUPFS_MODEL_TRACE=1 prints every operation, to find what broke a failing seed.
    let trace = std::env::var_os("DEDUPFS_MODEL_TRACE").is_some();
    let names: [&[u8]; 5] = [b"a", b"b", b"c", b"d", b"e"];
    let xnames: [&[u8]; 3] = [b"user.a", b"user.b", b"trusted.c"];
    let quiesce = |ns: &Namespace, handles: &[InodeNo]| {
        // fsck reads without a database snapshot: let background commits finish.
        if dirty_limit.is_some() {
            for h in handles {
                ns.flush(*h).expect("flush");
            }
        }
    };

    let data_for = |rng: &mut rand::rngs::StdRng, len: usize, salt: u64| -> Vec<u8> {
        match rng.gen_range(0..4) {
            0 => vec![0u8; len],
            1 | 2 => {
                let at = rng.gen_range(0..=pool.len() - len);
                pool[at..at + len].to_vec()
            }
            _ => random(len, salt),
        }
    };
    let mut step = 0;
    let final_phase = steps;
    while step < final_phase + 40 {
        let ctx = format!("seed {seed} step {step}");
        let op = if step >= final_phase {
            // The end: at least three snapshots, then all deleted (middle, oldest, newest,
            // then the rest), with a few changes in between.
            if snaps.len() < 3 && step < final_phase + 30 {
                if step % 3 == 0 {
                    88
                } else {
                    rng.gen_range(0..60)
                }
            } else if !snaps.is_empty() {
                93
            } else {
                break;
            }
        } else if step == steps / 2 && reopens == 0 {
            97
        } else {
            rng.gen_range(0..104)
        };
        step += 1;
        if op == 97 {
            // Reopen: pending writes go first (a drop without shutdown would lose them).
            for h in handles.drain(..) {
                fx.ns().release(h).expect(&ctx);
            }
            fx.reopen();
            if let Some(limit) = dirty_limit {
                fx.ns().set_dirty_limit(limit);
            }
            reopens += 1;
            let ns = fx.ns();
            let records = ns.snapshots_of(c.id);
            let frozen: Vec<SnapshotRecord> = snaps.iter().map(|s| s.rec.clone()).collect();
            assert_eq!(records, frozen, "{ctx}: snapshot records after reopen");
            check_all(
                ns,
                croot,
                &model,
                &mut snaps,
                &format!("{ctx} after reopen"),
            );
            for v in &dead_views {
                assert_eq!(
                    ns.getattr(*v).map(|a| a.ino),
                    Err(FsError::NotFound),
                    "{ctx}"
                );
            }
            fx.fsck_clean();
            continue;
        }
        let ns = fx.ns();
        let dirs: Vec<InodeNo> = model.tree.dirs.keys().copied().collect();
        let dir = *dirs.choose(&mut rng).expect("a directory");
        let name = *names.choose(&mut rng).expect("a name");
        let exists = model.tree.lookup(dir, name);
        let files: Vec<InodeNo> = model.tree.data.keys().copied().collect();
        let all: Vec<InodeNo> = model.tree.kind.keys().copied().collect();
        if trace {
            eprintln!(
                "{ctx}: op {op} in {dir:?} name {} ({exists:?}), open {handles:?}",
                lossy(name)
            );
        }
        let mut reopen_now = false;
        match op {
            0..=21 => {
                let Some(&f) = files.choose(&mut rng) else {
                    continue;
                };
                let len_now = model.tree.data[&f].len();
                let big = rng.gen_bool(0.1);
                let len = if big {
                    rng.gen_range(200_000..600_000)
                } else {
                    rng.gen_range(1..20_000)
                };
                let mut off = if big && rng.gen_bool(0.5) {
                    0
                } else if rng.gen_bool(0.05) {
                    len_now + rng.gen_range(0..100_000)
                } else {
                    rng.gen_range(0..=len_now)
                };
                off = off.min((1 << 20) - len);
                let data = data_for(&mut rng, len, seed << 32 | step as u64);
                ns.write(f, off as u64, &data).expect(&ctx);
                let m = model.tree.data.get_mut(&f).expect("file");
                if m.len() < off + len {
                    m.resize(off + len, 0);
                }
                m[off..off + len].copy_from_slice(&data);
                model.mtime.remove(&f);
            }
            22..=27 => {
                let Some(&f) = files.choose(&mut rng) else {
                    continue;
                };
                let m = model.tree.data.get_mut(&f).expect("file");
                let size = rng.gen_range(0..m.len() + 50_000);
                truncate(ns, f, size as u64);
                m.resize(size, 0);
                model.mtime.remove(&f);
            }
            28..=35 => {
                let perm = *[0o644u16, 0o600, 0o755, 0o4755]
                    .choose(&mut rng)
                    .expect("perm");
                let got = ns.create_file(dir, name, perm, ROOT).map(|a| a.ino);
                match exists {
                    Some(_) => assert_eq!(got, Err(FsError::Exists), "{ctx}"),
                    None => {
                        let ino = got.expect(&ctx);
                        model.add(dir, name, ino, Kind::File, perm);
                        let len = if rng.gen_bool(0.1) {
                            rng.gen_range(200_000..600_000)
                        } else {
                            rng.gen_range(0..30_000)
                        };
                        let data = data_for(&mut rng, len, seed << 32 | step as u64);
                        ns.write(ino, 0, &data).expect(&ctx);
                        model.tree.data.insert(ino, data);
                    }
                }
            }
            36..=40 => {
                let perm = *[0o755u16, 0o700, 0o1777, 0o750]
                    .choose(&mut rng)
                    .expect("perm");
                let got = ns
                    .make_node(dir, name, Kind::Dir, perm, 0, b"", ROOT)
                    .map(|a| a.ino);
                match exists {
                    Some(_) => assert_eq!(got, Err(FsError::Exists), "{ctx}"),
                    None => model.add(dir, name, got.expect(&ctx), Kind::Dir, perm),
                }
            }
            41..=43 => {
                let len = rng.gen_range(1..200);
                let target: Vec<u8> = (0..len).map(|_| rng.gen_range(b'!'..=b'~')).collect();
                let got = ns
                    .make_node(dir, name, Kind::Symlink, 0o777, 0, &target, ROOT)
                    .map(|a| a.ino);
                match exists {
                    Some(_) => assert_eq!(got, Err(FsError::Exists), "{ctx}"),
                    None => {
                        let ino = got.expect(&ctx);
                        model.add(dir, name, ino, Kind::Symlink, 0o777);
                        model.target.insert(ino, target);
                    }
                }
            }
            44..=48 => {
                let src = *all.choose(&mut rng).expect("an inode");
                let got = ns.link(src, dir, name, ROOT).map(|a| a.ino);
                if model.tree.kind[&src] == Kind::Dir {
                    assert_eq!(got, Err(FsError::NotPermitted), "{ctx}");
                } else if exists.is_some() {
                    assert_eq!(got, Err(FsError::Exists), "{ctx}");
                } else {
                    assert_eq!(got, Ok(src), "{ctx}");
                    model.tree.add_entry(dir, name, src);
                }
            }
            49..=55 => {
                let got = ns.unlink(dir, name, ROOT);
                match exists {
                    None => assert_eq!(got, Err(FsError::NotFound), "{ctx}"),
                    Some(ino) if model.tree.kind[&ino] == Kind::Dir => {
                        assert_eq!(got, Err(FsError::IsDir), "{ctx}")
                    }
                    Some(ino) => {
                        assert_eq!(got, Ok(()), "{ctx}");
                        model.tree.dirs.get_mut(&dir).expect("dir").remove(name);
                        model.tree.unref(ino);
                    }
                }
            }
            56..=59 => {
                let got = ns.rmdir(dir, name, ROOT);
                match exists {
                    None => assert_eq!(got, Err(FsError::NotFound), "{ctx}"),
                    Some(ino) if model.tree.kind[&ino] != Kind::Dir => {
                        assert_eq!(got, Err(FsError::NotDir), "{ctx}")
                    }
                    Some(ino) if !model.tree.dirs[&ino].is_empty() => {
                        assert_eq!(got, Err(FsError::NotEmpty), "{ctx}")
                    }
                    Some(ino) => {
                        assert_eq!(got, Ok(()), "{ctx}");
                        model.tree.dirs.get_mut(&dir).expect("dir").remove(name);
                        model.tree.unref(ino);
                    }
                }
            }
            60..=68 => {
                let to = *dirs.choose(&mut rng).expect("a directory");
                let to_name = *names.choose(&mut rng).expect("a name");
                let (noreplace, exchange) = match rng.gen_range(0..6) {
                    0 => (true, false),
                    1 => (false, true),
                    _ => (false, false),
                };
                let got = ns.rename(dir, name, to, to_name, noreplace, exchange, ROOT);
                let want = model
                    .tree
                    .rename((dir, name), (to, to_name), noreplace, exchange);
                assert_eq!(got, want, "{ctx}: rename");
            }
            69..=72 => {
                let ino = *all.choose(&mut rng).expect("an inode");
                if model.tree.kind[&ino] == Kind::Symlink {
                    continue;
                }
                let mode = *[0o600u32, 0o644, 0o755, 0o4755, 0o640, 0o777, 0o1755]
                    .choose(&mut rng)
                    .expect("mode");
                let set = SetAttr {
                    mode: Some(mode),
                    ..Default::default()
                };
                ns.setattr(ino, &set, ROOT).expect(&ctx);
                model.perm.insert(ino, mode as u16);
            }
            73..=75 => {
                let ino = *all.choose(&mut rng).expect("an inode");
                let mtime = rng.gen_range(0..2_000_000_000i64) * 1_000_000_000
                    + rng.gen_range(0..1_000_000_000);
                let set = SetAttr {
                    atime: Some(Some(mtime - 5)),
                    mtime: Some(Some(mtime)),
                    ..Default::default()
                };
                if handles.contains(&ino) {
                    // utimens while writes are pending is lost to the writes' time
                    // (utimens_while_writes_are_pending_is_kept); not what this test is about.
                    ns.flush(ino).expect(&ctx);
                }
                ns.setattr(ino, &set, ROOT).expect(&ctx);
                if model.tree.kind[&ino] != Kind::Dir {
                    model.mtime.insert(ino, mtime);
                }
            }
            76..=80 => {
                let ino = *all.choose(&mut rng).expect("an inode");
                let xname = *xnames.choose(&mut rng).expect("xattr name");
                let value = random(rng.gen_range(0..300), seed << 32 | step as u64);
                let (create, replace) = match rng.gen_range(0..4) {
                    0 => (true, false),
                    1 => (false, true),
                    _ => (false, false),
                };
                let had = model
                    .xattrs
                    .get(&ino)
                    .is_some_and(|x| x.contains_key(xname));
                let got = ns.setxattr(ino, xname, &value, create, replace, ROOT);
                if create && had {
                    assert_eq!(got, Err(FsError::Exists), "{ctx}");
                } else if replace && !had {
                    assert_eq!(got, Err(FsError::NoAttr), "{ctx}");
                } else {
                    assert_eq!(got, Ok(()), "{ctx}");
                    model
                        .xattrs
                        .entry(ino)
                        .or_default()
                        .insert(xname.to_vec(), value);
                }
            }
            81..=83 => {
                let ino = *all.choose(&mut rng).expect("an inode");
                let xname = *xnames.choose(&mut rng).expect("xattr name");
                let had = model
                    .xattrs
                    .get(&ino)
                    .is_some_and(|x| x.contains_key(xname));
                let got = ns.removexattr(ino, xname, ROOT);
                if had {
                    assert_eq!(got, Ok(()), "{ctx}");
                    model.xattrs.get_mut(&ino).expect("xattrs").remove(xname);
                } else {
                    assert_eq!(got, Err(FsError::NoAttr), "{ctx}");
                }
            }
            84..=87 => {
                if !handles.is_empty() && rng.gen_bool(0.5) {
                    let i = rng.gen_range(0..handles.len());
                    let f = handles.swap_remove(i);
                    ns.release(f).expect(&ctx);
                } else if let Some(&f) = files.choose(&mut rng) {
                    ns.open(f).expect(&ctx);
                    handles.push(f);
                }
            }
            88..=92 => {
                if snaps.len() >= 6 {
                    continue;
                }
                // Now and then a name that a deleted snapshot had.
                let name = match deleted_names.choose(&mut rng) {
                    Some(n) if rng.gen_bool(0.3) => n.clone(),
                    _ => {
                        next_name += 1;
                        format!("snap-{next_name}")
                    }
                };
                let rec = ns.create_snapshot("s", Some(&name)).expect(&ctx);
                if trace {
                    eprintln!("{ctx}: snapshot {name} at epoch {:?}", rec.epoch);
                }
                deleted_names.retain(|n| *n != name);
                assert_eq!(rec.name, name, "{ctx}");
                assert_eq!(
                    ns.create_snapshot("s", Some(&name)).map(|_| ()),
                    Err(FsError::Exists),
                    "{ctx}: a second snapshot of one name"
                );
                let counts = (
                    model.tree.data.len() as u64,
                    model.tree.dirs.len() as u64 - 1,
                );
                assert_eq!((rec.files, rec.dirs), counts, "{ctx}: snapshot counts");
                let live = ns.container_by_name("s").expect("container");
                assert_eq!(rec.logical_bytes, live.logical_bytes, "{ctx}");
                let attrs = model
                    .tree
                    .kind
                    .keys()
                    .map(|ino| (*ino, ns.getattr(*ino).expect(&ctx).rec))
                    .collect();
                snaps.push(Frozen {
                    rec,
                    model: model.clone(),
                    attrs,
                    view_inos: None,
                });
                let last = snaps.last_mut().expect("just pushed");
                check_snapshot(ns, croot, last, &ctx);
                quiesce(ns, &handles);
                fx.fsck_clean();
            }
            93..=96 => {
                if snaps.is_empty() {
                    continue;
                }
                let n = snaps.len();
                let i = if step > final_phase {
                    // The end: middle, oldest, newest, then in order.
                    match paths {
                        [_, _, 0, _] if n > 2 => n / 2,
                        [_, 0, _, _] if n > 1 => 0,
                        [_, _, _, 0] if n > 1 => n - 1,
                        _ => pick_snapshot(&mut rng, n),
                    }
                } else {
                    pick_snapshot(&mut rng, n)
                };
                let path = match (i, n) {
                    (_, 1) => 0,
                    (0, _) => 1,
                    (i, n) if i + 1 == n => 3,
                    _ => 2,
                };
                let name = snaps[i].rec.name.clone();
                // An open file of the snapshot keeps it.
                if let Some((m, v)) = snaps[i].view_inos.as_ref().and_then(|inos| {
                    inos.iter()
                        .find(|(m, _)| snaps[i].model.tree.kind[m] == Kind::File)
                        .map(|(m, v)| (*m, *v))
                }) {
                    ns.open(v).expect(&ctx);
                    assert_eq!(
                        ns.delete_snapshot("s", &name).map(|_| ()),
                        Err(FsError::Busy),
                        "{ctx}: snapshot with an open file ({m:?})"
                    );
                    ns.release(v).expect(&ctx);
                }
                // Background commits landing in between would change what it holds.
                quiesce(ns, &handles);
                let info = ns.list_snapshots("s").expect(&ctx);
                let listed: Vec<&str> = info.iter().map(|s| s.name.as_str()).collect();
                let want: Vec<&str> = snaps.iter().map(|s| s.rec.name.as_str()).collect();
                assert_eq!(listed, want, "{ctx}: list_snapshots");
                for (s, f) in info.iter().zip(&snaps) {
                    assert_eq!(
                        (s.id, s.created_ns, s.files, s.dirs, s.logical_bytes),
                        (
                            f.rec.id.0,
                            f.rec.created_ns,
                            f.rec.files,
                            f.rec.dirs,
                            f.rec.logical_bytes
                        ),
                        "{ctx}: list_snapshots of {}",
                        s.name
                    );
                }
                let promised = info[i].reclaimable_bytes;
                let before = ns.counters().stored_bytes;
                let deleted = ns.delete_snapshot("s", &name).expect(&ctx);
                if trace {
                    eprintln!("{ctx}: deleted snapshot {name} ({i} of {n})");
                }
                let after = ns.counters().stored_bytes;
                assert_eq!(deleted.reclaimed_bytes, before - after, "{ctx}: reclaimed");
                assert_eq!(
                    deleted.reclaimed_bytes, promised,
                    "{ctx}: reclaimed differs from what list_snapshots promised"
                );
                paths[path] += 1;
                let gone = snaps.remove(i);
                if let Some(inos) = &gone.view_inos {
                    dead_views.extend(inos.values().copied());
                }
                deleted_names.push(name.clone());
                let dir = ns.lookup(croot, SNAPSHOTS_DIR).expect(&ctx).ino;
                assert_eq!(
                    ns.lookup(dir, name.as_bytes()).map(|a| a.ino),
                    Err(FsError::NotFound),
                    "{ctx}: deleted snapshot"
                );
                assert_eq!(
                    ns.delete_snapshot("s", &name).map(|_| ()),
                    Err(FsError::NotFound),
                    "{ctx}"
                );
                for v in &dead_views {
                    assert_eq!(
                        ns.getattr(*v).map(|a| a.ino),
                        Err(FsError::NotFound),
                        "{ctx}"
                    );
                }
                check_all(ns, croot, &model, &mut snaps, &ctx);
                quiesce(ns, &handles);
                fx.fsck_clean();
            }
            98 | 99 => {
                if let Some(s) = snaps.choose(&mut rng) {
                    if s.view_inos.is_some() {
                        check_read_only(ns, croot, s, &ctx);
                    }
                }
            }
            100 | 101 => {
                // Rollback to a random snapshot: newer ones go, live is the snapshot again.
                if snaps.is_empty() {
                    continue;
                }
                let i = rng.gen_range(0..snaps.len());
                let name = snaps[i].rec.name.clone();
                if !handles.is_empty() {
                    assert_eq!(
                        ns.rollback("s", &name, false, true).map(|_| ()),
                        Err(FsError::Busy),
                        "{ctx}: rollback with open files"
                    );
                    for h in handles.drain(..) {
                        ns.release(h).expect(&ctx);
                    }
                }
                let newer = snaps.len() - 1 - i;
                if newer > 0 {
                    assert_eq!(
                        ns.rollback("s", &name, false, false).map(|_| ()),
                        Err(FsError::NotEmpty),
                        "{ctx}: rollback past newer snapshots"
                    );
                }
                let done = ns.rollback("s", &name, false, true).expect(&ctx);
                if trace {
                    eprintln!("{ctx}: rolled back to {name}: {done:?}");
                }
                rollbacks += 1;
                assert_eq!(done.snapshots_deleted, newer as u64, "{ctx}");
                for gone in snaps.drain(i + 1..) {
                    if let Some(inos) = &gone.view_inos {
                        dead_views.extend(inos.values().copied());
                    }
                    deleted_names.push(gone.rec.name.clone());
                }
                model = snaps[i].model.clone();
                for (ino, want) in &snaps[i].attrs {
                    let got = ns.getattr(*ino).expect(&ctx).rec;
                    assert_eq!(&got, want, "{ctx}: {ino:?} after rollback to {name}");
                }
                check_all(ns, croot, &model, &mut snaps, &format!("{ctx} rollback"));
                for v in &dead_views {
                    assert_eq!(
                        ns.getattr(*v).map(|a| a.ino),
                        Err(FsError::NotFound),
                        "{ctx}"
                    );
                }
                fx.fsck_clean();
                // A snapshot taken while an unlinked file was open restores it as an
                // orphan that no one holds; a later rollback past it would keep it
                // (rollback_past_a_restored_orphan). The next open reclaims it.
                let orphans = ns
                    .store()
                    .kv
                    .scan_prefix(Cf::Meta, dedupfs::format::meta::ORPHAN_PREFIX)
                    .count();
                reopen_now = orphans > 0;
            }
            102 | 103 => {
                // A clone of a random snapshot holds what the snapshot holds, and changes
                // to it reach neither the snapshot nor the container.
                let Some(snap) = snaps.choose(&mut rng) else {
                    continue;
                };
                let clone = ns
                    .clone_container("s", &snap.rec.name, "clone")
                    .expect(&ctx);
                let cctx = format!("{ctx}: clone of {}", snap.rec.name);
                clones += 1;
                let found = check_against(ns, &snap.model, None, clone.root, croot, &cctx);
                let live_inos: std::collections::HashSet<InodeNo> =
                    model.tree.kind.keys().copied().collect();
                for (m, ino) in &found {
                    assert!(!live_inos.contains(ino), "{cctx}: {m:?} shares {ino:?}");
                }
                for (m, ino) in &found {
                    if snap.model.tree.kind[m] == Kind::File {
                        ns.write(*ino, 0, b"changed in the clone").expect(&cctx);
                    } else if snap.model.tree.kind[m] == Kind::Dir {
                        let _ = ns.create_file(*ino, b"clone-only", 0o644, ROOT);
                    }
                }
                quiesce(ns, &handles);
                fx.fsck_clean();
                ns.delete_container("clone", true).expect(&cctx);
                check_all(ns, croot, &model, &mut snaps, &cctx);
                quiesce(ns, &handles);
                fx.fsck_clean();
            }
            _ => {}
        }
        if step % 10 == 0 {
            check_against(ns, &model, None, croot, croot, &format!("{ctx}: live"));
        }
        if step % 40 == 0 {
            check_all(ns, croot, &model, &mut snaps, &ctx);
            quiesce(ns, &handles);
            fx.fsck_clean();
        }
        if reopen_now {
            fx.reopen();
            if let Some(limit) = dirty_limit {
                fx.ns().set_dirty_limit(limit);
            }
            reopens += 1;
            check_all(
                fx.ns(),
                croot,
                &model,
                &mut snaps,
                &format!("{ctx} reopened"),
            );
            fx.fsck_clean();
        }
    }
    assert!(
        snaps.is_empty(),
        "seed {seed}: snapshots left: {}",
        snaps.len()
    );
    assert!(
        paths.iter().all(|n| *n > 0),
        "seed {seed}: deletions by position (only, oldest, middle, newest): {paths:?}"
    );
    assert_eq!(reopens.min(1), 1);
    eprintln!(
        "seed {seed}: {next_name} snapshots named, deletions (only, oldest, middle, newest) \
         {paths:?}, {rollbacks} rollback(s), {clones} clone(s), {reopens} reopen(s), {} inodes \
         at the end",
        model.tree.kind.len()
    );
    let ctx = format!("seed {seed} end");
    for h in handles.drain(..) {
        fx.ns().release(h).expect(&ctx);
    }
    let ns = fx.ns();
    let dir = ns.lookup(croot, SNAPSHOTS_DIR).expect(&ctx).ino;
    assert_eq!(ns.readdir(dir).expect(&ctx), vec![], "{ctx}");
    check_against(ns, &model, None, croot, croot, &ctx);
    fx.fsck_clean();
    check_leftovers(ns, rollbacks > 0, &ctx);
    fx.reopen();
    check_against(
        fx.ns(),
        &model,
        None,
        croot,
        croot,
        &format!("{ctx} after reopen"),
    );
    fx.fsck_clean();
}

/// utimens on a file whose writes are still pending (cp -p sets the times on the open
/// file before closing it) must stick: the pending writes' time may not override it.
#[test]
fn utimens_while_writes_are_pending_is_kept() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = create(ns, c.root, "f");
    ns.open(f).expect("open");
    ns.write(f, 0, b"pending").expect("write");
    let set = SetAttr {
        mtime: Some(Some(1_000_000_000)),
        ..Default::default()
    };
    let got = ns.setattr(f, &set, ROOT).expect("utimens");
    assert_eq!(got.rec.mtime, 1_000_000_000, "setattr reply");
    assert_eq!(
        ns.getattr(f).expect("getattr").rec.mtime,
        1_000_000_000,
        "getattr while open"
    );
    ns.release(f).expect("release");
    assert_eq!(
        ns.getattr(f).expect("getattr").rec.mtime,
        1_000_000_000,
        "after release"
    );
}

/// The view root of snapshot `name` of the container whose root is `c_root`.
fn snapshot_root(ns: &Namespace, c_root: InodeNo, name: &str) -> InodeNo {
    let dir = ns.lookup(c_root, SNAPSHOTS_DIR).expect(".snapshots").ino;
    ns.lookup(dir, name.as_bytes()).expect("snapshot").ino
}

/// A file deleted after a snapshot still reads back whole through the snapshot; its space
/// stays taken until the snapshot goes, and then all of it comes back.
#[test]
fn deleted_file_lives_on_in_a_snapshot_until_it_is_deleted() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    file_with(ns, c.root, "keep", &random(100_000, 100));
    let empty = ns.counters();
    let data = random(3 * MIB as usize, 101);
    let f = file_with(ns, c.root, "big", &data);
    let full = ns.counters();
    assert!(full.stored_bytes > empty.stored_bytes + 2 * MIB);
    ns.create_snapshot("c", Some("before")).expect("snapshot");
    ns.unlink(c.root, b"big", ROOT).expect("unlink");
    assert_eq!(
        ns.lookup(c.root, b"big").map(|a| a.ino),
        Err(FsError::NotFound)
    );
    let after_unlink = ns.counters();
    assert_eq!(
        after_unlink.stored_bytes, full.stored_bytes,
        "the snapshot holds it"
    );
    assert_eq!(
        after_unlink.logical_bytes, empty.logical_bytes,
        "live bytes drop"
    );
    let root = snapshot_root(ns, c.root, "before");
    let view = ns.lookup(root, b"big").expect("in the snapshot");
    assert_ne!(view.ino, f);
    assert_eq!(view.rec.size, data.len() as u64);
    assert!(read_all(ns, view.ino) == data, "contents in the snapshot");
    let info = ns.list_snapshots("c").expect("list");
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].exclusive_logical_bytes, data.len() as u64);
    assert_eq!(
        info[0].reclaimable_bytes,
        full.stored_bytes - empty.stored_bytes
    );
    fx.fsck_clean();
    let deleted = ns.delete_snapshot("c", "before").expect("delete");
    assert_eq!(
        deleted.reclaimed_bytes,
        full.stored_bytes - empty.stored_bytes
    );
    assert_eq!(ns.counters(), empty, "everything the file held is back");
    assert_eq!(ns.getattr(view.ino).map(|a| a.ino), Err(FsError::NotFound));
    fx.fsck_clean();
    check_no_snapshot_leftovers(ns, "after delete");
}

/// Snapshot files read without an open, as a restore mount's kernel reads them: pieces of
/// many files interleaved (more files than the namespace keeps extent maps of) read back
/// exactly, and once the snapshot is deleted none of them is served from a kept map.
#[test]
fn snapshot_files_read_without_an_open() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let files: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            (
                format!("f{i}"),
                random(300_000 + 70_000 * i, 500 + i as u64),
            )
        })
        .collect();
    for (name, data) in &files {
        file_with(ns, c.root, name, data);
    }
    ns.create_snapshot("c", Some("s")).expect("snapshot");
    for (name, _) in &files {
        ns.unlink(c.root, name.as_bytes(), ROOT).expect("unlink");
    }
    let root = snapshot_root(ns, c.root, "s");
    let views: Vec<InodeNo> = files
        .iter()
        .map(|(name, _)| {
            ns.lookup(root, name.as_bytes())
                .expect("in the snapshot")
                .ino
        })
        .collect();
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); files.len()];
    let piece = 48_000u32;
    loop {
        let mut more = false;
        for (i, view) in views.iter().enumerate() {
            let at = got[i].len() as u64;
            let data = ns.read(*view, at, piece).expect("read");
            more |= !data.is_empty();
            got[i].extend_from_slice(&data);
        }
        if !more {
            break;
        }
    }
    for ((name, data), got) in files.iter().zip(&got) {
        assert!(got == data, "{name} reads back");
    }
    let (name, data) = &files[5];
    let back = ns
        .read(views[5], 123_457, 200_000)
        .expect("read in the middle");
    assert!(back[..] == data[123_457..323_457], "{name} from the middle");
    fx.fsck_clean();
    ns.delete_snapshot("c", "s").expect("delete");
    for view in &views {
        assert_eq!(
            ns.read(*view, 0, piece).map(|d| d.len()),
            Err(FsError::NotFound)
        );
    }
    fx.fsck_clean();
}

/// A big snapshot file (past the size whose whole extent map is kept) read without an open,
/// a range of extents at a time: pieces across chunk ends and holes read back exactly.
#[test]
fn big_snapshot_file_read_without_an_open() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = create(ns, c.root, "big");
    let pieces = [(0, 61), (200 * MIB, 62), (299 * MIB + 12_345, 63)];
    for (at, seed) in pieces {
        ns.write(f, at, &random(MIB as usize, seed)).expect("write");
    }
    let size = 300 * MIB + 12_345;
    assert_eq!(ns.getattr(f).expect("getattr").rec.size, size);
    ns.create_snapshot("c", Some("s")).expect("snapshot");
    let view = ns
        .lookup(snapshot_root(ns, c.root, "s"), b"big")
        .expect("in the snapshot")
        .ino;
    let expect = |at: u64, len: u64| -> Vec<u8> {
        let mut out = vec![0u8; len.min(size.saturating_sub(at)) as usize];
        for (start, seed) in pieces {
            let data = random(MIB as usize, seed);
            for (i, b) in out.iter_mut().enumerate() {
                let p = at + i as u64;
                if p >= start && p < start + MIB {
                    *b = data[(p - start) as usize];
                }
            }
        }
        out
    };
    for (at, len) in [
        (0, 70_000),
        (MIB - 50_000, 100_000),
        (5 * MIB, 4096),
        (200 * MIB - 10, 300_000),
        (200 * MIB + 123_457, 131_072),
        (299 * MIB, 2 * MIB),
        (size - 5, 100),
    ] {
        let got = ns.read(view, at, len as u32).expect("read");
        assert!(got == expect(at, len), "read of {len} at {at}");
    }
    fx.fsck_clean();
}

/// Overwriting a large file after a snapshot keeps the old chunks for the snapshot only:
/// the snapshot reads the old bytes, live the new, and deleting the snapshot gives back
/// exactly the chunks only the old version used.
#[test]
fn overwritten_data_is_kept_for_the_snapshot_only() {
    let fx = Fixture::with(
        ChunkerParams::with_average(4096).expect("params"),
        Compression::Zstd(1),
    );
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let old = random(600_000, 110);
    let f = file_with(ns, c.root, "f", &old);
    ns.create_snapshot("c", Some("s")).expect("snapshot");
    let mut new = old.clone();
    new[100_000..300_000].copy_from_slice(&random(200_000, 111));
    ns.write(f, 100_000, &new[100_000..300_000])
        .expect("overwrite");
    truncate(ns, f, 500_000);
    new.truncate(500_000);
    let root = snapshot_root(ns, c.root, "s");
    let view = ns.lookup(root, b"f").expect("lookup").ino;
    assert!(read_all(ns, view) == old, "snapshot keeps the old bytes");
    assert!(read_all(ns, f) == new, "live has the new ones");
    fx.fsck_clean();
    let before = ns.counters().stored_bytes;
    let promised = ns.list_snapshots("c").expect("list")[0].reclaimable_bytes;
    assert!(
        promised > 200_000,
        "about 300 KB were only in the snapshot: {promised}"
    );
    let deleted = ns.delete_snapshot("c", "s").expect("delete");
    assert_eq!(deleted.reclaimed_bytes, promised);
    assert_eq!(before - ns.counters().stored_bytes, promised);
    assert!(read_all(ns, f) == new);
    fx.fsck_clean();
    check_no_snapshot_leftovers(ns, "after delete");
}

/// A snapshot holds what was written before it, pending writes of open files included;
/// writes to the still open file after it do not reach it.
#[test]
fn snapshot_includes_pending_writes_of_open_files() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = file_with(ns, c.root, "f", b"committed ");
    ns.open(f).expect("open");
    ns.write(f, 10, b"pending").expect("write");
    let g = create(ns, c.root, "g");
    ns.open(g).expect("open");
    let big = random(300_000, 120);
    ns.write(g, 0, &big).expect("write");
    let on_disk = ns.counters().logical_bytes;
    assert_eq!(on_disk, 10, "the writes are still pending");
    ns.create_snapshot("c", Some("s")).expect("snapshot");
    ns.write(f, 0, b"COMMITTED").expect("write after");
    ns.write(g, 1000, b"later").expect("write after");
    let root = snapshot_root(ns, c.root, "s");
    let vf = ns.lookup(root, b"f").expect("f").ino;
    let vg = ns.lookup(root, b"g").expect("g").ino;
    assert_eq!(read_all(ns, vf), b"committed pending");
    assert!(
        read_all(ns, vg) == big,
        "pending 300 KB are in the snapshot"
    );
    ns.release(f).expect("release");
    ns.release(g).expect("release");
    assert_eq!(read_all(ns, vf), b"committed pending", "after release");
    assert_eq!(read_all(ns, f), b"COMMITTED pending");
    assert_eq!(&read_all(ns, g)[1000..1005], b"later");
    assert!(read_all(ns, vg) == big);
    fx.fsck_clean();
}

/// Every mutating call on a snapshot view is EROFS and changes nothing; views have their
/// own inode numbers (hard links share one), distinct from live and other snapshots.
#[test]
fn snapshot_views_are_read_only() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let mut model = SnapModel::new(c.root, 0o755);
    let d = mkdir(ns, c.root, "d");
    model.add(c.root, b"d", d, Kind::Dir, 0o755);
    let f = file_with(ns, d, "f", b"contents");
    model.add(d, b"f", f, Kind::File, 0o644);
    model.tree.data.insert(f, b"contents".to_vec());
    ns.link(f, c.root, b"f-link", ROOT).expect("link");
    model.tree.add_entry(c.root, b"f-link", f);
    ns.setxattr(f, b"user.a", b"value", false, false, ROOT)
        .expect("setxattr");
    model
        .xattrs
        .entry(f)
        .or_default()
        .insert(b"user.a".to_vec(), b"value".to_vec());
    let l = ns
        .make_node(c.root, b"l", Kind::Symlink, 0o777, 0, b"d/f", ROOT)
        .expect("symlink")
        .ino;
    model.add(c.root, b"l", l, Kind::Symlink, 0o777);
    model.target.insert(l, b"d/f".to_vec());
    for (name, kind, rdev) in [
        (&b"fifo"[..], Kind::Fifo, 0),
        (b"tty", Kind::CharDev, 0x0405),
    ] {
        let ino = ns
            .make_node(d, name, kind, 0o620, rdev, b"", ROOT)
            .expect("mknod")
            .ino;
        model.add(d, name, ino, kind, 0o620);
    }
    let mut snaps = Vec::new();
    for name in ["one", "two"] {
        let rec = ns.create_snapshot("c", Some(name)).expect("snapshot");
        let attrs = model
            .tree
            .kind
            .keys()
            .map(|ino| (*ino, ns.getattr(*ino).expect("getattr").rec))
            .collect();
        snaps.push(Frozen {
            rec,
            model: model.clone(),
            attrs,
            view_inos: None,
        });
    }
    check_all(ns, c.root, &model, &mut snaps, "before");
    let one = snaps[0].view_inos.clone().expect("checked");
    let two = snaps[1].view_inos.clone().expect("checked");
    for (m, v) in &one {
        assert_ne!(*m, *v);
        assert_ne!(two[m], *v, "{m:?}: two snapshots, one number");
    }
    for s in &snaps {
        check_read_only(ns, c.root, s, "read-only");
    }
    // An open view file is read-only too; flush and fsync do nothing.
    let vf = one[&f];
    ns.open(vf).expect("open");
    assert_eq!(ns.write(vf, 0, b"x"), Err(FsError::ReadOnly));
    assert_eq!(ns.flush(vf), Ok(()));
    assert_eq!(ns.fsync(vf), Ok(()));
    ns.release(vf).expect("release");
    assert_eq!(ns.open(one[&c.root]).map(|_| ()), Err(FsError::IsDir));
    let dir = ns.lookup(c.root, SNAPSHOTS_DIR).expect(".snapshots").ino;
    assert_eq!(ns.open(dir).map(|_| ()), Err(FsError::IsDir));
    assert_eq!(ns.listxattr(dir), Ok(Vec::new()));
    assert_eq!(ns.getxattr(dir, b"user.a"), Err(FsError::NoAttr));
    assert_eq!(
        ns.setxattr(dir, b"user.a", b"v", false, false, ROOT),
        Err(FsError::ReadOnly)
    );
    assert_eq!(ns.readlink(dir), Err(FsError::Invalid));
    check_all(ns, c.root, &model, &mut snaps, "after");
    fx.fsck_clean();
}

/// `.snapshots` is in no listing, is a reserved name in a container root only, and
/// snapshot names are checked.
#[test]
fn snapshots_dir_is_hidden_and_reserved() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    file_with(ns, c.root, "f", b"x");
    let sub = mkdir(ns, c.root, "sub");
    let dir = ns
        .lookup(c.root, SNAPSHOTS_DIR)
        .expect(".snapshots without snapshots");
    assert_eq!(dir.kind(), Kind::Dir);
    assert_eq!(dir.rec.perm, 0o555);
    assert_eq!(ns.readdir(dir.ino).expect("readdir"), vec![]);
    ns.create_snapshot("c", Some("s1")).expect("snapshot");
    assert_eq!(names(ns, c.root), ["f", "sub"], ".snapshots is not listed");
    let root = snapshot_root(ns, c.root, "s1");
    assert_eq!(names(ns, root), ["f", "sub"]);
    assert_eq!(
        ns.lookup(root, SNAPSHOTS_DIR).map(|a| a.ino),
        Err(FsError::NotFound),
        "no .snapshots inside a snapshot"
    );
    for kind in [Kind::File, Kind::Dir, Kind::Symlink] {
        assert_eq!(
            ns.make_node(c.root, SNAPSHOTS_DIR, kind, 0o755, 0, b"t", ROOT)
                .map(|_| ()),
            Err(FsError::Exists)
        );
    }
    assert_eq!(
        ns.rename(c.root, b"f", c.root, SNAPSHOTS_DIR, false, false, ROOT),
        Err(FsError::Exists)
    );
    assert_eq!(
        ns.rename(c.root, b"f", c.root, SNAPSHOTS_DIR, false, true, ROOT),
        Err(FsError::Exists)
    );
    // Below the root it is an ordinary name.
    let inner = mkdir(ns, sub, ".snapshots");
    assert!(!is_snapshot_ino(inner));
    assert_eq!(ns.lookup(sub, SNAPSHOTS_DIR).expect("lookup").ino, inner);
    assert_eq!(names(ns, sub), [".snapshots"]);
    // Names.
    for bad in ["", ".", "..", "a/b", "a@b", "a:b"] {
        assert_eq!(
            ns.create_snapshot("c", Some(bad)).map(|_| ()),
            Err(FsError::Invalid),
            "{bad:?}"
        );
    }
    assert_eq!(
        ns.create_snapshot("c", Some("s1")).map(|_| ()),
        Err(FsError::Exists)
    );
    assert_eq!(
        ns.create_snapshot("nope", Some("s")).map(|_| ()),
        Err(FsError::NotFound)
    );
    assert_eq!(ns.delete_snapshot("c", "nope"), Err(FsError::NotFound));
    let auto = ns.create_snapshot("c", None).expect("default name");
    assert!(
        auto.name.len() >= 16 && auto.name.ends_with('Z') && !auto.name.contains(':'),
        "{}",
        auto.name
    );
    assert!(is_snapshot_ino(snapshot_root(ns, c.root, &auto.name)));
    fx.fsck_clean();
}

/// A container with snapshots is not empty: deleting it needs force, is refused while a
/// snapshot file is open, and then leaves nothing behind.
#[test]
fn deleting_a_container_with_snapshots_needs_force() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let other = ns
        .create_container("other", ROOT, 0o755)
        .expect("container");
    let shared = random(500_000, 130);
    file_with(ns, other.root, "kept", &shared);
    let baseline = ns.counters();
    let f = file_with(ns, c.root, "f", &shared);
    file_with(ns, c.root, "g", &random(700_000, 131));
    ns.create_snapshot("c", Some("s1")).expect("s1");
    ns.unlink(c.root, b"g", ROOT).expect("unlink");
    ns.write(f, 0, &random(100_000, 132)).expect("overwrite");
    ns.create_snapshot("c", Some("s2")).expect("s2");
    ns.unlink(c.root, b"f", ROOT).expect("unlink");
    assert_eq!(
        ns.readdir(c.root).expect("readdir"),
        vec![],
        "live is empty"
    );
    assert_eq!(ns.delete_container("c", false), Err(FsError::NotEmpty));
    let root = snapshot_root(ns, c.root, "s1");
    let vg = ns.lookup(root, b"g").expect("g").ino;
    ns.open(vg).expect("open");
    assert_eq!(ns.delete_container("c", true), Err(FsError::Busy));
    assert_eq!(ns.snapshots_of(c.id).len(), 2, "nothing deleted while busy");
    ns.release(vg).expect("release");
    fx.fsck_clean();
    ns.delete_container("c", true).expect("delete");
    assert!(ns.container_by_name("c").is_none());
    assert_eq!(ns.snapshots_of(c.id), vec![]);
    assert_eq!(ns.getattr(vg).map(|a| a.ino), Err(FsError::NotFound));
    let mut want = baseline;
    want.dirs -= 1; // c's root
    assert_eq!(
        ns.counters(),
        want,
        "all that c and its snapshots held is back"
    );
    assert!(read_all(ns, ns.lookup(other.root, b"kept").expect("kept").ino) == shared);
    fx.fsck_clean();
    check_no_snapshot_leftovers(ns, "after container delete");
    // The name is free again, with no snapshots.
    let again = ns.create_container("c", ROOT, 0o755).expect("container");
    assert_ne!(again.id, c.id);
    let dir = ns
        .lookup(again.root, SNAPSHOTS_DIR)
        .expect(".snapshots")
        .ino;
    assert_eq!(ns.readdir(dir).expect("readdir"), vec![]);
    fx.fsck_clean();
}

/// Chunks shared with another container stay while either needs them: a snapshot of one
/// container holds its references alone.
#[test]
fn snapshot_of_one_container_leaves_the_other_alone() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let a = ns.create_container("a", ROOT, 0o755).expect("container");
    let b = ns.create_container("b", ROOT, 0o755).expect("container");
    let empty = ns.counters();
    let data = random(800_000, 140);
    let fa = file_with(ns, a.root, "f", &data);
    file_with(ns, b.root, "f", &data);
    let full = ns.counters();
    ns.create_snapshot("a", Some("s")).expect("snapshot");
    assert_eq!(ns.list_snapshots("b").expect("list").len(), 0);
    assert_eq!(
        ns.lookup(b.root, SNAPSHOTS_DIR)
            .and_then(|d| ns.readdir(d.ino))
            .expect("b/.snapshots"),
        vec![]
    );
    ns.unlink(b.root, b"f", ROOT).expect("unlink b/f");
    ns.write(fa, 0, &random(800_000, 141))
        .expect("overwrite a/f");
    assert!(ns.counters().stored_bytes > full.stored_bytes);
    let info = ns.list_snapshots("a").expect("list");
    assert_eq!(
        info[0].reclaimable_bytes,
        full.stored_bytes - empty.stored_bytes
    );
    let root = snapshot_root(ns, a.root, "s");
    assert!(read_all(ns, ns.lookup(root, b"f").expect("f").ino) == data);
    ns.unlink(a.root, b"f", ROOT).expect("unlink a/f");
    fx.fsck_clean();
    ns.delete_snapshot("a", "s").expect("delete");
    assert_eq!(ns.counters(), empty);
    fx.fsck_clean();
    check_no_snapshot_leftovers(ns, "end");
}

/// A directory moved after a snapshot is where it was in the snapshot, with its parent.
#[test]
fn renamed_directory_stays_in_place_in_the_snapshot() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let x = mkdir(ns, c.root, "x");
    let y = mkdir(ns, c.root, "y");
    let d = mkdir(ns, x, "d");
    file_with(ns, d, "f", b"in d");
    ns.create_snapshot("c", Some("s")).expect("snapshot");
    ns.rename(x, b"d", y, b"moved", false, false, ROOT)
        .expect("rename");
    ns.rmdir(c.root, b"x", ROOT).expect("rmdir");
    let root = snapshot_root(ns, c.root, "s");
    let vx = ns.lookup(root, b"x").expect("x");
    let vd = ns.lookup(vx.ino, b"d").expect("d");
    assert_eq!(vd.rec.parent, vx.ino);
    assert_eq!(vx.rec.parent, root);
    assert_eq!(vx.rec.nlink, 3);
    let vy = ns.lookup(root, b"y").expect("y");
    assert_eq!(ns.readdir(vy.ino).expect("readdir"), vec![]);
    assert_eq!(names(ns, c.root), ["y"]);
    assert_eq!(ns.getattr(d).expect("live d").rec.parent, y);
    let vf = ns.lookup(vd.ino, b"f").expect("f").ino;
    assert_eq!(read_all(ns, vf), b"in d");
    fx.fsck_clean();
    ns.delete_snapshot("c", "s").expect("delete");
    fx.fsck_clean();
    check_no_snapshot_leftovers(ns, "end");
}

/// The purged inode's newest extent or xattr version is a tombstone that a snapshot still
/// sees: deleting an older snapshot must not drop it while a dead list names it.
#[test]
fn removed_file_with_tombstones_seen_by_a_snapshot() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let f = file_with(ns, c.root, "f", b"data");
    ns.setxattr(f, b"user.x", b"v0", false, false, ROOT)
        .expect("setxattr");
    ns.create_snapshot("c", Some("s1")).expect("s1");
    ns.removexattr(f, b"user.x", ROOT).expect("removexattr");
    truncate(ns, f, 0);
    ns.create_snapshot("c", Some("s2")).expect("s2");
    ns.unlink(c.root, b"f", ROOT).expect("unlink");
    fx.fsck_clean();
    ns.delete_snapshot("c", "s1").expect("delete s1");
    fx.fsck_clean();
    let root = snapshot_root(ns, c.root, "s2");
    let vf = ns.lookup(root, b"f").expect("f").ino;
    assert_eq!(read_all(ns, vf), b"");
    assert_eq!(ns.listxattr(vf).expect("listxattr"), b"");
    ns.delete_snapshot("c", "s2").expect("delete s2");
    fx.fsck_clean();
    check_no_snapshot_leftovers(ns, "end");
}

/// A container may not be named `.snapshots` either: it could never be looked up.
#[test]
fn container_named_like_the_snapshots_dir() {
    let fx = Fixture::new();
    let ns = fx.ns();
    match ns.create_container(".snapshots", ROOT, 0o755) {
        Err(e) => assert_eq!(e, FsError::Invalid),
        Ok(rec) => {
            assert_eq!(names(ns, InodeNo::ROOT), [".snapshots"]);
            assert_eq!(
                ns.lookup(InodeNo::ROOT, b".snapshots").map(|a| a.ino),
                Ok(rec.root),
                "listed but not found"
            );
        }
    }
}

/// Snapshots taken and deleted while writers overwrite their files (with background
/// commits in flight): every file in every snapshot is one whole write, never a mix of
/// two, and later snapshots never hold older writes.
#[test]
fn snapshots_taken_while_files_are_written() {
    const SIZE: usize = 256 << 10;
    const WRITES: usize = 60;
    let fx = Fixture::with(
        ChunkerParams::with_average(4096).expect("params"),
        Compression::Zstd(1),
    );
    let ns = fx.shared();
    ns.set_dirty_limit(64 << 10);
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    let generations = |t: u64| -> Vec<Vec<u8>> {
        (0..WRITES as u64)
            .map(|g| random(SIZE, t * 1000 + g))
            .collect()
    };
    let files: Vec<InodeNo> = (0..3)
        .map(|t| file_with(&ns, c.root, &format!("w{t}"), &generations(t)[0]))
        .collect();
    let writers: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(t, &f)| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                let gens = generations(t as u64);
                // Held open: writes stay pending or in background commits.
                ns.open(f).expect("open");
                for g in gens.iter().skip(1) {
                    ns.write(f, 0, g).expect("write");
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                ns.release(f).expect("release");
            })
        })
        .collect();
    // An appender: streaming appends hold back the unfinished last chunk.
    let stream = random(4 << 20, 150);
    let log = create(&ns, c.root, "log");
    let appender = {
        let (ns, stream) = (ns.clone(), stream.clone());
        std::thread::spawn(move || {
            ns.open(log).expect("open");
            for (i, piece) in stream.chunks(37_000).enumerate() {
                ns.write(log, (i * 37_000) as u64, piece).expect("append");
                if i % 8 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            ns.release(log).expect("release");
        })
    };
    let mut taken = Vec::new();
    for i in 0..25 {
        let name = format!("s{i}");
        ns.create_snapshot("c", Some(&name)).expect("snapshot");
        taken.push(name);
        if i % 4 == 3 {
            let gone = taken.remove(taken.len() / 2);
            ns.delete_snapshot("c", &gone).expect("delete");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for w in writers {
        w.join().expect("writer");
    }
    appender.join().expect("appender");
    let mut last = vec![0usize; files.len()];
    let mut log_len = 0;
    for name in &taken {
        let root = snapshot_root(&ns, c.root, name);
        let v = ns.lookup(root, b"log").expect("log").ino;
        let got = read_all(&ns, v);
        assert!(got.len() >= log_len, "snapshot {name}: the log shrank");
        assert!(
            got == stream[..got.len()],
            "snapshot {name}: log of {} bytes is no prefix",
            got.len()
        );
        log_len = got.len();
        for (t, last) in last.iter_mut().enumerate() {
            let v = ns
                .lookup(root, format!("w{t}").as_bytes())
                .expect("file")
                .ino;
            let got = read_all(&ns, v);
            let gens = generations(t as u64);
            let Some(g) = gens.iter().position(|d| *d == got) else {
                panic!("snapshot {name}: w{t} is no single write");
            };
            assert!(
                g >= *last,
                "snapshot {name}: w{t} went back from {last} to {g}"
            );
            *last = g;
        }
    }
    fx.fsck_clean();
    for name in &taken {
        ns.delete_snapshot("c", name).expect("delete");
    }
    fx.fsck_clean();
    check_no_snapshot_leftovers(&ns, "end");
}

/// A file unlinked while open, around snapshots, and left open when the process ends:
/// the snapshot keeps what it saw, the orphan is reclaimed at the next open, and once the
/// snapshots go nothing of it is left.
#[test]
fn orphans_and_snapshots() {
    let mut fx = Fixture::new();
    let (c, empty) = {
        let ns = fx.ns();
        let c = ns.create_container("c", ROOT, 0o755).expect("container");
        let empty = ns.counters();
        let old = random(400_000, 160);
        let f = file_with(ns, c.root, "f", &old);
        ns.create_snapshot("c", Some("before")).expect("snapshot");
        ns.open(f).expect("open");
        ns.unlink(c.root, b"f", ROOT).expect("unlink");
        ns.write(f, 100_000, &random(50_000, 161))
            .expect("write to the orphan");
        ns.flush(f).expect("flush");
        // A snapshot of the orphan's state: it has no name there.
        ns.create_snapshot("c", Some("orphan")).expect("snapshot");
        ns.write(f, 0, &random(50_000, 162))
            .expect("write to the orphan");
        let root = snapshot_root(ns, c.root, "orphan");
        assert_eq!(ns.readdir(root).expect("readdir"), vec![]);
        let root = snapshot_root(ns, c.root, "before");
        let v = ns.lookup(root, b"f").expect("f").ino;
        assert!(read_all(ns, v) == old);
        assert_eq!(
            ns.read(f, 100_000, 10).expect("read"),
            random(50_000, 161)[..10]
        );
        fx.fsck_clean();
        (c, empty)
    };
    // Dropped with the orphan open: the next open reclaims it.
    fx.reopen();
    let ns = fx.ns();
    fx.fsck_clean();
    let root = snapshot_root(ns, c.root, "before");
    let v = ns.lookup(root, b"f").expect("f").ino;
    assert!(read_all(ns, v) == random(400_000, 160));
    ns.delete_snapshot("c", "orphan").expect("delete");
    fx.fsck_clean();
    ns.delete_snapshot("c", "before").expect("delete");
    assert_eq!(ns.counters(), empty, "nothing of the orphan is left");
    fx.fsck_clean();
    check_no_snapshot_leftovers(ns, "end");
}

/// Rolling back past the birth of an orphan that an earlier rollback restored: the orphan
/// must go too, with its data and counters.
#[test]
fn rollback_past_a_restored_orphan() {
    let mut fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    file_with(ns, c.root, "g", &random(5_000, 2));
    let before = ns.counters();
    ns.create_snapshot("c", Some("old")).expect("snapshot");
    let f = file_with(ns, c.root, "f", &random(10_000, 1));
    ns.open(f).expect("open");
    ns.unlink(c.root, b"f", ROOT).expect("unlink");
    ns.create_snapshot("c", Some("orphan")).expect("snapshot");
    ns.release(f).expect("release");
    // Restores f as an orphan that no one has open.
    ns.rollback("c", "orphan", false, false).expect("rollback");
    fx.fsck_clean();
    ns.rollback("c", "old", false, true).expect("rollback");
    assert_eq!(
        ns.getattr(f).map(|a| a.ino),
        Err(FsError::NotFound),
        "f is older than old"
    );
    fx.fsck_clean();
    ns.delete_snapshot("c", "old").expect("delete");
    assert_eq!(ns.counters(), before);
    check_no_snapshot_leftovers(ns, "end");
    fx.reopen();
    assert_eq!(fx.ns().counters(), before);
    fx.fsck_clean();
}

/// A rollback that leaves a tombstone as the only version of a name (what it hid went
/// with an older snapshot) must drop it: no snapshot needs it, and none would drop it later.
#[test]
fn rollback_leaves_no_lone_tombstone() {
    let fx = Fixture::new();
    let ns = fx.ns();
    let c = ns.create_container("c", ROOT, 0o755).expect("container");
    file_with(ns, c.root, "f", b"one");
    ns.create_snapshot("c", Some("a")).expect("a");
    ns.unlink(c.root, b"f", ROOT).expect("unlink");
    ns.create_snapshot("c", Some("b")).expect("b");
    file_with(ns, c.root, "f", b"two");
    ns.delete_snapshot("c", "a").expect("delete a");
    ns.rollback("c", "b", false, false).expect("rollback to b");
    assert_eq!(names(ns, c.root), Vec::<String>::new());
    ns.delete_snapshot("c", "b").expect("delete b");
    fx.fsck_clean();
    check_no_snapshot_leftovers(ns, "no snapshot left");
}
