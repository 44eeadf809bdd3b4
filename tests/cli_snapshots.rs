//! Snapshot commands through the real binary: restore mounts (beside the main mount and
//! alone), `dedupfs restore` with metadata, prune, and the one-line errors of bad input.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;

use common::{dedupfs, is_mounted, ok, Mounted};
use serde_json::Value;

fn run(store: &Path, args: &[&str]) -> Output {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| a.into()).collect();
    all.push("--store".into());
    all.push(store.into());
    dedupfs(all)
}

/// Asserts a one-line error naming `needle`, and a non-zero exit.
fn refused(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure for {needle:?}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
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
    ok(dedupfs([
        "mount".as_ref(),
        m.store.as_os_str(),
        snap.as_os_str(),
        "--snapshot".as_ref(),
        "c@s1".as_ref(),
    ]));
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
    ok(dedupfs([
        "mount".as_ref(),
        m.store.as_os_str(),
        snap.as_os_str(),
        "--snapshot".as_ref(),
        "c@s1".as_ref(),
    ]));
    assert_eq!(std::fs::read(snap.join("d/f")).unwrap(), b"before");
    assert_eq!(
        errno_of(std::fs::create_dir(snap.join("x"))),
        Some(libc::EROFS)
    );
    ok(dedupfs(["umount".as_ref(), snap.as_os_str()]));

    refused(
        dedupfs([
            "mount".as_ref(),
            m.store.as_os_str(),
            snap.as_os_str(),
            "--snapshot".as_ref(),
            "c@nope".as_ref(),
        ]),
        "does not exist",
    );
    refused(
        dedupfs([
            "mount".as_ref(),
            m.store.as_os_str(),
            snap.as_os_str(),
            "--snapshot".as_ref(),
            "c".as_ref(),
        ]),
        "CONTAINER@SNAPSHOT",
    );
    assert!(!is_mounted(&snap));
    m.mount();
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
