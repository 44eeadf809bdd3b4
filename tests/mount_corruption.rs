//! Verified reads (DESIGN.md, invariant 5): a chunk whose stored bytes were damaged reads
//! as EIO with a log line naming the file, offset and chunk; the rest of the file still
//! reads; fsck reports the chunk.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use common::{dedupfs, Mounted};
use dedupfs::chunking::CHUNK_HEADER;
use dedupfs::format::{is_tombstone, key, ExtentRecord};
use dedupfs::ids::{ChunkId, InodeNo};
use dedupfs::kv::{Batch, Cf, Sync};
use dedupfs::store::{Store, LOG_FILE};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

const PAGE: u64 = 4096;

/// Live extents of `ino`: (offset, chunk, length), in offset order.
fn extents(store: &Store, ino: InodeNo) -> Vec<(u64, ChunkId, u64)> {
    let mut out: Vec<(u64, ChunkId, u64)> = Vec::new();
    let mut last = None;
    for item in store.kv.scan_prefix(Cf::Extent, &key::extents_prefix(ino)) {
        let (k, v) = item.expect("scan extents");
        let (_, offset, _) = key::parse_extent(&k).expect("extent key parses");
        // Versions of one offset are adjacent, newest first.
        if last == Some(offset) {
            continue;
        }
        last = Some(offset);
        if is_tombstone(&v) {
            continue;
        }
        let rec = ExtentRecord::decode(&v).expect("extent record decodes");
        out.push((offset, rec.chunk, rec.len as u64));
    }
    out
}

/// pread of exactly `len` bytes at `offset`.
fn pread(f: &File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

const SIZE: usize = 2 << 20;

/// A mounted store holding `victim.bin` (SIZE random bytes) whose middle chunk was damaged
/// while the store was unmounted.
struct Damaged {
    m: Mounted,
    path: PathBuf,
    data: Vec<u8>,
    ino: InodeNo,
    /// The damaged chunk and the file range it holds.
    chunk: ChunkId,
    start: u64,
    len: u64,
}

fn damaged() -> Damaged {
    let mut m = Mounted::new();
    let path = m.c().join("victim.bin");
    let mut data = vec![0u8; SIZE];
    StdRng::seed_from_u64(0xbad_c0de).fill_bytes(&mut data);
    std::fs::write(&path, &data).unwrap();
    let ino = InodeNo(std::fs::metadata(&path).unwrap().ino());
    m.unmount();

    // Damage the chunk that holds the middle of the file, keeping its header valid.
    let (start, chunk, len) = {
        let store = Store::open(&m.store).expect("open the unmounted store");
        let map = extents(&store, ino);
        assert!(
            map.len() >= 8,
            "expected a multi-chunk file, got {} extents",
            map.len()
        );
        assert_eq!(
            map.iter().map(|e| e.2).sum::<u64>(),
            SIZE as u64,
            "extents cover the file"
        );
        let middle = (SIZE / 2) as u64;
        let (start, chunk, len) = *map
            .iter()
            .find(|(s, _, l)| *s <= middle && middle < s + l)
            .expect("an extent covers the middle");
        let mut stored = store
            .kv
            .get(Cf::Chunk, &chunk.0)
            .unwrap()
            .expect("the chunk is stored");
        assert!(stored.len() > CHUNK_HEADER + 1);
        let at = CHUNK_HEADER + (stored.len() - CHUNK_HEADER) / 2;
        stored[at] ^= 0x40;
        let mut batch = Batch::new();
        batch.put(&store.kv, Cf::Chunk, &chunk.0, &stored);
        store.kv.write(batch, Sync::Disk).unwrap();
        (start, chunk, len)
    };
    m.mount();
    Damaged {
        m,
        path,
        data,
        ino,
        chunk,
        start,
        len,
    }
}

/// fsck of the unmounted store must fail and name the chunk.
fn fsck_names(m: &mut Mounted, chunk: &ChunkId) {
    m.unmount();
    let out = dedupfs(["fsck".as_ref(), m.store.as_os_str()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = chunk.to_hex();
    assert!(
        !out.status.success(),
        "fsck passed a store with a corrupt chunk:\n{text}"
    );
    assert!(
        text.contains(&hash[..16]),
        "fsck output does not name chunk {hash}:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("1 problem") || l.contains(": 1 problem")),
        "fsck should find exactly one problem, the chunk:\n{text}"
    );
}

#[test]
fn corrupt_chunk_reads_as_eio_and_fsck_reports_it() {
    let Damaged {
        mut m,
        path,
        data,
        ino,
        chunk,
        start,
        len,
    } = damaged();
    let end = start + len;

    let f = File::open(&path).unwrap();
    // No read-ahead: each pread asks the daemon for exactly the pages it covers.
    // SAFETY: posix_fadvise on a descriptor we own.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(rc, 0, "posix_fadvise");

    // The damaged range: EIO, every time, never bytes.
    for (offset, n) in [(start, len), (start + len / 2, 1), (start, 1)] {
        for attempt in 0..2 {
            match pread(&f, offset, n) {
                Ok(_) => panic!("read of {n} bytes at {offset} inside the corrupt chunk returned data (attempt {attempt})"),
                Err(e) => assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EIO),
                    "read at {offset} inside the corrupt chunk: {e}"
                ),
            }
        }
    }
    let err = std::fs::read(&path).expect_err("reading the whole file hits the bad chunk");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "whole-file read: {err}"
    );

    // Pages before and after the damaged chunk read normally.
    let before = start / PAGE * PAGE;
    let after = end.div_ceil(PAGE) * PAGE;
    assert!(
        before > 0 && after < SIZE as u64,
        "the chunk is inside the file"
    );
    let head = pread(&f, 0, before).expect("read before the corrupt chunk");
    assert!(
        head == data[..before as usize],
        "bytes before the corrupt chunk differ"
    );
    let tail = pread(&f, after, SIZE as u64 - after).expect("read after the corrupt chunk");
    assert!(
        tail == data[after as usize..],
        "bytes after the corrupt chunk differ"
    );
    for offset in [0, before - 1, after, SIZE as u64 - 1] {
        let byte = pread(&f, offset, 1).expect("single byte outside the corrupt chunk");
        assert_eq!(byte[0], data[offset as usize], "byte at {offset}");
    }
    drop(f);

    // The daemon's log names the file, the offset and the chunk.
    let log = std::fs::read_to_string(m.store.join(LOG_FILE)).expect("daemon log");
    let hash = chunk.to_hex();
    let needle_ino = format!("inode {}", ino.0);
    let needle_offset = format!("offset {start}");
    assert!(
        log.lines().any(|l| l.contains(&needle_ino)
            && l.contains(&needle_offset)
            && l.contains(&hash)
            && l.to_lowercase().contains("mismatch")),
        "no log line names {needle_ino}, {needle_offset} and chunk {hash} as a hash mismatch:\n{log}"
    );

    // ... and the running mount counts it.
    let stats: serde_json::Value = serde_json::from_str(&common::ok(dedupfs([
        "stats".as_ref(),
        "--json".as_ref(),
        "--store".as_ref(),
        m.store.as_os_str(),
    ])))
    .expect("stats --json is JSON");
    let corrupt = stats["mount"]["corrupt_reads"].as_u64();
    assert!(
        corrupt.is_some_and(|n| n >= 1),
        "the mount's stats do not count the corrupt read: {stats}"
    );
    let text = common::ok(dedupfs([
        "stats".as_ref(),
        "--store".as_ref(),
        m.store.as_os_str(),
    ]));
    assert!(
        text.contains("corrupt chunk reads"),
        "stats does not show the corrupt reads:\n{text}"
    );

    // fsck finds the chunk.
    fsck_names(&mut m, &chunk);
}

/// A write into a damaged chunk needs the chunk's old bytes to re-chunk: the commit fails
/// with EIO instead of storing garbage, and the mount goes on serving everything else.
#[test]
fn write_into_a_corrupt_chunk_fails_at_fsync_and_the_mount_goes_on() {
    let Damaged {
        mut m,
        path,
        data,
        chunk,
        start,
        len,
        ..
    } = damaged();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"0123456789", start + len / 2)
        .expect("the write itself is only buffered");
    let err = f.sync_all().expect_err("fsync must not report success");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "fsync: {err}");
    drop(f);

    // Other files and the good parts of this one are unaffected.
    let other = m.c().join("other");
    std::fs::write(&other, &data[..300_000]).unwrap();
    assert!(std::fs::read(&other).unwrap() == data[..300_000]);
    let f = File::open(&path).unwrap();
    let head = pread(&f, 0, start / PAGE * PAGE).expect("read before the corrupt chunk");
    assert!(head == data[..head.len()]);
    let err = pread(&f, start, len).expect_err("the damaged range still fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(f);

    // A clean unmount, and the same single finding as before.
    m.unmount();
    fsck_names(&mut m, &chunk);
    m.mount();
    assert!(std::fs::read(&other).unwrap() == data[..300_000]);
    m.unmount();
}

#[test]
fn a_later_write_of_the_same_content_replaces_the_damaged_chunk() {
    let Damaged {
        mut m,
        path,
        data,
        start,
        len,
        ..
    } = damaged();
    // Reading finds the damage; the store now knows the stored copy is bad.
    let f = File::open(&path).unwrap();
    let err = pread(&f, start, len).expect_err("the damaged range fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(f);
    // The same content written to another file must be stored again, not deduplicated
    // onto the damaged copy: then both files read back whole.
    let copy = m.c().join("copy.bin");
    std::fs::write(&copy, &data).unwrap();
    File::open(&copy).unwrap().sync_all().unwrap();
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "the new file reads back"
    );
    m.remount();
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "the new file after remount"
    );
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the damaged file is healed by the rewrite"
    );
    m.finish();
}

/// `dedupfs ingest` replacing a changed small file whose old and new content both hold the
/// damaged chunk: the batch releases and references it again, and must still store the
/// verified bytes it brings (the other file holding the chunk is healed).
#[test]
fn an_ingest_replacing_a_file_repairs_the_damaged_chunk_it_holds() {
    let Damaged {
        m,
        path,
        data,
        start,
        len,
        ..
    } = damaged();
    // A source file holding exactly the damaged chunk's bytes: one chunk, the same one.
    let src = m.store.parent().unwrap().join("ingest-src");
    std::fs::create_dir(&src).unwrap();
    let piece = &data[start as usize..(start + len) as usize];
    std::fs::write(src.join("piece"), piece).unwrap();
    // Before the damage is known, the copy deduplicates onto the damaged chunk.
    common::ok(common::run(
        &m.store,
        &["ingest", src.to_str().unwrap(), "c/sub"],
    ));
    let f = File::open(&path).unwrap();
    let err = pread(&f, start, len).expect_err("the damaged range fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(f);
    // Changed (new mtime, same bytes): replaced in its group's batch.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
    File::options()
        .write(true)
        .open(src.join("piece"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    common::ok(common::run(
        &m.store,
        &["ingest", src.to_str().unwrap(), "c/sub"],
    ));
    assert!(std::fs::read(m.c().join("sub/piece")).unwrap() == piece);
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the damaged file is healed by the ingest"
    );
    m.finish();
}

#[test]
fn scrub_finds_quarantines_and_a_rewrite_after_a_remount_repairs() {
    let Damaged {
        mut m,
        path,
        data,
        start,
        chunk,
        ..
    } = damaged();
    // Scrub through the running mount: it names the chunk, the file and the offset.
    let out = dedupfs(["scrub".as_ref(), "--store".as_ref(), m.store.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "scrub must fail on damage:\n{text}");
    assert!(text.contains(&chunk.to_hex()), "{text}");
    assert!(
        text.contains("victim.bin") && text.contains(&format!("at offset {start}")),
        "{text}"
    );
    assert!(text.contains("1 damaged"), "{text}");
    // The quarantine survives a remount: the next write of the same content is stored
    // again instead of deduplicating onto the damaged copy, without any read first.
    m.remount();
    let copy = m.c().join("copy.bin");
    std::fs::write(&copy, &data).unwrap();
    File::open(&copy).unwrap().sync_all().unwrap();
    assert!(
        std::fs::read(&path).unwrap() == data,
        "healed by the rewrite"
    );
    // Unmounted scrub, JSON: nothing damaged any more.
    m.unmount();
    let out = dedupfs([
        "scrub".as_ref(),
        "--json".as_ref(),
        "--store".as_ref(),
        m.store.as_os_str(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(report["bad"].as_array().unwrap().len(), 0);
    assert!(report["chunks"].as_u64().unwrap() >= 8);
    m.finish();
}
