//! Throughput of the write pipeline without a store: FastCDC cuts, BLAKE3 hashes and zstd
//! compression, on ~64 MiB of mixed real data (shared libraries, text, images from the
//! machine's /usr), then the same pipeline on one and on two rayon threads.
//!
//! Run with `cargo bench --bench pipeline`. Numbers are recorded in docs/BENCHMARKS.md.

mod common;

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use dedupfs::chunking::{self, ChunkerParams, Compression};
use dedupfs::ids::ChunkId;

/// Size of the data set: large enough to hold ~1000 chunks of the default 64 KiB average,
/// small enough that one pass takes well under a second on one core.
const DATASET_BYTES: usize = 64 << 20;

fn thread_pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon thread pool")
}

/// The write path's work for `data`: cut, hash, compress every chunk as if it were new.
fn full_pipeline(params: &ChunkerParams, data: &[u8], compression: Compression) -> usize {
    let chunks = chunking::split(params, data);
    let prepared = chunking::prepare(&chunks, compression, |_| false);
    prepared
        .iter()
        .map(|p| p.encoded.as_ref().map_or(0, Vec::len))
        .sum()
}

fn pipeline(c: &mut Criterion) {
    let data = common::dataset("pipeline", DATASET_BYTES);
    let params = ChunkerParams::default();
    let zstd1 = Compression::Zstd(1);

    // Facts about the data set, so the numbers can be read against it.
    let chunks = chunking::split(&params, &data);
    let stored = full_pipeline(&params, &data, zstd1);
    eprintln!(
        "pipeline: {} chunks, average {} KiB; zstd-1 stores {:.1}% of the bytes",
        chunks.len(),
        data.len() / chunks.len().max(1) / 1024,
        100.0 * stored as f64 / data.len() as f64
    );
    drop(chunks);

    let mut group = c.benchmark_group("pipeline");
    group
        .throughput(Throughput::Bytes(data.len() as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));

    group.bench_function("fastcdc", |b| {
        b.iter(|| chunking::split(&params, black_box(&data)).len())
    });

    group.bench_function("fastcdc+blake3", |b| {
        b.iter(|| {
            chunking::split(&params, black_box(&data))
                .iter()
                .map(|c| ChunkId::of(c).0[0] as usize)
                .sum::<usize>()
        })
    });

    for threads in [1, 2] {
        let pool = thread_pool(threads);
        group.bench_function(format!("fastcdc+blake3+zstd1/{threads}-thread"), |b| {
            b.iter(|| pool.install(|| full_pipeline(&params, black_box(&data), zstd1)))
        });
    }

    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
