//! Disk full: with the store on a small filesystem, writes fail with ENOSPC, the daemon stays
//! up, what was written stays intact, and after files are deleted writes succeed again.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{dedupfs, ok};
use rand::{RngCore, SeedableRng};

/// A tmpfs of a given size, unmounted on drop.
struct SmallFs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn new(size: &str) -> SmallFs {
        let dir = tempfile::Builder::new()
            .prefix("dedupfs-enospc")
            .tempdir()
            .unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallFs { path, _dir: dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the daemon saw is the first thing to read when this test fails.
            let log = std::fs::read_to_string(self.path.join("store/dedupfs.log"));
            eprintln!("--- store log ---\n{}", log.unwrap_or_default());
        }
        let mnt = self.path.join("mnt");
        if common::is_mounted(&mnt) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&mnt)
                .status();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[test]
fn a_full_disk_gives_enospc_and_recovers_after_deletes() {
    const FILE: usize = 300 << 20;
    let fs = SmallFs::new("1200m");
    let store = fs.path.join("store");
    let mnt = fs.path.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(dedupfs(["init".as_ref(), store.as_os_str()]));
    ok(dedupfs([
        "mount".as_ref(),
        store.as_os_str(),
        mnt.as_os_str(),
    ]));
    ok(dedupfs([
        "container".as_ref(),
        "create".as_ref(),
        "c".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
    ]));
    let c = mnt.join("c");

    // Random data neither dedups nor compresses: the store fills.
    let first = data(1, FILE);
    write_file(&c.join("f0"), &first).unwrap();
    let mut written = vec![];
    let mut full = false;
    for i in 1..6 {
        match write_file(&c.join(format!("f{i}")), &data(i + 1, FILE)) {
            Ok(()) => written.push(i),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "f{i}: {e}");
                full = true;
                break;
            }
        }
    }
    assert!(full, "a 1200 MiB filesystem never filled up");

    // The daemon is up and what was written is intact.
    ok(dedupfs([
        "stats".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
    ]));
    assert!(std::fs::read(c.join("f0")).unwrap() == first, "f0 changed");

    // Deleting frees space; writes succeed again.
    for i in 1..6 {
        let _ = std::fs::remove_file(c.join(format!("f{i}")));
    }
    std::fs::remove_file(c.join("f0")).unwrap();
    let again = data(99, FILE);
    let mut result = Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
    for _ in 0..10 {
        // The space of deleted chunks comes back when RocksDB compacts, which the daemon
        // starts as soon as free space runs low; give it a moment.
        std::thread::sleep(std::time::Duration::from_millis(500));
        result = write_file(&c.join("again"), &again);
        if result.is_ok() {
            break;
        }
    }
    result.expect("writing after deleting files");
    assert!(std::fs::read(c.join("again")).unwrap() == again);

    ok(dedupfs(["umount".as_ref(), mnt.as_os_str()]));
    ok(dedupfs(["fsck".as_ref(), store.as_os_str()]));
}
