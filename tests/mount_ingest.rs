//! `dedupfs ingest` through the real binary: done by the running mount's daemon (what the
//! mount shows afterwards must be the new tree, whatever the kernel had cached), done on an
//! unmounted store, and the one-line errors of bad input.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{ok, random, refused, run, Mounted};

fn set_mtime(p: &Path, secs: i64) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64))
        .unwrap();
}

#[test]
fn ingest_by_the_mount_shows_through_the_mount() {
    let mut m = Mounted::new();
    let src = m.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("new"), b"brand new").unwrap();
    std::fs::write(src.join("changed"), b"version B").unwrap();
    set_mtime(&src.join("changed"), 1_700_000_000);
    std::fs::write(src.join("sub/deep"), vec![7u8; 300_000]).unwrap();

    // What the kernel caches beforehand: a negative entry for "new", the attributes and
    // pages of "changed", a file the source does not have.
    assert!(std::fs::metadata(m.c().join("new")).is_err());
    std::fs::write(m.c().join("changed"), b"version A").unwrap();
    assert_eq!(std::fs::read(m.c().join("changed")).unwrap(), b"version A");
    std::fs::write(m.c().join("stale"), b"not in the source").unwrap();

    let out = ok(run(
        &m.store,
        &["ingest", src.to_str().unwrap(), "c", "--snapshot", "s1"],
    ));
    assert!(out.contains("3 files (3 written, 0 unchanged)"), "{out}");
    assert!(out.contains("1 removed"), "{out}");
    assert!(out.contains("created snapshot c@s1"), "{out}");

    assert_eq!(std::fs::read(m.c().join("new")).unwrap(), b"brand new");
    assert_eq!(std::fs::read(m.c().join("changed")).unwrap(), b"version B");
    let meta = std::fs::metadata(m.c().join("changed")).unwrap();
    assert_eq!(meta.mtime(), 1_700_000_000);
    assert_eq!(
        std::fs::read(m.c().join("sub/deep")).unwrap(),
        vec![7u8; 300_000]
    );
    assert!(
        !m.c().join("stale").exists(),
        "a name the source lacks stays"
    );
    assert_eq!(
        std::fs::read(m.c().join(".snapshots/s1/changed")).unwrap(),
        b"version B"
    );

    // Again, unchanged: nothing written.
    let out = ok(run(&m.store, &["ingest", src.to_str().unwrap(), "c/copy"]));
    assert!(out.contains("3 written"), "{out}");
    let out = ok(run(&m.store, &["ingest", src.to_str().unwrap(), "c/copy"]));
    assert!(out.contains("0 written, 3 unchanged"), "{out}");

    // A source holding the store and its mount: both are left out.
    let out = ok(run(
        &m.store,
        &["ingest", m.dir.path().to_str().unwrap(), "c/all"],
    ));
    assert!(out.contains("ingested"), "{out}");
    assert!(m.c().join("all/src/sub/deep").exists());
    assert!(!m.c().join("all/store").exists() && !m.c().join("all/mnt").exists());

    // Without a mount, the store is opened directly.
    m.unmount();
    std::fs::write(src.join("offline"), b"written while unmounted").unwrap();
    let out = ok(run(&m.store, &["ingest", src.to_str().unwrap(), "c"]));
    assert!(out.contains("1 written, 3 unchanged"), "{out}");
    m.mount();
    assert_eq!(
        std::fs::read(m.c().join("offline")).unwrap(),
        b"written while unmounted"
    );
    m.finish();
}

#[test]
fn ingest_refuses_bad_input_in_one_line() {
    let m = Mounted::new();
    let src = m.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let s = src.to_str().unwrap();
    refused(run(&m.store, &["ingest", s, "nosuch"]), "does not exist");
    refused(
        run(&m.store, &["ingest", "/no/such/dir", "c"]),
        "/no/such/dir",
    );
    refused(
        run(&m.store, &["ingest", s, "c", "--snapshot", "a@b"]),
        "invalid snapshot name",
    );
    refused(run(&m.store, &["ingest", s, "c", "--jobs", "0"]), "--jobs");
    refused(run(&m.store, &["ingest", s, "c/../x"]), "'..'");
    let inside = m.c().join("d");
    std::fs::create_dir(&inside).unwrap();
    refused(
        run(&m.store, &["ingest", inside.to_str().unwrap(), "c"]),
        "holds this store",
    );
    std::fs::write(m.c().join("plain"), b"").unwrap();
    refused(
        run(&m.store, &["ingest", s, "c/plain/x"]),
        "not a directory",
    );
    // A source entry that cannot be copied: the rest is, the exit is 1, no snapshot.
    std::fs::create_dir(src.join(".snapshots")).unwrap();
    let out = run(&m.store, &["ingest", s, "c", "--snapshot", "s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reserved") && err.contains("no snapshot taken"),
        "{err}"
    );
    assert!(m.c().join("f").exists());
    assert!(!m.c().join(".snapshots/s").exists());
    m.finish();
}

/// Every regular file under `root`, relative path -> content.
fn files_under(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn sigkill_during_an_ingest_leaves_a_clean_store_and_a_rerun_completes() {
    let mut m = Mounted::new();
    let src = m.dir.path().join("src");
    // Enough work that the kill lands mid-way: many small files and a few large ones.
    for d in 0..40 {
        let dir = src.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..100 {
            std::fs::write(
                dir.join(format!("f{i:03}")),
                random(2000 + i * 37, (d * 100 + i) as u64),
            )
            .unwrap();
        }
    }
    for i in 0..4 {
        std::fs::write(src.join(format!("big{i}")), random(48 << 20, 10_000 + i)).unwrap();
    }
    let pid = m.daemon_pid().expect("daemon pid");
    let mut child = std::process::Command::new(common::BIN)
        .args(["ingest", src.to_str().unwrap(), "c", "--store"])
        .arg(&m.store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the mount shows the first directory the ingest made: the files, and
    // the large ones' chunks, are still to come then.
    let started = std::time::Instant::now();
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the ingest ended before it showed anything"
        );
        if std::fs::read_dir(m.c()).unwrap().next().is_some() {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: plain syscall on the daemon's pid, read from the store's lock file.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the ingest finished before the kill: make it bigger"
    );
    m.forget_killed_mount();
    for _ in 0..400 {
        if !dedupfs::store::is_locked(&m.store) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    m.fsck_clean();
    m.mount();
    ok(run(&m.store, &["ingest", src.to_str().unwrap(), "c"]));
    assert!(
        files_under(&m.c()) == files_under(&src),
        "the rerun did not complete the mirror"
    );
    m.finish();
}
