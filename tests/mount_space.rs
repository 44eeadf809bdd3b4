//! The space of deleted chunks comes back on its own, without more writes: blob garbage
//! collection turns on once enough of the blob files is garbage (and stays off otherwise,
//! because it rewrites live chunks).

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Mounted;

/// Bytes of the store's blob files (where chunk payloads live).
fn blob_bytes(store: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![store.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if entry.path().extension().is_some_and(|e| e == "blob") {
                total += meta.len();
            }
        }
    }
    total
}

/// Incompressible bytes that never repeat across seeds.
fn fill(buf: &mut [u8], state: &mut u64) {
    for word in buf.chunks_exact_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
}

#[test]
fn space_of_deleted_chunks_comes_back_without_more_writes() {
    let mut m = Mounted::new();
    // Small memtables: the payloads reach blob files before the delete.
    m.unmount();
    m.mount_with_args(&["--memory", "64M"]);
    const MIB: usize = 96;
    // Two files written in turns, a MiB at a time, each committed by its fsync: every
    // blob file holds chunks of both, so deleting one leaves every file half garbage,
    // which only garbage collection (relocating the other half) gives back.
    let mut kept = std::fs::File::create(m.c().join("kept")).unwrap();
    let mut deleted = std::fs::File::create(m.c().join("deleted")).unwrap();
    let (mut s1, mut s2) = (0x9E37_79B9_7F4A_7C15u64, 0xD1B5_4A32_D192_ED03u64);
    let mut buf = vec![0u8; 1 << 20];
    let mut kept_bytes = Vec::with_capacity(MIB << 20);
    for _ in 0..MIB {
        fill(&mut buf, &mut s1);
        kept.write_all(&buf).unwrap();
        kept.sync_data().unwrap();
        kept_bytes.extend_from_slice(&buf);
        fill(&mut buf, &mut s2);
        deleted.write_all(&buf).unwrap();
        deleted.sync_data().unwrap();
    }
    drop((kept, deleted));
    // Let the last memtable reach a blob file too (a delete of chunks still in the
    // memtable would never be written out at all).
    std::thread::sleep(Duration::from_secs(2));
    let before = blob_bytes(&m.store);
    assert!(
        before >= (MIB as u64 * 2 - 24) << 20,
        "blob files hold {before} bytes before the delete"
    );

    std::fs::remove_file(m.c().join("deleted")).unwrap();
    // Collection stops once less than a quarter of the blob bytes is garbage: half of
    // them were, so well under 70 % of them stay.
    let start = Instant::now();
    let mut now = before;
    while start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        now = blob_bytes(&m.store);
        if now * 10 <= before * 7 {
            break;
        }
    }
    let log = std::fs::read_to_string(m.store.join("dedupfs.log")).unwrap_or_default();
    assert!(
        now * 10 <= before * 7,
        "blob files: {before} bytes before deleting half of the data, {now} bytes 60 s later; daemon log:\n{log}"
    );
    assert!(
        log.contains("blob garbage collection on"),
        "the daemon's log does not say it collected: {log}"
    );
    assert!(std::fs::read(m.c().join("kept")).unwrap() == kept_bytes);
    m.finish();
}
