//! The namespace's write and read paths without a mount: files created, written and released
//! through `Namespace` on a real store in a temp dir, as the FUSE adapter would call it but
//! without the kernel round trips. Writes and reads go in 128 KiB requests, the size FUSE
//! sends; releases commit without fsync, as a close does.
//!
//! Run with `cargo bench --bench namespace`. Numbers are recorded in docs/BENCHMARKS.md.

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput,
};
use dedupfs::chunking::ChunkerParams;
use dedupfs::ids::InodeNo;
use dedupfs::namespace::{Caller, Namespace, DEFAULT_CACHE_BYTES};
use dedupfs::store::Store;

use common::COMPRESSION;

/// The large file: ~1000 chunks of the default 64 KiB average, of mixed real data.
const LARGE_BYTES: usize = 64 << 20;

/// Size of one write or read request: FUSE's default maximum.
const REQUEST: usize = 128 << 10;

/// Size of a small file: one chunk, below the chunker's minimum.
const SMALL_BYTES: usize = 4 << 10;

/// Small files created or read per iteration.
const SMALL_FILES: usize = 256;

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, throughput: Throughput) {
    common::configure(group, throughput, Duration::from_secs(5));
}

/// A new store in a temp dir, its namespace, and a container to work in. Fields drop in
/// order: the store closes before its directory is removed.
struct Fixture {
    ns: Arc<Namespace>,
    dir: InodeNo,
    _tmp: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join("store");
        Store::init(&path, ChunkerParams::default(), COMPRESSION).expect("store init");
        let store = Store::open(&path).expect("store open");
        let ns = Namespace::new(store, DEFAULT_CACHE_BYTES).expect("namespace");
        let dir = ns
            .create_container("bench", Caller::ROOT, 0o755)
            .expect("container")
            .root;
        Fixture { ns, dir, _tmp: tmp }
    }

    /// Creates `name` holding `data`, written in [`REQUEST`]-sized writes, and closes it.
    fn write_file(&self, name: &[u8], data: &[u8]) -> InodeNo {
        let ns = &self.ns;
        let ino = ns
            .create_file(self.dir, name, 0o644, Caller::ROOT)
            .expect("create")
            .ino;
        ns.open(ino).expect("open");
        for (i, piece) in data.chunks(REQUEST).enumerate() {
            ns.write(ino, (i * REQUEST) as u64, piece).expect("write");
        }
        ns.release(ino).expect("release");
        ino
    }

    /// Reads `ino` from start to end in [`REQUEST`]-sized reads, handing each reply to
    /// `each`; returns the bytes read.
    fn read_file(&self, ino: InodeNo, mut each: impl FnMut(&[u8])) -> usize {
        let ns = &self.ns;
        ns.open(ino).expect("open");
        let mut offset = 0;
        loop {
            let reply = ns.read(ino, offset, REQUEST as u32).expect("read");
            if reply.is_empty() {
                break;
            }
            offset += reply.len() as u64;
            each(&reply);
        }
        ns.release(ino).expect("release");
        offset as usize
    }

    /// The whole of `ino`, to check what the benches read.
    fn contents(&self, ino: InodeNo) -> Vec<u8> {
        let mut out = Vec::new();
        self.read_file(ino, |reply| out.extend_from_slice(reply));
        out
    }

    /// Moves everything written so far out of RocksDB's memtables, so reads come from
    /// table and blob files (through the page cache), as they do after a restart.
    fn flush(&self) {
        self.ns.store().kv.flush().expect("flush");
    }
}

/// Contents of small file `n`: a slice of `data` with `n` at its start, so that every file
/// is a chunk of its own, as compressible as the data.
fn small_file(data: &[u8], n: usize) -> Vec<u8> {
    let at = (n * SMALL_BYTES) % (data.len() - SMALL_BYTES);
    let mut bytes = data[at..at + SMALL_BYTES].to_vec();
    bytes[..8].copy_from_slice(&(n as u64).to_be_bytes());
    bytes
}

/// What a timed read does with a reply: nothing the optimiser can remove.
fn discard(reply: &[u8]) {
    black_box(reply);
}

fn write_path(c: &mut Criterion, data: &[u8]) {
    let mut group = c.benchmark_group("namespace_write");

    let fixture = Fixture::new();
    let mut serial = 0;
    configure(&mut group, Throughput::Elements(SMALL_FILES as u64));
    group.bench_function("small-files", |b| {
        b.iter(|| {
            for _ in 0..SMALL_FILES {
                let name = format!("small-{serial}");
                fixture.write_file(name.as_bytes(), &small_file(data, serial));
                serial += 1;
            }
        })
    });
    drop(fixture);

    configure(&mut group, Throughput::Bytes(data.len() as u64));
    // A fresh store for every iteration, so that all of the data is new to it.
    group.bench_function("large-file/new", |b| {
        b.iter_batched(
            Fixture::new,
            |fixture| {
                fixture.write_file(b"large", data);
                fixture
            },
            BatchSize::PerIteration,
        )
    });

    let fixture = Fixture::new();
    let ino = fixture.write_file(b"original", data);
    assert!(fixture.contents(ino) == data, "large file reads back");
    let mut serial = 0;
    group.bench_function("large-file/duplicate", |b| {
        b.iter(|| {
            fixture.write_file(format!("copy-{serial}").as_bytes(), data);
            serial += 1;
        })
    });
    group.finish();
}

fn read_path(c: &mut Criterion, data: &[u8]) {
    let mut group = c.benchmark_group("namespace_read");

    let fixture = Fixture::new();
    let large = fixture.write_file(b"large", data);
    fixture.flush();
    configure(&mut group, Throughput::Bytes(data.len() as u64));
    // Every chunk decompressed and verified against its hash.
    group.bench_function("large-file/verified", |b| {
        b.iter_batched(
            || fixture.ns.chunks.clear_cache(),
            |()| fixture.read_file(large, discard),
            BatchSize::PerIteration,
        )
    });
    // Every chunk from the decompressed-chunk cache, which holds the whole file.
    assert!(fixture.contents(large) == data, "large file reads back");
    group.bench_function("large-file/cached", |b| {
        b.iter(|| fixture.read_file(large, discard))
    });
    drop(fixture);

    let fixture = Fixture::new();
    let names: Vec<String> = (0..SMALL_FILES).map(|n| format!("small-{n}")).collect();
    for (n, name) in names.iter().enumerate() {
        fixture.write_file(name.as_bytes(), &small_file(data, n));
    }
    fixture.flush();
    let lookup = |name: &str| {
        fixture
            .ns
            .lookup(fixture.dir, name.as_bytes())
            .expect("lookup")
            .ino
    };
    for (n, name) in names.iter().enumerate() {
        assert!(
            fixture.contents(lookup(name)) == small_file(data, n),
            "{name} reads back"
        );
    }
    let read_all = || {
        names
            .iter()
            .map(|name| fixture.read_file(lookup(name), discard))
            .sum::<usize>()
    };
    configure(&mut group, Throughput::Elements(SMALL_FILES as u64));
    // Lookup by name, open, read, release; every chunk verified.
    group.bench_function("small-files", |b| {
        b.iter_batched(
            || fixture.ns.chunks.clear_cache(),
            |()| read_all(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn namespace(c: &mut Criterion) {
    let data = common::dataset("namespace", LARGE_BYTES);
    write_path(c, &data);
    read_path(c, &data);
}

criterion_group!(benches, namespace);
criterion_main!(benches);
