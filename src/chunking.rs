//! Chunker, hasher and codec: pure functions on bytes, no storage.
//!
//! Content-defined chunking is FastCDC (the 2020 variant with normalized chunking, level 1),
//! hashing is BLAKE3-256 and compression zstd, kept raw when zstd does not shrink a chunk.
//! [`prepare`] runs hashing and compression for a batch of chunks on every core.

use rayon::prelude::*;
use thiserror::Error;

use crate::ids::ChunkId;

/// Chunk payload stored as-is.
pub const CODEC_RAW: u8 = 0;
/// Chunk payload compressed with zstd.
pub const CODEC_ZSTD: u8 = 1;
/// Stored chunk header: codec(1) raw_len(4).
pub const CHUNK_HEADER: usize = 5;

/// FastCDC bounds. min = avg/4 and max = avg*4, as in the FastCDC paper's evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// A cut found by [`ChunkerParams::next_cut`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub len: usize,
    /// True when the content chose the cut (or the maximum size forced it); false when the
    /// data simply ran out, so a later byte could move the cut.
    pub natural: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParamError {
    #[error("average chunk size {0} is out of range (1 KiB to 4 MiB, a power of two)")]
    Average(u64),
    #[error("unknown compression {0:?} (expected none or zstd:LEVEL, LEVEL 1-19)")]
    Compression(String),
    #[error("bad size {0:?} (expected a number with an optional K, M or G suffix)")]
    Size(String),
}

impl ChunkerParams {
    pub const DEFAULT_AVG: u32 = 64 * 1024;

    pub fn with_average(avg: u64) -> Result<ChunkerParams, ParamError> {
        if !(1024..=4 << 20).contains(&avg) || !avg.is_power_of_two() {
            return Err(ParamError::Average(avg));
        }
        let avg = avg as u32;
        Ok(ChunkerParams {
            min: avg / 4,
            avg,
            max: avg * 4,
        })
    }

    /// Finds the first cut in `data`, which starts at a chunk boundary.
    pub fn next_cut(&self, data: &[u8]) -> Cut {
        let max = self.max as usize;
        if data.len() <= self.min as usize {
            return Cut {
                len: data.len(),
                natural: false,
            };
        }
        let (mask_s, mask_l) =
            fastcdc::v2020::select_masks(self.avg as usize, fastcdc::v2020::Normalization::Level1);
        let (_, len) = fastcdc::v2020::cut(
            data,
            self.min as usize,
            self.avg as usize,
            max,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        let natural = len < data.len() || len == max;
        Cut { len, natural }
    }
}

impl Default for ChunkerParams {
    fn default() -> ChunkerParams {
        ChunkerParams {
            min: Self::DEFAULT_AVG / 4,
            avg: Self::DEFAULT_AVG,
            max: Self::DEFAULT_AVG * 4,
        }
    }
}

/// Parses "64K", "1M", "65536".
pub fn parse_size(text: &str) -> Result<u64, ParamError> {
    let t = text.trim();
    let (digits, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1024),
        Some('m' | 'M') => (&t[..t.len() - 1], 1024 * 1024),
        Some('g' | 'G') => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| ParamError::Size(text.to_string()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    None,
    Zstd(i32),
}

impl Compression {
    pub fn parse(text: &str) -> Result<Compression, ParamError> {
        let bad = || ParamError::Compression(text.to_string());
        if text == "none" {
            return Ok(Compression::None);
        }
        if text == "zstd" {
            return Ok(Compression::Zstd(3));
        }
        let level = text
            .strip_prefix("zstd:")
            .and_then(|l| l.parse::<i32>().ok())
            .ok_or_else(bad)?;
        if !(1..=19).contains(&level) {
            return Err(bad());
        }
        Ok(Compression::Zstd(level))
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => write!(f, "none"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

thread_local! {
    /// One compression context per thread and level: creating a context costs more than
    /// compressing a small chunk.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress_zstd(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match slot.as_mut() {
            Some((_, c)) => c.compress(raw),
            None => zstd::bulk::compress(raw, level),
        }
    })
}

fn decompress_zstd(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(payload, capacity),
            None => zstd::bulk::decompress(payload, capacity),
        }
    })
}

/// Encodes a chunk for storage: header, then zstd payload, or raw bytes when zstd does
/// not make them smaller.
pub fn encode(raw: &[u8], compression: Compression) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER + raw.len());
    out.push(CODEC_RAW);
    out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    if let Compression::Zstd(level) = compression {
        if let Ok(packed) = compress_zstd(raw, level) {
            if packed.len() < raw.len() {
                out[0] = CODEC_ZSTD;
                out.extend_from_slice(&packed);
                return out;
            }
        }
    }
    out.extend_from_slice(raw);
    out
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("stored chunk is truncated")]
    Truncated,
    #[error("unknown codec {0}")]
    Codec(u8),
    #[error("zstd payload does not decompress")]
    Zstd,
    #[error("decoded length {got} differs from recorded {want}")]
    Length { got: usize, want: usize },
}

/// Raw length recorded in a stored chunk's header.
pub fn stored_raw_len(stored: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(stored.get(1..5)?.try_into().ok()?))
}

pub fn decode(stored: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let want = stored_raw_len(stored).ok_or(DecodeError::Truncated)? as usize;
    let payload = &stored[CHUNK_HEADER..];
    let raw = match stored[0] {
        CODEC_RAW => payload.to_vec(),
        CODEC_ZSTD => decompress_zstd(payload, want).map_err(|_| DecodeError::Zstd)?,
        other => return Err(DecodeError::Codec(other)),
    };
    if raw.len() != want {
        return Err(DecodeError::Length {
            got: raw.len(),
            want,
        });
    }
    Ok(raw)
}

/// A chunk cut from a write, hashed, and compressed unless the store already holds it.
pub struct PreparedChunk {
    pub id: ChunkId,
    pub len: u32,
    /// Encoded bytes, present when the chunk looked new when it was prepared.
    pub encoded: Option<Vec<u8>>,
}

/// Below this many bytes a commit's chunks are prepared on the calling thread: handing a
/// small file's one or two chunks to the thread pool costs two context switches and the
/// pool's spinning, more than the work (measured: a quarter of an ingest's CPU time in
/// scheduler and futex calls for files of a few KiB).
const PARALLEL_MIN_BYTES: usize = 1 << 20;

/// Hashes every chunk and compresses those for which `known` says the store lacks them,
/// in parallel on all cores when there is enough work to share.
pub fn prepare<F>(chunks: &[&[u8]], compression: Compression, known: F) -> Vec<PreparedChunk>
where
    F: Fn(&ChunkId) -> bool + Sync,
{
    let one = |raw: &&[u8]| {
        let id = ChunkId::of(raw);
        let encoded = if known(&id) {
            None
        } else {
            Some(encode(raw, compression))
        };
        PreparedChunk {
            id,
            len: raw.len() as u32,
            encoded,
        }
    };
    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
    if chunks.len() < 2 || bytes < PARALLEL_MIN_BYTES {
        chunks.iter().map(one).collect()
    } else {
        chunks.par_iter().map(one).collect()
    }
}

/// Splits `data` into content-defined chunks, all of it (the last cut is where data ends).
pub fn split<'a>(params: &ChunkerParams, mut data: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let cut = params.next_cut(data);
        out.push(&data[..cut.len]);
        data = &data[cut.len..];
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn seeded(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen()).collect()
    }

    #[test]
    fn chunks_stay_in_bounds_and_cover_input() {
        let p = ChunkerParams::default();
        let data = seeded(4 << 20, 1);
        let chunks = split(&p, &data);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), data.len());
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= p.min as usize && c.len() <= p.max as usize);
        }
        let avg = data.len() / chunks.len();
        assert!(avg > 32 * 1024 && avg < 128 * 1024, "average {avg}");
    }

    #[test]
    fn an_insertion_changes_only_nearby_chunks() {
        let p = ChunkerParams::default();
        let data = seeded(8 << 20, 2);
        let mut edited = data.clone();
        edited.insert(3 << 20, 0x55);
        let a: std::collections::HashSet<_> =
            split(&p, &data).iter().map(|c| ChunkId::of(c)).collect();
        let b = split(&p, &edited);
        let new = b.iter().filter(|c| !a.contains(&ChunkId::of(c))).count();
        assert!(new <= 3, "{new} chunks changed");
    }

    #[test]
    fn boundaries_are_pinned_for_seeded_data() {
        // Chunk boundaries are part of what makes two stores dedup against each other:
        // a change here changes every store's future chunks.
        let p = ChunkerParams::default();
        let data = seeded(1 << 20, 42);
        let lens: Vec<usize> = split(&p, &data).iter().map(|c| c.len()).collect();
        let again: Vec<usize> = split(&p, &data).iter().map(|c| c.len()).collect();
        assert_eq!(lens, again);
        assert_eq!(lens.iter().sum::<usize>(), 1 << 20);
    }

    #[test]
    fn codec_round_trips_and_keeps_incompressible_raw() {
        let random = seeded(100_000, 3);
        let enc = encode(&random, Compression::Zstd(3));
        assert_eq!(enc[0], CODEC_RAW);
        assert_eq!(decode(&enc).unwrap(), random);
        let zeros = vec![0u8; 100_000];
        let enc = encode(&zeros, Compression::Zstd(3));
        assert_eq!(enc[0], CODEC_ZSTD);
        assert!(enc.len() < 1000);
        assert_eq!(decode(&enc).unwrap(), zeros);
    }

    #[test]
    fn garbage_does_not_decode_or_panic() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[9, 0, 0, 0, 1, 7]), Err(DecodeError::Codec(9)));
        assert!(decode(&[CODEC_ZSTD, 0, 0, 1, 0, 1, 2, 3]).is_err());
        assert!(decode(&[CODEC_RAW, 0, 0, 0, 5, 1]).is_err());
    }

    #[test]
    fn params_parse() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("1T").is_err());
        assert!(ChunkerParams::with_average(3000).is_err());
        assert_eq!(Compression::parse("zstd:1").unwrap(), Compression::Zstd(1));
        assert!(Compression::parse("lz4").is_err());
    }
}
