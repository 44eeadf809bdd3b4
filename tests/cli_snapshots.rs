//! Snapshot commands through the real binary: restore mounts (beside the main mount and
//! alone), `dedupfs restore` with metadata, prune, and the one-line errors of bad input.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;

use common::{dedupfs, is_mounted, ok, random, refused, run, Mounted};
use serde_json::Value;

/// `dedupfs mount STORE AT --snapshot SPEC`.
fn mount_snapshot(store: &Path, at: &Path, spec: &str) -> Output {
    dedupfs([
        "mount".as_ref(),
        store.as_os_str(),
        at.as_os_str(),
        "--snapshot".as_ref(),
        spec.as_ref(),
    ])
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn snapshot_mounts_beside_the_main_mount_and_alone() {
    let mut m = Mounted::new();
    std::fs::create_dir(m.c().join("d")).unwrap();
    std::fs::write(m.c().join("d/f"), b"before").unwrap();
    ok(run(&m.store, &["snapshot", "create", "c", "s1"]));
    std::fs::write(m.c().join("d/f"), b"after").unwrap();

    // Beside the main mount: the running daemon serves it.
    let snap = m.dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    ok(mount_snapshot(&m.store, &snap, "c@s1"));
    assert_eq!(std::fs::read(snap.join("d/f")).unwrap(), b"before");
    assert_eq!(std::fs::read(m.c().join("d/f")).unwrap(), b"after");
    assert_eq!(
        errno_of(std::fs::write(snap.join("d/new"), b"x")),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno_of(std::fs::remove_file(snap.join("d/f"))),
        Some(libc::EROFS)
    );
    // A mounted snapshot cannot be deleted.
    refused(run(&m.store, &["snapshot", "delete", "c", "s1"]), "in use");
    ok(dedupfs(["umount".as_ref(), snap.as_os_str()]));
    assert!(!is_mounted(&snap));

    // Alone: the store is not mounted, the snapshot mount holds it.
    m.unmount();
    ok(mount_snapshot(&m.store, &snap, "c@s1"));
    assert_eq!(std::fs::read(snap.join("d/f")).unwrap(), b"before");
    assert_eq!(
        errno_of(std::fs::create_dir(snap.join("x"))),
        Some(libc::EROFS)
    );
    ok(dedupfs(["umount".as_ref(), snap.as_os_str()]));

    refused(mount_snapshot(&m.store, &snap, "c@nope"), "does not exist");
    refused(mount_snapshot(&m.store, &snap, "c"), "CONTAINER@SNAPSHOT");
    assert!(!is_mounted(&snap));
    m.mount();
    ok(run(&m.store, &["snapshot", "delete", "c", "s1"]));
    m.finish();
}

/// A restore mount serves reads with no open state (its kernel sends no OPEN or RELEASE, see
/// fuse.rs): many small files, a file of many chunks read whole and by two threads at
/// scattered offsets at once, and a sparse file all read back as written, twice; SEEK_DATA
/// and SEEK_HOLE find the sparse file's data there and in the live container.
#[test]
fn restore_mount_reads_files_without_open_state() {
    use std::os::unix::fs::FileExt;
    let m = Mounted::new();
    let c = m.c();
    std::fs::create_dir(c.join("many")).unwrap();
    let small: Vec<Vec<u8>> = (0..300).map(|i| random(100 + i * 37, i as u64)).collect();
    for (i, data) in small.iter().enumerate() {
        std::fs::write(c.join(format!("many/{i}")), data).unwrap();
    }
    let big = random(6 << 20, 7);
    std::fs::write(c.join("big"), &big).unwrap();
    let sparse = std::fs::File::create(c.join("sparse")).unwrap();
    sparse.write_all_at(b"middle", 5 << 20).unwrap();
    sparse.set_len(9 << 20).unwrap();
    drop(sparse);
    ok(run(&m.store, &["snapshot", "create", "c", "s1"]));
    std::fs::write(c.join("big"), b"changed").unwrap();

    let snap = m.dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    ok(mount_snapshot(&m.store, &snap, "c@s1"));
    for round in 0..2 {
        for (i, data) in small.iter().enumerate() {
            let got = std::fs::read(snap.join(format!("many/{i}"))).unwrap();
            assert!(got == *data, "round {round}: many/{i}");
        }
        assert!(
            std::fs::read(snap.join("big")).unwrap() == big,
            "round {round}: big"
        );
        let sparse = std::fs::read(snap.join("sparse")).unwrap();
        assert_eq!(sparse.len(), 9 << 20);
        assert_eq!(&sparse[5 << 20..(5 << 20) + 6], b"middle");
        assert!(sparse[..5 << 20].iter().all(|b| *b == 0));
    }
    std::thread::scope(|scope| {
        for t in 0..2u64 {
            let (path, big) = (snap.join("big"), &big);
            scope.spawn(move || {
                let f = std::fs::File::open(path).unwrap();
                for k in 0..200u64 {
                    let at = (k * 7919 + t * 104_729) * 131 % (big.len() as u64 - 70_000);
                    let mut buf = vec![0u8; 70_000];
                    f.read_exact_at(&mut buf, at).unwrap();
                    assert!(buf[..] == big[at as usize..at as usize + 70_000], "at {at}");
                }
            });
        }
    });
    // SEEK_DATA and SEEK_HOLE, live and in the restore mount: data at 5 MiB only.
    for path in [c.join("sparse"), snap.join("sparse")] {
        let f = std::fs::File::open(&path).unwrap();
        let seek = |at: i64, whence| {
            // SAFETY: a plain lseek on an open descriptor.
            let r = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), at, whence) };
            if r < 0 {
                Err(std::io::Error::last_os_error().raw_os_error())
            } else {
                Ok(r)
            }
        };
        let (data, end) = (5i64 << 20, 9i64 << 20);
        assert_eq!(seek(0, libc::SEEK_DATA), Ok(data), "{}", path.display());
        assert_eq!(seek(data, libc::SEEK_HOLE), Ok(data + 6));
        assert_eq!(seek(0, libc::SEEK_HOLE), Ok(0));
        assert_eq!(seek(data + 6, libc::SEEK_DATA), Err(Some(libc::ENXIO)));
        assert_eq!(seek(end, libc::SEEK_HOLE), Err(Some(libc::ENXIO)));
    }
    refused(run(&m.store, &["snapshot", "delete", "c", "s1"]), "in use");
    ok(dedupfs(["umount".as_ref(), snap.as_os_str()]));
    ok(run(&m.store, &["snapshot", "delete", "c", "s1"]));
    m.finish();
}

/// Metadata a restore must bring back, as lstat sees it.
fn meta(p: &Path) -> (u32, u32, u32, u64, i64, i64) {
    let md = std::fs::symlink_metadata(p).unwrap();
    (
        md.mode(),
        md.uid(),
        md.gid(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
    )
}

#[test]
fn restore_brings_back_data_and_metadata_mounted_or_not() {
    let mut m = Mounted::new();
    let c = m.c();
    std::fs::create_dir(c.join("tree")).unwrap();
    let t = c.join("tree");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(t.join("big"), &data).unwrap();
    std::fs::write(t.join("small"), b"hello").unwrap();
    std::fs::set_permissions(t.join("small"), std::fs::Permissions::from_mode(0o4751)).unwrap();
    std::os::unix::fs::chown(t.join("small"), Some(1234), Some(5678)).unwrap();
    std::fs::hard_link(t.join("small"), t.join("small-link")).unwrap();
    std::os::unix::fs::symlink("small", t.join("sym")).unwrap();
    let sparse = std::fs::File::create(t.join("sparse")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    drop(sparse);
    ok(command_on(
        &["setfattr", "-n", "user.k", "-v", "v1"],
        &t.join("small"),
    ));
    let before: Vec<_> = ["big", "small", "small-link", "sym", "sparse"]
        .iter()
        .map(|n| (n.to_string(), meta(&t.join(n))))
        .collect();
    ok(run(&m.store, &["snapshot", "create", "c", "s"]));
    std::fs::remove_dir_all(&t).unwrap();

    let check = |dest: &Path| {
        for (name, want) in &before {
            assert_eq!(
                &meta(&dest.join(name)),
                want,
                "{name} in {}",
                dest.display()
            );
        }
        assert_eq!(std::fs::read(dest.join("big")).unwrap(), data);
        assert_eq!(
            std::fs::symlink_metadata(dest.join("small")).unwrap().ino(),
            std::fs::symlink_metadata(dest.join("small-link"))
                .unwrap()
                .ino(),
            "hard link kept"
        );
        assert_eq!(
            std::fs::read_link(dest.join("sym")).unwrap(),
            Path::new("small")
        );
        let sparse = std::fs::metadata(dest.join("sparse")).unwrap();
        assert!(sparse.blocks() * 512 < 1 << 20, "holes kept sparse");
        let x = std::process::Command::new("getfattr")
            .args(["-n", "user.k", "--only-values"])
            .arg(dest.join("small"))
            .output()
            .unwrap();
        assert_eq!(x.stdout, b"v1");
    };

    // Mounted: read through the mount's snapshot view.
    let out1 = m.dir.path().join("out1");
    let restored = ok(run(
        &m.store,
        &["restore", "c@s:tree", out1.to_str().unwrap()],
    ));
    assert!(restored.contains("restored"), "{restored}");
    check(&out1);
    // Run again: everything is there already.
    let again = ok(run(
        &m.store,
        &["restore", "c@s:tree", out1.to_str().unwrap()],
    ));
    assert!(again.contains("already there"), "{again}");

    // Not mounted: read through the library.
    m.unmount();
    let out2 = m.dir.path().join("out2");
    ok(run(
        &m.store,
        &["restore", "c@s:/tree", out2.to_str().unwrap()],
    ));
    check(&out2);
    // One file.
    let one = m.dir.path().join("one");
    ok(run(
        &m.store,
        &["restore", "c@s:tree/small", one.to_str().unwrap()],
    ));
    assert_eq!(std::fs::read(&one).unwrap(), b"hello");

    // A differing file needs --overwrite.
    std::fs::write(out2.join("small"), b"changed").unwrap();
    refused(
        run(&m.store, &["restore", "c@s:tree", out2.to_str().unwrap()]),
        "--overwrite",
    );
    ok(run(
        &m.store,
        &["restore", "c@s:tree", out2.to_str().unwrap(), "--overwrite"],
    ));
    assert_eq!(std::fs::read(out2.join("small")).unwrap(), b"hello");

    let out3 = m.dir.path().join("out3");
    let out3 = out3.to_str().unwrap();
    refused(
        run(&m.store, &["restore", "c@nope", out3]),
        "does not exist",
    );
    refused(
        run(&m.store, &["restore", "nope@s", out3]),
        "does not exist",
    );
    refused(run(&m.store, &["restore", "c", out3]), "CONTAINER@SNAPSHOT");
    refused(
        run(&m.store, &["restore", "c@s:tree/missing", out3]),
        "missing",
    );
    m.mount();
    m.finish();
}

fn command_on(cmd: &[&str], path: &Path) -> Output {
    std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .arg(path)
        .output()
        .unwrap()
}

fn snapshot_names(store: &Path) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&ok(run(store, &["snapshot", "list", "c", "--json"]))).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn prune_keeps_what_the_policy_says() {
    let m = Mounted::new();
    for i in 1..=5 {
        std::fs::write(m.c().join("f"), format!("generation {i}")).unwrap();
        ok(run(
            &m.store,
            &["snapshot", "create", "c", &format!("g{i}")],
        ));
    }
    let dry = ok(run(
        &m.store,
        &["snapshot", "prune", "c", "--keep-last", "2", "--dry-run"],
    ));
    assert!(dry.contains("would remove c@g1"), "{dry}");
    assert_eq!(snapshot_names(&m.store).len(), 5, "dry run removes nothing");
    let out = ok(run(
        &m.store,
        &["snapshot", "prune", "c", "--keep-last", "2"],
    ));
    assert!(out.contains("keep   c@g5  (last snapshot 1)"), "{out}");
    assert_eq!(snapshot_names(&m.store), ["g4", "g5"]);
    // Every snapshot was taken this hour: keep-hourly 1 keeps only the newest.
    ok(run(
        &m.store,
        &["snapshot", "prune", "c", "--keep-hourly", "1"],
    ));
    assert_eq!(snapshot_names(&m.store), ["g5"]);
    assert_eq!(
        std::fs::read(m.c().join(".snapshots/g5/f")).unwrap(),
        b"generation 5"
    );
    refused(run(&m.store, &["snapshot", "prune", "c"]), "--keep");
    m.finish();
}

#[test]
fn snapshot_commands_refuse_bad_input() {
    let m = Mounted::new();
    ok(run(&m.store, &["snapshot", "create", "c", "one"]));
    refused(
        run(&m.store, &["snapshot", "create", "c", "one"]),
        "already exists",
    );
    for bad in ["a@b", "a:b", "..", ".", "a/b"] {
        refused(
            run(&m.store, &["snapshot", "create", "c", bad]),
            "invalid snapshot name",
        );
    }
    let long = "x".repeat(300);
    refused(
        run(&m.store, &["snapshot", "create", "c", &long]),
        "invalid snapshot name",
    );
    refused(
        run(&m.store, &["snapshot", "create", "nope"]),
        "does not exist",
    );
    refused(
        run(&m.store, &["snapshot", "delete", "c", "nope"]),
        "does not exist",
    );
    refused(
        run(&m.store, &["snapshot", "list", "nope"]),
        "does not exist",
    );
    // A default name is the UTC time.
    let out = ok(run(&m.store, &["snapshot", "create", "c"]));
    assert!(out.contains("c@20"), "{out}");
    // .snapshots is reserved in a container root and hidden from its listing.
    assert_eq!(
        errno_of(std::fs::create_dir(m.c().join(".snapshots"))),
        Some(libc::EEXIST)
    );
    let names: Vec<_> = std::fs::read_dir(m.c())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "{names:?}");
    m.finish();
}

fn stored_bytes(store: &Path) -> u64 {
    let v: Value = serde_json::from_str(&ok(run(store, &["stats", "--json"]))).unwrap();
    v["stored_bytes"].as_u64().unwrap()
}

#[test]
fn rollback_undoes_every_change_and_gives_space_back() {
    let m = Mounted::new();
    let c = m.c();
    std::fs::create_dir(c.join("d")).unwrap();
    let big = random(4 << 20, 1);
    std::fs::write(c.join("d/big"), &big).unwrap();
    std::fs::write(c.join("d/f"), b"one").unwrap();
    std::fs::write(c.join("gone"), b"keep me").unwrap();
    std::fs::hard_link(c.join("d/f"), c.join("f-link")).unwrap();
    ok(run(&m.store, &["snapshot", "create", "c", "s1"]));
    // Read through the kernel cache before the changes, so that stale pages would show.
    assert_eq!(std::fs::read(c.join("d/f")).unwrap(), b"one");
    let at_snapshot = stored_bytes(&m.store);

    std::fs::write(c.join("d/f"), b"two").unwrap();
    std::fs::remove_file(c.join("gone")).unwrap();
    std::fs::remove_file(c.join("f-link")).unwrap();
    std::fs::write(c.join("new"), random(3 << 20, 2)).unwrap();
    std::fs::create_dir(c.join("newdir")).unwrap();
    std::fs::rename(c.join("d/big"), c.join("newdir/big")).unwrap();
    ok(run(&m.store, &["snapshot", "create", "c", "s2"]));
    std::fs::write(c.join("after-s2"), b"x").unwrap();
    assert!(stored_bytes(&m.store) > at_snapshot + (2 << 20));

    refused(
        run(&m.store, &["snapshot", "rollback", "c", "s1"]),
        "--destroy-newer",
    );
    // An open file needs --force; then its handle sees the rolled-back file.
    let held = std::fs::File::open(c.join("d/f")).unwrap();
    refused(
        run(
            &m.store,
            &["snapshot", "rollback", "c", "s1", "--destroy-newer"],
        ),
        "--force",
    );
    ok(run(
        &m.store,
        &[
            "snapshot",
            "rollback",
            "c",
            "s1",
            "--destroy-newer",
            "--force",
        ],
    ));
    drop(held);
    assert_eq!(std::fs::read(c.join("d/f")).unwrap(), b"one");
    assert_eq!(std::fs::read(c.join("gone")).unwrap(), b"keep me");
    assert_eq!(std::fs::read(c.join("d/big")).unwrap(), big);
    assert_eq!(
        std::fs::metadata(c.join("d/f")).unwrap().ino(),
        std::fs::metadata(c.join("f-link")).unwrap().ino()
    );
    let mut names: Vec<_> = std::fs::read_dir(&c)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "f-link", "gone"]);
    assert_eq!(snapshot_names(&m.store), ["s1"]);
    assert_eq!(
        stored_bytes(&m.store),
        at_snapshot,
        "space of later writes back"
    );
    // The container works on after the rollback.
    std::fs::write(c.join("d/f"), b"three").unwrap();
    assert_eq!(std::fs::read(c.join(".snapshots/s1/d/f")).unwrap(), b"one");
    m.finish();
}

#[test]
fn clone_makes_a_writable_container_that_shares_data() {
    let m = Mounted::new();
    let c = m.c();
    std::fs::create_dir(c.join("vm")).unwrap();
    let disk = random(6 << 20, 3);
    std::fs::write(c.join("vm/disk.img"), &disk).unwrap();
    std::fs::write(c.join("vm/conf"), b"cpus=2").unwrap();
    std::os::unix::fs::symlink("disk.img", c.join("vm/current")).unwrap();
    ok(run(&m.store, &["snapshot", "create", "c", "golden"]));
    std::fs::write(c.join("vm/conf"), b"cpus=4").unwrap();
    let before = stored_bytes(&m.store);

    ok(run(&m.store, &["container", "clone", "c@golden", "c2"]));
    let c2 = m.mnt.join("c2");
    assert_eq!(std::fs::read(c2.join("vm/disk.img")).unwrap(), disk);
    assert_eq!(std::fs::read(c2.join("vm/conf")).unwrap(), b"cpus=2");
    assert_eq!(
        std::fs::read_link(c2.join("vm/current")).unwrap(),
        Path::new("disk.img")
    );
    assert!(
        stored_bytes(&m.store) < before + (64 << 10),
        "a clone copies no data"
    );
    // Writable, and independent of its origin.
    std::fs::write(c2.join("vm/conf"), b"cpus=8").unwrap();
    assert_eq!(std::fs::read(c.join("vm/conf")).unwrap(), b"cpus=4");
    refused(
        run(&m.store, &["container", "clone", "c@golden", "c2"]),
        "already exists",
    );
    refused(
        run(&m.store, &["container", "clone", "c@nope", "c3"]),
        "does not exist",
    );
    // The origin's snapshot can go; the clone keeps its data.
    ok(run(&m.store, &["snapshot", "delete", "c", "golden"]));
    assert_eq!(std::fs::read(c2.join("vm/disk.img")).unwrap(), disk);
    m.finish();
}

#[test]
fn the_mount_takes_and_prunes_scheduled_snapshots() {
    let m = Mounted::new();
    std::fs::write(m.c().join("f"), b"data").unwrap();
    ok(run(&m.store, &["snapshot", "create", "c", "by-hand"]));
    let set = ok(run(
        &m.store,
        &[
            "container",
            "set",
            "c",
            "--snapshot-every",
            "1s",
            "--keep-last",
            "2",
        ],
    ));
    assert!(set.contains("keeping last 2"), "{set}");
    // One snapshot a second: after 4 s at least three were taken, so one was pruned.
    let started = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let auto = snapshot_names(&m.store)
            .iter()
            .filter(|n| n.starts_with("auto-"))
            .count();
        if auto >= 2 && started.elapsed() > std::time::Duration::from_secs(4) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no scheduled snapshots"
        );
    }
    let names = snapshot_names(&m.store);
    assert!(names.contains(&"by-hand".to_string()), "{names:?}");
    assert!(
        names.iter().filter(|n| n.starts_with("auto-")).count() <= 2,
        "pruned to the policy: {names:?}"
    );
    let info = ok(run(&m.store, &["container", "info", "c"]));
    assert!(
        info.contains("schedule: a snapshot every 1 s, keeping last 2"),
        "{info}"
    );
    ok(run(&m.store, &["container", "set", "c", "--no-schedule"]));
    let after = snapshot_names(&m.store).len();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(snapshot_names(&m.store).len(), after, "schedule removed");
    refused(
        run(
            &m.store,
            &["container", "set", "c", "--snapshot-every", "soon"],
        ),
        "expected a duration",
    );
    m.finish();
}
