//! Any line on the control socket gets a reply, never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use dedupfs::namespace::Namespace;
use libfuzzer_sys::fuzz_target;

fn namespace() -> &'static Arc<Namespace> {
    static NS: OnceLock<(tempfile::TempDir, Arc<Namespace>)> = OnceLock::new();
    &NS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        dedupfs::store::Store::init(
            &path,
            dedupfs::chunking::ChunkerParams::with_average(64 << 10).expect("chunker"),
            dedupfs::chunking::Compression::parse("zstd:1").expect("compression"),
        )
        .expect("init");
        let store = dedupfs::store::Store::open(&path).expect("open");
        let ns = Namespace::new(store, 16 << 20).expect("namespace");
        ns.create_container("c", dedupfs::namespace::Caller::ROOT, 0o755)
            .expect("container");
        (dir, ns)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let reply = dedupfs::control::handle_line(namespace(), &line, None, &mut |_| {});
    assert!(reply.ok || reply.error.is_some());
});
