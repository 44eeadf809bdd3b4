//! Throughput of the store's components one at a time: the chunker (FastCDC), the hash
//! (BLAKE3), the codec (zstd at the store's default level) and the chunk store on a real
//! RocksDB in a temp dir. `benches/pipeline.rs` measures the first three together;
//! `benches/namespace.rs` the write and read paths above them.
//!
//! Run with `cargo bench --bench components`. Numbers are recorded in docs/BENCHMARKS.md.

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput,
};
use dedupfs::chunk_store::ChunkStore;
use dedupfs::chunking::{self, ChunkerParams};
use dedupfs::format;
use dedupfs::ids::ChunkId;
use dedupfs::kv::{Batch, Cf, Kv, Sync};
use dedupfs::namespace::DEFAULT_CACHE_BYTES;
use dedupfs::store::Store;

use common::COMPRESSION;

/// Size of the chunker's input: ~1000 chunks of the default 64 KiB average.
const CHUNKER_BYTES: usize = 64 << 20;

/// Chunk size for the hash, the codec and the chunk store: the chunker's average.
const CHUNK: usize = ChunkerParams::DEFAULT_AVG as usize;

/// Bytes hashed, compressed or stored per iteration: enough chunks that the data comes
/// from memory rather than the CPU cache, as it does on the write path.
const BATCH_BYTES: usize = 16 << 20;

/// Chunks written to the store in one batch: a 4 MiB commit.
const PUT_CHUNKS: usize = 64;

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, throughput: Throughput) {
    common::configure(group, throughput, Duration::from_secs(3));
}

/// `data` in pieces of [`CHUNK`] bytes (the last one may be shorter).
fn pieces(data: &[u8]) -> Vec<&[u8]> {
    data.chunks(CHUNK).collect()
}

fn thread_pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon thread pool")
}

fn chunker(c: &mut Criterion, real: &[u8], random: &[u8]) {
    let params = ChunkerParams::default();
    for (name, data) in [("random", random), ("real", real)] {
        eprintln!(
            "chunker: {name}: {} chunks",
            chunking::split(&params, data).len()
        );
    }
    let mut group = c.benchmark_group("chunker");
    configure(&mut group, Throughput::Bytes(CHUNKER_BYTES as u64));
    for (name, data) in [("random", random), ("real", real)] {
        let data = &data[..CHUNKER_BYTES.min(data.len())];
        group.bench_function(format!("fastcdc/{name}"), |b| {
            b.iter(|| chunking::split(&params, black_box(data)).len())
        });
    }
    group.finish();
}

fn hash(c: &mut Criterion, random: &[u8]) {
    let chunks = pieces(&random[..BATCH_BYTES]);
    let mut group = c.benchmark_group("hash");
    configure(&mut group, Throughput::Bytes(BATCH_BYTES as u64));
    group.bench_function("blake3/64KiB", |b| {
        b.iter(|| {
            chunks
                .iter()
                .map(|c| ChunkId::of(black_box(c)).0[0] as usize)
                .sum::<usize>()
        })
    });
    // What the write path calls: `prepare` hashes a commit's chunks on a rayon pool; a
    // `known` that says every chunk is stored leaves out compression.
    for threads in [1, 2] {
        let pool = thread_pool(threads);
        group.bench_function(format!("prepare-hash-only/{threads}-thread"), |b| {
            b.iter(|| {
                pool.install(|| chunking::prepare(black_box(&chunks), COMPRESSION, |_| true))
                    .len()
            })
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion, text: &[u8], random: &[u8]) {
    let sets = [
        ("text", pieces(&text[..BATCH_BYTES.min(text.len())])),
        ("random", pieces(&random[..BATCH_BYTES])),
    ];
    let mut group = c.benchmark_group("codec");
    for (name, chunks) in &sets {
        let raw: usize = chunks.iter().map(|c| c.len()).sum();
        let encoded: Vec<Vec<u8>> = chunks
            .iter()
            .map(|c| chunking::encode(c, COMPRESSION))
            .collect();
        let stored: usize = encoded.iter().map(Vec::len).sum();
        let zstd = encoded
            .iter()
            .filter(|e| e[0] == chunking::CODEC_ZSTD)
            .count();
        eprintln!(
            "codec: {name}: {} chunks, {zstd} stored compressed; {COMPRESSION} stores {:.1}% of the bytes",
            chunks.len(),
            100.0 * stored as f64 / raw as f64
        );
        configure(&mut group, Throughput::Bytes(raw as u64));
        group.bench_function(format!("encode-zstd1/{name}"), |b| {
            b.iter(|| {
                chunks
                    .iter()
                    .map(|c| chunking::encode(black_box(c), COMPRESSION).len())
                    .sum::<usize>()
            })
        });
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| {
                encoded
                    .iter()
                    .map(|e| chunking::decode(black_box(e)).map_or(0, |r| r.len()))
                    .sum::<usize>()
            })
        });
    }
    group.finish();
}

/// A store in a temp dir, opened, with its chunk store as the namespace builds it. Fields
/// drop in order: the store closes before its directory is removed.
struct ChunkFixture {
    chunks: ChunkStore,
    store: Store,
    _dir: tempfile::TempDir,
}

impl ChunkFixture {
    fn new() -> ChunkFixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store");
        Store::init(&path, ChunkerParams::default(), COMPRESSION).expect("store init");
        let store = Store::open(&path).expect("store open");
        ChunkFixture {
            chunks: ChunkStore::new(store.kv.clone(), DEFAULT_CACHE_BYTES),
            store,
            _dir: dir,
        }
    }

    fn kv(&self) -> &Arc<Kv> {
        &self.store.kv
    }

    /// Stores `chunks` as a namespace commit does (`Namespace::apply`, which is not public):
    /// read each chunk's reference count; write the payload of a chunk not stored yet; write
    /// every count raised by one; all in one batch, without fsync.
    fn put(&self, chunks: &[(ChunkId, Vec<u8>)]) {
        let kv = self.kv();
        let mut batch = Batch::new();
        for (id, payload) in chunks {
            let count = self.chunks.refcount(id).expect("refcount");
            if count == 0 {
                batch.put(kv, Cf::Chunk, &id.0, payload);
            }
            batch.put(kv, Cf::Refcount, &id.0, &format::encode_count(count + 1));
        }
        kv.write(batch, Sync::Process).expect("store write");
    }
}

/// [`PUT_CHUNKS`] chunks never seen before: random bytes with `serial` at the start of
/// each, hashed and encoded (stored raw: zstd does not shrink them).
fn new_chunks(pool: &[u8], serial: &mut u64) -> Vec<(ChunkId, Vec<u8>)> {
    pieces(&pool[..PUT_CHUNKS * CHUNK])
        .into_iter()
        .map(|piece| {
            let mut raw = piece.to_vec();
            raw[..8].copy_from_slice(&serial.to_be_bytes());
            *serial += 1;
            (ChunkId::of(&raw), chunking::encode(&raw, COMPRESSION))
        })
        .collect()
}

fn chunk_store(c: &mut Criterion, real: &[u8], random: &[u8]) {
    let mut group = c.benchmark_group("chunk_store");
    let put_bytes = (PUT_CHUNKS * CHUNK) as u64;

    let fixture = ChunkFixture::new();
    let mut serial = 0;
    configure(&mut group, Throughput::Bytes(put_bytes));
    group.bench_function("put-new", |b| {
        b.iter_batched(
            || new_chunks(random, &mut serial),
            |chunks| fixture.put(&chunks),
            BatchSize::PerIteration,
        )
    });

    let stored = new_chunks(random, &mut serial);
    fixture.put(&stored);
    configure(&mut group, Throughput::Elements(PUT_CHUNKS as u64));
    group.bench_function("put-duplicate", |b| b.iter(|| fixture.put(&stored)));
    drop(fixture);

    // Reads come from blob files (through the page cache), not from the memtable: the
    // sets are flushed once stored.
    let params = ChunkerParams::default();
    for (name, data) in [("real", real), ("random", &random[..BATCH_BYTES])] {
        let fixture = ChunkFixture::new();
        let chunks: Vec<(ChunkId, Vec<u8>)> = chunking::split(&params, data)
            .into_iter()
            .map(|c| (ChunkId::of(c), chunking::encode(c, COMPRESSION)))
            .collect();
        for batch in chunks.chunks(PUT_CHUNKS) {
            fixture.put(batch);
        }
        fixture.kv().flush().expect("flush");
        let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
        let read_all = || {
            ids.iter()
                .map(|id| fixture.chunks.read(black_box(id)).expect("read").len())
                .sum::<usize>()
        };
        let back: Vec<u8> = ids
            .iter()
            .flat_map(|id| fixture.chunks.read(id).expect("read").to_vec())
            .collect();
        assert!(back == data, "chunk store reads back what it stored");
        configure(&mut group, Throughput::Bytes(data.len() as u64));
        group.bench_function(format!("get-verified/{name}"), |b| {
            b.iter_batched(
                || fixture.chunks.clear_cache(),
                |()| read_all(),
                BatchSize::PerIteration,
            )
        });
        // The storage engine's part of a verified read: the stored bytes only.
        group.bench_function(format!("kv-get/{name}"), |b| {
            b.iter(|| {
                ids.iter()
                    .map(|id| {
                        let stored = fixture.kv().get(Cf::Chunk, black_box(&id.0));
                        stored.expect("kv get").map_or(0, |v| v.len())
                    })
                    .sum::<usize>()
            })
        });
        if name == "real" {
            // A cache hit hands out the decompressed chunk without copying it: chunks/s.
            read_all();
            configure(&mut group, Throughput::Elements(ids.len() as u64));
            group.bench_function("get-cached/real", |b| b.iter(read_all));
        }
    }
    group.finish();
}

fn components(c: &mut Criterion) {
    let real = common::dataset("components", CHUNKER_BYTES);
    let random = common::random(CHUNKER_BYTES, 0x5EED);
    let text = common::text("components", BATCH_BYTES);
    chunker(c, &real, &random);
    hash(c, &random);
    codec(c, &text, &random);
    chunk_store(c, &real, &random);
}

criterion_group!(benches, components);
criterion_main!(benches);
