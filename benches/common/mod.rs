//! Data sets shared by the benches: real files from the machine's /usr (mixed, and text
//! only), seeded random bytes, and seeded synthetic stand-ins for machines without /usr.
//!
//! Every bench binary includes this module and uses part of it.
#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, SamplingMode, Throughput};
use dedupfs::chunking::Compression;
use rand::{Rng, SeedableRng};

/// What `dedupfs init` stores with unless told otherwise (`--compression zstd:1`).
pub const COMPRESSION: Compression = Compression::Zstd(1);

/// Few samples, flat sampling and short runs: every bench binary finishes in a minute or
/// two on a 2-core machine.
pub fn configure(
    group: &mut BenchmarkGroup<'_, WallTime>,
    throughput: Throughput,
    measurement: Duration,
) {
    group
        .throughput(throughput)
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(measurement);
}

/// At most this much is taken from one file, so one big library does not make up the set.
pub const PER_FILE_MAX: usize = 2 << 20;

/// Directories the real data comes from: binaries (poorly compressible, some shared pieces)
/// and /usr/share (text, docs, locale files, images).
pub const SOURCES: [&str; 2] = ["/usr/lib/x86_64-linux-gnu", "/usr/share"];

/// Depth-first walk in name order, so the data set is the same from run to run on one machine.
pub struct Walk {
    stack: Vec<PathBuf>,
}

impl Walk {
    pub fn new(root: &Path) -> Walk {
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
pub fn real_data(limit: usize) -> Vec<u8> {
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

/// True for bytes that read as plain text: no NUL and at most 1 in 32 bytes outside
/// printable ASCII and whitespace (UTF-8 letters pass, compressed or binary files do not).
fn looks_like_text(bytes: &[u8]) -> bool {
    let odd = bytes
        .iter()
        .filter(|&&b| !(b.is_ascii_graphic() || b.is_ascii_whitespace()))
        .count();
    !bytes.contains(&0) && odd * 32 <= bytes.len()
}

/// Text files from /usr/share (scripts, man pages, licences, data files), concatenated in
/// walk order up to `limit` bytes.
pub fn real_text(limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(limit);
    let mut buf = Vec::with_capacity(PER_FILE_MAX);
    for path in Walk::new(Path::new("/usr/share")) {
        if out.len() >= limit {
            break;
        }
        buf.clear();
        let Ok(f) = fs::File::open(&path) else {
            continue;
        };
        let take = PER_FILE_MAX.min(limit - out.len()) as u64;
        if f.take(take).read_to_end(&mut buf).is_ok() && looks_like_text(&buf) {
            out.extend_from_slice(&buf);
        }
    }
    out
}

/// Seeded random bytes: incompressible, and never the same chunk twice.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut out[..]);
    out
}

const WORDS: [&str; 18] = [
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

/// Seeded generated text, for machines without text under /usr/share.
pub fn synthetic_text(limit: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(limit + 16);
    while out.len() < limit {
        let w = WORDS[rng.gen_range(0..WORDS.len())];
        out.extend_from_slice(w.as_bytes());
        out.push(if rng.gen_ratio(1, 12) { b'\n' } else { b' ' });
    }
    out.truncate(limit);
    out
}

/// Stand-in when the machine has no /usr to read: seeded random blocks (incompressible)
/// interleaved with generated text (compressible), 1:1.
pub fn synthetic_data(limit: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xDEDF_5EED);
    let mut out = Vec::with_capacity(limit);
    while out.len() < limit {
        let block = 256 << 10;
        let start = out.len();
        out.resize(start + block, 0);
        rng.fill(&mut out[start..]);
        let text_end = out.len() + block;
        while out.len() < text_end {
            let w = WORDS[rng.gen_range(0..WORDS.len())];
            out.extend_from_slice(w.as_bytes());
            out.push(if rng.gen_ratio(1, 12) { b'\n' } else { b' ' });
        }
    }
    out.truncate(limit);
    out
}

/// `limit` bytes of mixed real data (see [`real_data`]), or synthetic data when /usr holds
/// less than half of that; `bench` names the caller in what is printed.
pub fn dataset(bench: &str, limit: usize) -> Vec<u8> {
    let data = real_data(limit);
    if data.len() >= limit / 2 {
        eprintln!(
            "{bench}: {} MiB of real data from {}",
            data.len() >> 20,
            SOURCES.join(" and ")
        );
        data
    } else {
        eprintln!("{bench}: not enough files under /usr; using synthetic data");
        synthetic_data(limit)
    }
}

/// `limit` bytes of text from /usr/share, or generated text when there is too little.
pub fn text(bench: &str, limit: usize) -> Vec<u8> {
    let data = real_text(limit);
    if data.len() >= limit / 2 {
        eprintln!("{bench}: {} MiB of text from /usr/share", data.len() >> 20);
        data
    } else {
        eprintln!("{bench}: not enough text under /usr/share; using generated text");
        synthetic_text(limit, 0x7E47)
    }
}
