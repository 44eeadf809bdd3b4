//! A garbage key or value in any column family is reported by fsck, never a panic.
#![no_main]

use std::sync::OnceLock;

use dedupfs::kv::{Batch, Cf, Sync};
use dedupfs::store::Store;
use libfuzzer_sys::fuzz_target;

fn store() -> &'static Store {
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("store");
            Store::init(
                &path,
                dedupfs::chunking::ChunkerParams::with_average(64 << 10).expect("chunker"),
                dedupfs::chunking::Compression::parse("zstd:1").expect("compression"),
            )
            .expect("init");
            // Some real records to collide with: a container, a file, a snapshot.
            {
                let store = Store::open(&path).expect("open");
                let ns = dedupfs::namespace::Namespace::new(store, 16 << 20).expect("ns");
                let c = ns
                    .create_container("c", dedupfs::namespace::Caller::ROOT, 0o755)
                    .expect("container");
                let f = ns
                    .create_file(c.root, b"f", 0o644, dedupfs::namespace::Caller::ROOT)
                    .expect("file");
                ns.open(f.ino).expect("open file");
                ns.write(f.ino, 0, &[7u8; 100_000]).expect("write");
                ns.release(f.ino).expect("release");
                ns.create_snapshot("c", Some("s")).expect("snapshot");
                ns.shutdown().expect("shutdown");
            }
            let store = Store::open(&path).expect("reopen");
            (dir, store)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let s = store();
    let cf = Cf::ALL[data[0] as usize % Cf::ALL.len()];
    let key_len = (data[1] as usize).min(data.len() - 2);
    let (key, value) = data[2..].split_at(key_len);
    let old = s.kv.get(cf, key).expect("get");
    let mut batch = Batch::new();
    batch.put(&s.kv, cf, key, value);
    s.kv.write(batch, Sync::Process).expect("put");
    let _ = dedupfs::fsck::fsck(&s.kv, &s.config);
    let mut batch = Batch::new();
    match old {
        Some(v) => batch.put(&s.kv, cf, key, &v),
        None => batch.delete(&s.kv, cf, key),
    }
    s.kv.write(batch, Sync::Process).expect("restore");
});
