//! The write path without a mount: random writes, truncates and commits against a model.

use dedupfs::chunking::{ChunkerParams, Compression};
use dedupfs::namespace::{Caller, Namespace, SetAttr};
use dedupfs::store::Store;
use rand::{Rng, SeedableRng};

fn open(path: &std::path::Path) -> std::sync::Arc<Namespace> {
    Namespace::new(Store::open(path).unwrap(), 8 << 20).unwrap()
}

/// A new store with chunks of `avg` bytes on average, a container "c" and an open file "f"
/// in it: the temp dir (keep it alive), the store path, the namespace and the file.
fn store_with_open_file(
    avg: u64,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::sync::Arc<Namespace>,
    dedupfs::ids::InodeNo,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    Store::init(
        &path,
        ChunkerParams::with_average(avg).unwrap(),
        Compression::Zstd(1),
    )
    .unwrap();
    let ns = open(&path);
    let c = ns.create_container("c", Caller::ROOT, 0o755).unwrap();
    let f = ns
        .create_file(c.root, b"f", 0o644, Caller::ROOT)
        .unwrap()
        .ino;
    ns.open(f).unwrap();
    (dir, path, ns, f)
}

#[test]
fn random_writes_match_model_across_commits_and_reopen() {
    random_writes(usize::MAX);
}

#[test]
fn random_writes_with_background_commits_match_model() {
    // A tiny bound: most writes start a background commit while the last is in flight.
    random_writes(20_000);
}

fn random_writes(dirty_limit: usize) {
    let (_dir, path, ns, f) = store_with_open_file(4096);
    ns.set_dirty_limit(dirty_limit);
    let mut model: Vec<u8> = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let base: Vec<u8> = (0..200_000).map(|_| rng.gen()).collect();
    for step in 0..400 {
        match rng.gen_range(0..10) {
            0..=5 => {
                let off = rng.gen_range(0..(model.len() + 20_000)) as u64;
                let len = rng.gen_range(1..30_000);
                let at = rng.gen_range(0..base.len() - len);
                let data = &base[at..at + len];
                ns.write(f, off, data).unwrap();
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(data);
            }
            6 => {
                let size = rng.gen_range(0..(model.len() + 10_000)) as u64;
                let set = SetAttr {
                    size: Some(size),
                    ..Default::default()
                };
                ns.setattr(f, &set, Caller::ROOT).unwrap();
                model.resize(size as usize, 0);
            }
            7 => ns.flush(f).unwrap(),
            _ => {
                let off = rng.gen_range(0..model.len().max(1)) as u64;
                let got = ns.read(f, off, 50_000).unwrap();
                let end = (off as usize + 50_000).min(model.len());
                let want = if (off as usize) < model.len() {
                    &model[off as usize..end]
                } else {
                    &[][..]
                };
                assert_eq!(got, want, "step {step} read at {off}");
            }
        }
        assert_eq!(
            ns.getattr(f).unwrap().rec.size,
            model.len() as u64,
            "step {step}"
        );
    }
    ns.release(f).unwrap();
    let all = ns.read(f, 0, model.len() as u32 + 10).unwrap();
    assert_eq!(all, model);
    ns.shutdown().unwrap();
    drop(ns);
    let ns = open(&path);
    assert_eq!(ns.read(f, 0, model.len() as u32 + 10).unwrap(), model);
    ns.shutdown().unwrap();
    drop(ns);
    assert_fsck_clean(&path);
}

fn assert_fsck_clean(path: &std::path::Path) {
    let store = Store::open(path).unwrap();
    let report = dedupfs::fsck::fsck(&store.kv, &store.config).unwrap();
    assert!(report.is_clean(), "{report}");
}

#[test]
fn streaming_write_past_the_dirty_bound_holds_back_the_tail() {
    let (_dir, path, ns, f) = store_with_open_file(ChunkerParams::DEFAULT_AVG as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let data: Vec<u8> = (0..(70 << 20)).map(|_| rng.gen()).collect();
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        ns.write(f, (i << 20) as u64, piece).unwrap();
    }
    ns.release(f).unwrap();
    assert_eq!(ns.read(f, 0, data.len() as u32).unwrap(), data);
    // Random data does not compress or dedup: what is stored is what was written, with no
    // tail chunks stored and replaced at each bound.
    let counters = ns.counters();
    assert_eq!(counters.unique_bytes, data.len() as u64);
    assert_eq!(counters.logical_bytes, data.len() as u64);
    ns.shutdown().unwrap();
    drop(ns);
    assert_fsck_clean(&path);
}

#[test]
fn appends_with_background_commits_read_back_while_in_flight() {
    let (_dir, path, ns, f) = store_with_open_file(4096);
    // Streaming appends past a small bound: sealed ranges are cut by the commit thread
    // while reads of every layer (pending, sealed, committed) go on.
    ns.set_dirty_limit(50_000);
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut model: Vec<u8> = Vec::new();
    for step in 0..2000 {
        let len = rng.gen_range(1..20_000);
        let piece: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        ns.write(f, model.len() as u64, &piece).unwrap();
        model.extend_from_slice(&piece);
        if step % 7 == 0 {
            let off = rng.gen_range(0..model.len());
            let got = ns.read(f, off as u64, 30_000).unwrap();
            let end = (off + 30_000).min(model.len());
            assert!(got == model[off..end], "step {step}: read at {off}");
        }
    }
    ns.release(f).unwrap();
    assert!(ns.read(f, 0, model.len() as u32).unwrap() == model);
    ns.shutdown().unwrap();
    drop(ns);
    assert_fsck_clean(&path);
    let ns = open(&path);
    assert!(ns.read(f, 0, model.len() as u32).unwrap() == model);
}
