//! The command line on bad input (one clear line, non-zero exit, the store unharmed), the
//! daemon's lifecycle (signals, fusermount3 -u), and container management with and without
//! a running mount.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{dedupfs, is_mounted, ok, Mounted};
use serde_json::Value;

/// The kernel may cache entries and attributes of the mount this long (fuse.rs TTL).
const ATTR_TTL_PLUS: Duration = Duration::from_millis(1100);

/// Asserts a clean refusal: non-zero exit, exactly one line on stderr that mentions every
/// needle (case-insensitive), no panic or backtrace. Returns the line.
fn refused(out: Output, what: &str, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !out.status.success(),
        "{what}: succeeded but should have failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked")
            && !stderr.contains("backtrace")
            && !stderr.contains("internal error"),
        "{what}: crashed instead of refusing:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want exactly one line on stderr, got:\n{stderr}"
    );
    let line = lines[0].to_lowercase();
    for needle in needles {
        assert!(
            line.contains(&needle.to_lowercase()),
            "{what}: message does not mention {needle:?}: {}",
            lines[0]
        );
    }
    lines[0].to_string()
}

fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    dedupfs(args)
}

fn fsck_clean(store: &Path) {
    ok(run(["fsck".as_ref(), store.as_os_str()]));
}

fn container(store: &Path, args: &[&str]) -> Output {
    let mut cmd: Vec<&OsStr> = vec!["container".as_ref()];
    cmd.extend(args.iter().map(|a| OsStr::new(*a)));
    cmd.push("--store".as_ref());
    cmd.push(store.as_os_str());
    run(cmd)
}

fn container_names(store: &Path) -> Vec<String> {
    let out = ok(container(store, &["list", "--json"]));
    let list: Value = serde_json::from_str(&out).expect("container list --json is JSON");
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|c| c["name"].as_str().expect("a name").to_string())
        .collect()
}

fn container_info(store: &Path, name: &str) -> Value {
    let out = ok(container(store, &["info", name, "--json"]));
    serde_json::from_str(&out).expect("container info --json is JSON")
}

/// Names in the mount root, as `ls` sees them.
fn listing(mnt: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(mnt)
        .expect("list the mount")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True once `pid` has exited (a zombie not yet reaped by init counts as exited).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: plain syscall on the daemon's pid.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill -{sig} {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// A directory tree's paths and file contents, to show a refused command touched nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
                out.push((p, None));
            } else {
                let bytes = std::fs::read(&p).ok();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// A second, unmounted store beside `m`'s.
fn init_store(dir: &Path, name: &str) -> PathBuf {
    let store = dir.join(name);
    ok(run(["init".as_ref(), store.as_os_str()]));
    store
}

#[test]
fn init_refuses_non_empty_dirs_and_existing_stores() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("precious.txt"), b"keep me").unwrap();
    let before = snapshot(&junk);
    refused(
        run(["init".as_ref(), junk.as_os_str()]),
        "init on a non-empty directory",
        &["not empty", "junk"],
    );
    assert_eq!(
        snapshot(&junk),
        before,
        "init touched a directory it refused"
    );

    let store = init_store(dir.path(), "store");
    let marker = std::fs::read(store.join("dedupfs-store")).unwrap();
    refused(
        run(["init".as_ref(), store.as_os_str()]),
        "init on an existing store",
        &["already", "store"],
    );
    assert_eq!(
        std::fs::read(store.join("dedupfs-store")).unwrap(),
        marker,
        "init rewrote the marker of an existing store"
    );
    fsck_clean(&store);

    // Bad chunking and compression settings create nothing.
    for (flag, value, needle) in [
        ("--chunk-avg", "3K", "chunk"),
        ("--chunk-avg", "banana", "banana"),
        ("--chunk-avg", "0", "0"),
        ("--chunk-avg", "64M", "chunk"),
        ("--compression", "lz4", "lz4"),
        ("--compression", "zstd:0", "zstd:0"),
        ("--compression", "zstd:99", "zstd:99"),
        ("--compression", "zstd:x", "zstd:x"),
    ] {
        let target = dir.path().join("bad");
        refused(
            run([
                "init".as_ref(),
                target.as_os_str(),
                flag.as_ref(),
                value.as_ref(),
            ]),
            &format!("init {flag} {value}"),
            &[needle],
        );
        assert!(
            !target.exists(),
            "init {flag} {value} created {}",
            target.display()
        );
    }
}

#[test]
fn mount_refuses_bad_stores_and_mountpoints() {
    let mut m = Mounted::new();
    let dir = m.dir.path().to_path_buf();
    let other_mnt = dir.join("mnt2");
    std::fs::create_dir(&other_mnt).unwrap();
    std::fs::write(m.c().join("f"), b"still here").unwrap();

    // A missing store.
    let missing = dir.join("no-such-store");
    refused(
        run(["mount".as_ref(), missing.as_os_str(), other_mnt.as_os_str()]),
        "mount of a missing store",
        &["no-such-store"],
    );
    assert!(!missing.exists());

    // A directory that is not a store.
    let plain = dir.join("plain");
    std::fs::create_dir(&plain).unwrap();
    std::fs::write(plain.join("x"), b"x").unwrap();
    let before = snapshot(&plain);
    refused(
        run(["mount".as_ref(), plain.as_os_str(), other_mnt.as_os_str()]),
        "mount of a non-store directory",
        &["not a dedupfs store", "plain"],
    );
    assert_eq!(
        snapshot(&plain),
        before,
        "mount wrote into a directory that is not a store"
    );

    // A missing mountpoint.
    let store2 = init_store(&dir, "store2");
    let nowhere = dir.join("no-such-mnt");
    refused(
        run(["mount".as_ref(), store2.as_os_str(), nowhere.as_os_str()]),
        "mount on a missing mountpoint",
        &["no-such-mnt"],
    );
    assert!(!nowhere.exists());
    let file = dir.join("a-file");
    std::fs::write(&file, b"").unwrap();
    refused(
        run(["mount".as_ref(), store2.as_os_str(), file.as_os_str()]),
        "mount on a regular file",
        &["not a directory", "a-file"],
    );

    // A busy mountpoint: another store, and the same store again.
    refused(
        run(["mount".as_ref(), store2.as_os_str(), m.mnt.as_os_str()]),
        "mount of another store on a busy mountpoint",
        &["busy", "mnt"],
    );
    refused(
        run(["mount".as_ref(), m.store.as_os_str(), m.mnt.as_os_str()]),
        "mount of the same store on its own mountpoint",
        &["busy"],
    );

    // The store is already mounted elsewhere.
    let line = refused(
        run(["mount".as_ref(), m.store.as_os_str(), other_mnt.as_os_str()]),
        "second mount of a mounted store",
        &["in use"],
    );
    assert!(
        line.contains(&m.mnt.canonicalize().unwrap().display().to_string()),
        "the refusal does not say where the store is mounted: {line}"
    );
    assert!(
        !is_mounted(&other_mnt),
        "a refused mount left something mounted"
    );

    // An unknown mount option.
    refused(
        run([
            "mount".as_ref(),
            store2.as_os_str(),
            other_mnt.as_os_str(),
            "-o".as_ref(),
            "noatime,frobnicate".as_ref(),
        ]),
        "mount with an unknown option",
        &["frobnicate"],
    );
    assert!(
        !is_mounted(&other_mnt),
        "a refused mount left something mounted"
    );
    assert!(
        !dedupfs::store::is_locked(&store2),
        "a refused mount left store2 locked"
    );

    // A store whose marker is from a newer format: refused everywhere, left as it was.
    m.unmount();
    let newer = dir.join("newer");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&m.store)
        .arg(&newer)
        .status()
        .unwrap();
    assert!(status.success(), "cp -a store");
    let marker_path = newer.join("dedupfs-store");
    let original = std::fs::read_to_string(&marker_path).unwrap();
    let mut marker: Value = serde_json::from_str(&original).unwrap();
    marker["format_version"] = Value::from(99);
    let edited = serde_json::to_string_pretty(&marker).unwrap();
    std::fs::write(&marker_path, &edited).unwrap();
    refused(
        run(["mount".as_ref(), newer.as_os_str(), other_mnt.as_os_str()]),
        "mount of a store from a newer format",
        &["99", "upgrade"],
    );
    assert!(!is_mounted(&other_mnt));
    refused(
        container(&newer, &["list"]),
        "container list on a store from a newer format",
        &["99"],
    );
    refused(
        run(["fsck".as_ref(), newer.as_os_str()]),
        "fsck of a store from a newer format",
        &["99"],
    );
    assert_eq!(std::fs::read_to_string(&marker_path).unwrap(), edited);
    // A marker that is not JSON at all.
    std::fs::write(&marker_path, b"{not json").unwrap();
    refused(
        run(["mount".as_ref(), newer.as_os_str(), other_mnt.as_os_str()]),
        "mount of a store with a damaged marker",
        &["marker", "newer"],
    );
    refused(
        container(&newer, &["list"]),
        "container list on a store with a damaged marker",
        &["marker"],
    );
    assert!(!is_mounted(&other_mnt));
    std::fs::write(&marker_path, &original).unwrap();
    fsck_clean(&newer);

    fsck_clean(&store2);
    m.mount();
    assert_eq!(std::fs::read(m.c().join("f")).unwrap(), b"still here");
    m.finish();
}

#[test]
fn bad_container_names_and_deletes() {
    let mut m = Mounted::new();
    let long = "n".repeat(300);
    let bad: [(&str, &str); 5] = [
        ("", "empty"),
        (&long, "255"),
        ("a/b", "a/b"),
        (".", "\".\""),
        ("..", "\"..\""),
    ];
    std::fs::write(m.c().join("f"), b"data").unwrap();
    for mounted in [true, false] {
        if !mounted {
            m.unmount();
        }
        let how = if mounted { "mounted" } else { "unmounted" };
        for (name, needle) in &bad {
            refused(
                container(&m.store, &["create", name]),
                &format!("container create {name:?} ({how})"),
                &[needle],
            );
            refused(
                container(&m.store, &["info", name]),
                &format!("container info {name:?} ({how})"),
                &[],
            );
            refused(
                container(&m.store, &["delete", name, "--force"]),
                &format!("container delete {name:?} ({how})"),
                &[],
            );
        }
        assert_eq!(
            container_names(&m.store),
            ["c"],
            "{how}: bad names changed the list"
        );

        refused(
            container(&m.store, &["info", "missing"]),
            &format!("container info of a missing container ({how})"),
            &["missing", "does not exist"],
        );
        refused(
            container(&m.store, &["delete", "missing"]),
            &format!("container delete of a missing container ({how})"),
            &["missing", "does not exist"],
        );
        refused(
            container(&m.store, &["create", "c"]),
            &format!("container create of an existing name ({how})"),
            &["already exists"],
        );
        refused(
            container(&m.store, &["delete", "c"]),
            &format!("container delete of a non-empty container ({how})"),
            &["--force", "not empty"],
        );
        assert_eq!(container_names(&m.store), ["c"]);
        assert_eq!(container_info(&m.store, "c")["files"], 1, "{how}");
    }
    fsck_clean(&m.store);
    m.mount();
    assert_eq!(std::fs::read(m.c().join("f")).unwrap(), b"data");
    m.finish();
}

#[test]
fn containers_while_mounted_and_unmounted() {
    let mut m = Mounted::new();
    let store = m.store.clone();

    // Mounted: through the control socket, visible in the mount.
    ok(container(&store, &["create", "alpha"]));
    assert_eq!(container_names(&store), ["alpha", "c"]);
    std::thread::sleep(ATTR_TTL_PLUS);
    assert_eq!(listing(&m.mnt), sorted(&["alpha", "c"]));
    let data = vec![7u8; 100_000];
    std::fs::write(m.mnt.join("alpha/file"), &data).unwrap();
    std::fs::create_dir(m.mnt.join("alpha/sub")).unwrap();
    let info = container_info(&store, "alpha");
    assert_eq!(info["name"], "alpha");
    assert_eq!(info["files"], 1, "{info}");
    assert_eq!(info["dirs"], 1, "{info}");
    assert_eq!(info["logical_bytes"], data.len() as u64, "{info}");
    let text = ok(container(&store, &["info", "alpha"]));
    assert!(text.contains("alpha"), "{text}");
    let text = ok(container(&store, &["list"]));
    assert!(text.contains("alpha") && text.contains("NAME"), "{text}");

    refused(
        container(&store, &["delete", "alpha"]),
        "delete of a non-empty container while mounted",
        &["--force"],
    );
    assert_eq!(std::fs::read(m.mnt.join("alpha/file")).unwrap(), data);
    ok(container(&store, &["delete", "alpha", "--force"]));
    assert_eq!(container_names(&store), ["c"]);
    std::thread::sleep(ATTR_TTL_PLUS);
    assert_eq!(listing(&m.mnt), sorted(&["c"]));
    let gone = std::fs::metadata(m.mnt.join("alpha")).unwrap_err();
    assert_eq!(gone.raw_os_error(), Some(libc::ENOENT), "{gone}");

    // The same name again is a new, empty container.
    ok(container(&store, &["create", "alpha"]));
    std::thread::sleep(ATTR_TTL_PLUS);
    assert_eq!(listing(&m.mnt), sorted(&["alpha", "c"]));
    assert!(std::fs::read_dir(m.mnt.join("alpha"))
        .unwrap()
        .next()
        .is_none());
    std::fs::write(m.mnt.join("alpha/again"), b"again").unwrap();
    ok(container(&store, &["create", "empty"]));
    ok(container(&store, &["delete", "empty"]));

    // Unmounted: the CLI opens the store itself.
    m.unmount();
    ok(container(&store, &["create", "beta"]));
    ok(container(&store, &["create", "gamma"]));
    assert_eq!(container_names(&store), ["alpha", "beta", "c", "gamma"]);
    assert_eq!(container_info(&store, "alpha")["files"], 1);
    let text = ok(container(&store, &["list"]));
    assert!(text.contains("beta") && text.contains("gamma"), "{text}");
    ok(container(&store, &["delete", "gamma"]));
    refused(
        container(&store, &["delete", "alpha"]),
        "delete of a non-empty container while unmounted",
        &["--force"],
    );
    ok(container(&store, &["delete", "alpha", "--force"]));
    assert_eq!(container_names(&store), ["beta", "c"]);
    fsck_clean(&store);

    m.mount();
    assert_eq!(listing(&m.mnt), sorted(&["beta", "c"]));
    std::fs::write(m.mnt.join("beta/x"), b"x").unwrap();
    assert_eq!(std::fs::read(m.mnt.join("beta/x")).unwrap(), b"x");
    m.finish();
}

/// Writes a file, stops the daemon with `sig`, and checks the unmount was clean.
fn stop_with_signal(sig: i32) {
    let mut m = Mounted::new();
    let pid = m.daemon_pid().expect("daemon pid");
    let data: Vec<u8> = (0..1_500_000u32).map(|i| (i ^ (i >> 9)) as u8).collect();
    std::fs::write(m.c().join("before-signal"), &data).unwrap();
    signal(pid, sig);
    wait_for("the mount is gone", Duration::from_secs(30), || {
        !is_mounted(&m.mnt)
    });
    wait_for("the daemon exits", Duration::from_secs(30), || exited(pid));
    wait_for("the store lock is free", Duration::from_secs(30), || {
        !dedupfs::store::is_locked(&m.store)
    });
    assert!(
        !m.store.join("control.sock").exists(),
        "the daemon left its control socket behind"
    );
    m.forget_killed_mount();
    fsck_clean(&m.store);
    m.mount();
    assert_eq!(std::fs::read(m.c().join("before-signal")).unwrap(), data);
    m.finish();
}

#[test]
fn sigterm_unmounts_cleanly() {
    stop_with_signal(libc::SIGTERM);
}

#[test]
fn sigint_unmounts_cleanly() {
    stop_with_signal(libc::SIGINT);
}

#[test]
fn sighup_unmounts_cleanly() {
    stop_with_signal(libc::SIGHUP);
}

/// Detaches whatever is still mounted at the path when a test fails half-way.
struct LazyUnmount(PathBuf);

impl Drop for LazyUnmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.0)
                .status();
        }
    }
}

/// `mount --foreground` serves until Ctrl-C, then flushes, unmounts and exits 0.
#[test]
fn foreground_mount_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path(), "store");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(common::BIN)
        .arg("mount")
        .arg(&store)
        .arg(&mnt)
        .arg("--foreground")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let _guard = LazyUnmount(mnt.clone());
    wait_for(
        "the foreground mount is up",
        Duration::from_secs(30),
        || is_mounted(&mnt) && store.join("control.sock").exists(),
    );
    ok(container(&store, &["create", "fg"]));
    std::thread::sleep(ATTR_TTL_PLUS);
    let data = vec![42u8; 200_000];
    std::fs::write(mnt.join("fg/file"), &data).unwrap();
    signal(pid, libc::SIGINT);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        status.success(),
        "foreground mount exited with {status}:\n{stderr}"
    );
    assert!(
        !is_mounted(&mnt),
        "still mounted after the foreground daemon exited"
    );
    assert!(!dedupfs::store::is_locked(&store));
    fsck_clean(&store);
    ok(run(["mount".as_ref(), store.as_os_str(), mnt.as_os_str()]));
    let back = std::fs::read(mnt.join("fg/file"));
    ok(run(["umount".as_ref(), mnt.as_os_str()]));
    assert_eq!(back.unwrap(), data);
    fsck_clean(&store);
}

/// A signal while a file is open and has unflushed writes: the mount detaches, and the
/// daemon finishes when the file is closed, committing it.
#[test]
fn sigterm_with_an_open_file_commits_at_close() {
    use std::io::Write;
    let mut m = Mounted::new();
    let pid = m.daemon_pid().expect("daemon pid");
    let mut f = std::fs::File::create(m.c().join("open")).unwrap();
    f.write_all(b"written while the signal arrived").unwrap();
    signal(pid, libc::SIGTERM);
    wait_for("the mount is detached", Duration::from_secs(30), || {
        !is_mounted(&m.mnt)
    });
    f.write_all(b", and after").unwrap();
    drop(f);
    wait_for("the daemon exits", Duration::from_secs(30), || exited(pid));
    wait_for("the store lock is free", Duration::from_secs(30), || {
        !dedupfs::store::is_locked(&m.store)
    });
    m.forget_killed_mount();
    fsck_clean(&m.store);
    m.mount();
    assert_eq!(
        std::fs::read(m.c().join("open")).unwrap(),
        b"written while the signal arrived, and after"
    );
    m.finish();
}

#[test]
fn fusermount_unmount_flushes() {
    let mut m = Mounted::new();
    let pid = m.daemon_pid().expect("daemon pid");
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(m.c().join("f"), &data).unwrap();
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(&m.mnt)
        .status()
        .unwrap();
    assert!(status.success(), "fusermount3 -u");
    assert!(!is_mounted(&m.mnt));
    wait_for("the store lock is free", Duration::from_secs(30), || {
        !dedupfs::store::is_locked(&m.store)
    });
    wait_for("the daemon exits", Duration::from_secs(30), || exited(pid));
    m.forget_killed_mount();
    fsck_clean(&m.store);
    m.mount();
    assert_eq!(std::fs::read(m.c().join("f")).unwrap(), data);
    m.finish();
}

#[test]
fn umount_with_an_open_file_is_refused_and_the_mount_keeps_working() {
    use std::io::{Read, Seek, Write};
    let m = Mounted::new();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.c().join("held"))
        .unwrap();
    f.write_all(b"held open").unwrap();
    refused(
        run(["umount".as_ref(), m.mnt.as_os_str()]),
        "umount with a file open",
        &["busy", "close"],
    );
    assert!(is_mounted(&m.mnt), "a refused umount unmounted");
    f.write_all(b", still writable").unwrap();
    f.rewind().unwrap();
    let mut back = String::new();
    f.read_to_string(&mut back).unwrap();
    assert_eq!(back, "held open, still writable");
    drop(f);
    m.finish();
}

#[test]
fn umount_of_what_is_not_mounted_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    refused(
        run(["umount".as_ref(), plain.as_os_str()]),
        "umount of a directory that is not mounted",
        &["not mounted", "plain"],
    );
    let missing = dir.path().join("missing");
    refused(
        run(["umount".as_ref(), missing.as_os_str()]),
        "umount of a missing path",
        &["missing"],
    );
}
