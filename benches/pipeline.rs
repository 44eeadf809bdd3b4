//! Throughput of the write pipeline without a store: FastCDC cuts, BLAKE3 hashes and zstd
//! compression, on ~64 MiB of mixed real data (shared libraries, text, images from the
//! machine's /usr), then the same pipeline on one and on two rayon threads.
//!
//! Run with `cargo bench --bench pipeline`. Numbers are recorded in docs/BENCHMARKS.md.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use dedupfs::chunking::{self, ChunkerParams, Compression};
use dedupfs::ids::ChunkId;
use rand::{Rng, SeedableRng};

/// Size of the data set: large enough to hold ~1000 chunks of the default 64 KiB average,
/// small enough that one pass takes well under a second on one core.
const DATASET_BYTES: usize = 64 << 20;

/// At most this much is taken from one file, so one big library does not make up the set.
const PER_FILE_MAX: usize = 2 << 20;

/// Directories the real data comes from: binaries (poorly compressible, some shared pieces)
/// and /usr/share (text, docs, locale files, images).
const SOURCES: [&str; 2] = ["/usr/lib/x86_64-linux-gnu", "/usr/share"];

/// Depth-first walk in name order, so the data set is the same from run to run on one machine.
struct Walk {
    stack: Vec<PathBuf>,
}

impl Walk {
    fn new(root: &Path) -> Walk {
        Walk {
            stack: vec![root.to_path_buf()],
        }
    }
}

impl Iterator for Walk {
    type Item = PathBuf;

    fn next(&mut self) -> Option<PathBuf> {
        while let Some(path) = self.stack.pop() {
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_file() {
                if meta.len() > 0 {
                    return Some(path);
                }
            } else if meta.is_dir() {
                let Ok(entries) = fs::read_dir(&path) else {
                    continue;
                };
                let mut children: Vec<PathBuf> =
                    entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
                // Reverse order on the stack pops the smallest name first.
                children.sort_unstable_by(|a, b| b.cmp(a));
                self.stack.extend(children);
            }
        }
        None
    }
}

/// Concatenates files from [`SOURCES`], alternating between them, up to `limit` bytes.
fn real_data(limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(limit);
    let mut walks: Vec<Walk> = SOURCES.iter().map(|s| Walk::new(Path::new(s))).collect();
    let mut buf = Vec::with_capacity(PER_FILE_MAX);
    while out.len() < limit && !walks.is_empty() {
        let mut i = 0;
        while i < walks.len() && out.len() < limit {
            match walks[i].next() {
                Some(path) => {
                    buf.clear();
                    if let Ok(f) = fs::File::open(&path) {
                        let take = PER_FILE_MAX.min(limit - out.len()) as u64;
                        if f.take(take).read_to_end(&mut buf).is_ok() {
                            out.extend_from_slice(&buf);
                        }
                    }
                    i += 1;
                }
                None => {
                    walks.remove(i);
                }
            }
        }
    }
    out
}

/// Stand-in when the machine has no /usr to read: seeded random blocks (incompressible)
/// interleaved with generated text (compressible), 1:1.
fn synthetic_data(limit: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xDEDF_5EED);
    let words = [
        "chunk",
        "store",
        "dedup",
        "backup",
        "container",
        "snapshot",
        "epoch",
        "extent",
        "inode",
        "refcount",
        "replica",
        "the",
        "of",
        "and",
        "a",
        "to",
        "is",
        "for",
    ];
    let mut out = Vec::with_capacity(limit);
    while out.len() < limit {
        let block = 256 << 10;
        let start = out.len();
        out.resize(start + block, 0);
        rng.fill(&mut out[start..]);
        let text_end = out.len() + block;
        while out.len() < text_end {
            let w = words[rng.gen_range(0..words.len())];
            out.extend_from_slice(w.as_bytes());
            out.push(if rng.gen_ratio(1, 12) { b'\n' } else { b' ' });
        }
    }
    out.truncate(limit);
    out
}

fn dataset() -> Vec<u8> {
    let data = real_data(DATASET_BYTES);
    if data.len() >= DATASET_BYTES / 2 {
        eprintln!(
            "pipeline: {} MiB of real data from {}",
            data.len() >> 20,
            SOURCES.join(" and ")
        );
        data
    } else {
        eprintln!("pipeline: not enough files under /usr; using synthetic data");
        synthetic_data(DATASET_BYTES)
    }
}

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
    let data = dataset();
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
