//! A garbage value in place of a real record makes namespace operations fail (EIO and the
//! like), never panic: what a damaged store does to a running daemon.
#![no_main]

use std::sync::{Arc, OnceLock};

use dedupfs::ids::InodeNo;
use dedupfs::kv::{Batch, Cf, Sync};
use dedupfs::namespace::{Caller, Namespace};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    _dir: tempfile::TempDir,
    ns: Arc<Namespace>,
    /// Every (family, key) of the store when the fixture was built.
    keys: Vec<(Cf, Vec<u8>)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        dedupfs::store::Store::init(
            &path,
            dedupfs::chunking::ChunkerParams::with_average(4 << 10).expect("chunker"),
            dedupfs::chunking::Compression::parse("zstd:1").expect("compression"),
        )
        .expect("init");
        let store = dedupfs::store::Store::open(&path).expect("open");
        let ns = Namespace::new(store, 1 << 20).expect("namespace");
        let c = ns.create_container("c", Caller::ROOT, 0o755).expect("container");
        let d = ns
            .make_node(c.root, b"d", dedupfs::format::Kind::Dir, 0o755, 0, b"", Caller::ROOT)
            .expect("dir");
        let f = ns.create_file(d.ino, b"f", 0o644, Caller::ROOT).expect("file");
        ns.open(f.ino).expect("open");
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 251) as u8).collect();
        ns.write(f.ino, 0, &data).expect("write");
        ns.release(f.ino).expect("release");
        ns.setxattr(f.ino, b"user.x", b"v", false, false, Caller::ROOT).expect("xattr");
        ns.create_snapshot("c", Some("s")).expect("snapshot");
        let mut keys = Vec::new();
        for cf in Cf::ALL {
            for item in ns.store().kv.scan_prefix(cf, b"") {
                let (k, _) = item.expect("scan");
                keys.push((cf, k.to_vec()));
            }
        }
        Fixture { _dir: dir, ns, keys }
    })
}

/// Reads everything reachable, ignoring errors.
fn walk(ns: &Namespace, dir: InodeNo, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = ns.readdir(dir) else { return };
    for e in entries {
        let _ = ns.getattr(e.ino);
        let _ = ns.listxattr(e.ino);
        let _ = ns.getxattr(e.ino, b"user.x");
        let _ = ns.readlink(e.ino);
        if ns.open(e.ino).is_ok() {
            let _ = ns.read(e.ino, 0, 1 << 20);
            let _ = ns.release(e.ino);
        }
        walk(ns, e.ino, depth + 1);
    }
    if let Ok(snaps) = ns.lookup(dir, b".snapshots") {
        walk(ns, snaps.ino, depth + 1);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let f = fixture();
    let (cf, key) = &f.keys[(data[0] as usize * 256 + data[1] as usize) % f.keys.len()];
    let kv = &f.ns.store().kv;
    let old = kv.get(*cf, key).expect("get");
    let mut batch = Batch::new();
    batch.put(kv, *cf, key, &data[2..]);
    kv.write(batch, Sync::Process).expect("put");
    f.ns.chunks.clear_cache();
    walk(&f.ns, InodeNo::ROOT, 0);
    let mut batch = Batch::new();
    match old {
        Some(v) => batch.put(kv, *cf, key, &v),
        None => batch.delete(kv, *cf, key),
    }
    kv.write(batch, Sync::Process).expect("restore");
});
