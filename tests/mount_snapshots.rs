//! Snapshots through a real mount: `<container>/.snapshots/<name>` shows the container as it
//! was, with its contents, modes, owners, times, xattrs, symlinks and hard links; it is
//! read-only (EROFS); its inode numbers survive a remount; `snapshot list` reports it and
//! `snapshot delete` gives its space back. Every scenario ends with fsck clean.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{dedupfs, ok, random, Mounted};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("error without errno: {e}")),
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn lsetxattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).expect("name"));
    // SAFETY: valid C strings and a buffer of the given length.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

fn lremovexattr(p: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).expect("name"));
    // SAFETY: valid C strings.
    check(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) })
}

/// Every xattr of `p` (not following a symlink) with its value.
fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 64 * KIB];
    // SAFETY: `buf` has the capacity we pass.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    buf.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in buf.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let cname = CString::new(name).expect("name");
        let mut value = vec![0u8; 64 * KIB];
        // SAFETY: as above.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(
            n >= 0,
            "lgetxattr {}: {}",
            p.display(),
            io::Error::last_os_error()
        );
        value.truncate(n as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    out
}

/// Sets atime and mtime of `p` (not following a symlink), in nanoseconds.
fn set_times(p: &Path, atime: i64, mtime: i64) -> io::Result<()> {
    let ts = |ns: i64| libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    };
    let times = [ts(atime), ts(mtime)];
    let c = cpath(p);
    // SAFETY: a NUL-terminated path and two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// What a user sees of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    blocks: u64,
    data: Option<Vec<u8>>,
    target: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// A tree: every path below the root (the root itself as ""), with what it shows and its
/// inode number.
type Capture = BTreeMap<PathBuf, (Seen, u64)>;

fn capture(root: &Path) -> Capture {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let md =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        let ft = md.file_type();
        let seen = Seen {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            nlink: md.nlink(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            blocks: md.blocks(),
            data: ft.is_file().then(|| {
                fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            }),
            target: ft
                .is_symlink()
                .then(|| fs::read_link(&path).expect("readlink")),
            xattrs: xattrs(&path),
        };
        if ft.is_dir() {
            for e in fs::read_dir(&path).expect("read_dir") {
                stack.push(rel.join(e.expect("entry").file_name()));
            }
        }
        out.insert(rel, (seen, md.ino()));
    }
    out
}

/// The paths of a capture grouped by inode number: which names are links of one inode.
fn link_groups(c: &Capture) -> BTreeSet<Vec<PathBuf>> {
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (p, (_, ino)) in c {
        by_ino.entry(*ino).or_default().push(p.clone());
    }
    by_ino.into_values().collect()
}

/// Asserts that `got` shows what `want` showed, path by path (inode numbers aside), and
/// the same hard links.
fn assert_same_tree(got: &Capture, want: &Capture, ctx: &str) {
    let got_paths: Vec<&PathBuf> = got.keys().collect();
    let want_paths: Vec<&PathBuf> = want.keys().collect();
    assert_eq!(got_paths, want_paths, "{ctx}: paths");
    for (p, (seen, _)) in want {
        assert_eq!(&got[p].0, seen, "{ctx}: {}", p.display());
    }
    assert_eq!(link_groups(got), link_groups(want), "{ctx}: hard links");
}

fn snapshot_create(m: &Mounted, name: &str) {
    ok(dedupfs([
        "snapshot".as_ref(),
        "create".as_ref(),
        "c".as_ref(),
        name.as_ref(),
        "--store".as_ref(),
        m.store.as_os_str(),
    ]));
}

fn snapshot_delete(m: &Mounted, name: &str) -> String {
    ok(dedupfs([
        "snapshot".as_ref(),
        "delete".as_ref(),
        "c".as_ref(),
        name.as_ref(),
        "--store".as_ref(),
        m.store.as_os_str(),
    ]))
}

fn snapshot_list(m: &Mounted) -> Vec<serde_json::Value> {
    let out = ok(dedupfs([
        "snapshot".as_ref(),
        "list".as_ref(),
        "c".as_ref(),
        "--json".as_ref(),
        "--store".as_ref(),
        m.store.as_os_str(),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("snapshot list --json");
    v.as_array().expect("an array").clone()
}

fn stored_bytes(m: &Mounted) -> u64 {
    let out = ok(dedupfs([
        "stats".as_ref(),
        "--json".as_ref(),
        "--store".as_ref(),
        m.store.as_os_str(),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("stats --json");
    v["stored_bytes"].as_u64().expect("stored_bytes")
}

fn write_file(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).expect("write");
}

/// A tree with every kind of thing a snapshot must keep.
fn populate(c: &Path) {
    write_file(&c.join("big"), &random(3 * MIB / 2, 1));
    write_file(&c.join("small"), b"hello");
    fs::set_permissions(c.join("small"), fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::chown(c.join("small"), Some(1234), Some(5678)).expect("chown");
    set_times(
        &c.join("small"),
        1_000_000_000_123,
        1_000_000_000_456_789_012,
    )
    .expect("utimens");
    fs::hard_link(c.join("small"), c.join("small-link")).expect("link");
    {
        let f = File::create(c.join("sparse")).expect("create");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&random(4096, 2), 0).expect("write");
        f.write_all_at(&random(4096, 3), 10 * MIB as u64)
            .expect("write");
    }
    fs::create_dir(c.join("sub")).expect("mkdir");
    fs::set_permissions(c.join("sub"), fs::Permissions::from_mode(0o750)).expect("chmod");
    lsetxattr(&c.join("sub"), "user.dir", b"on a directory").expect("setxattr");
    fs::create_dir(c.join("sub/deep")).expect("mkdir");
    write_file(&c.join("sub/deep/file"), &random(200 * KIB, 4));
    lsetxattr(&c.join("sub/deep/file"), "user.a", b"1").expect("setxattr");
    lsetxattr(&c.join("sub/deep/file"), "user.b", &random(1000, 5)).expect("setxattr");
    std::os::unix::fs::symlink("../small", c.join("sub/sym")).expect("symlink");
    fs::create_dir(c.join("empty-dir")).expect("mkdir");
    File::create(c.join("empty-file")).expect("create");
    set_times(
        &c.join("sub"),
        2_000_000_000_000_000_000,
        1_500_000_000_000_000_001,
    )
    .expect("utimens dir");
}

/// Changes every kind of thing `populate` made.
fn change(c: &Path) {
    {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new()
            .write(true)
            .open(c.join("big"))
            .expect("open");
        f.write_all_at(&random(100 * KIB, 10), 500_000)
            .expect("overwrite");
        f.write_all_at(b"appended", 3 * MIB as u64 / 2)
            .expect("append");
        // No fsync: a close commits at RELEASE, which the kernel sends after close()
        // returns, so a capture right after this may see the pending state or the
        // committed one, and both must count the same st_blocks.
    }
    fs::set_permissions(c.join("small"), fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(c.join("small"), Some(1), Some(1)).expect("chown");
    lsetxattr(&c.join("small"), "user.new", b"x").expect("setxattr");
    fs::remove_file(c.join("small-link")).expect("unlink");
    fs::remove_file(c.join("sparse")).expect("unlink");
    lsetxattr(&c.join("sub/deep/file"), "user.a", b"changed").expect("setxattr");
    lremovexattr(&c.join("sub/deep/file"), "user.b").expect("removexattr");
    fs::rename(c.join("sub/deep"), c.join("moved")).expect("rename");
    fs::remove_file(c.join("sub/sym")).expect("unlink");
    std::os::unix::fs::symlink("elsewhere", c.join("sub/sym")).expect("symlink");
    fs::remove_dir(c.join("empty-dir")).expect("rmdir");
    fs::create_dir(c.join("new-dir")).expect("mkdir");
    write_file(&c.join("new-dir/new-file"), b"new");
    set_times(&c.join("empty-file"), 5, 5).expect("utimens");
}

/// A snapshot shows the container as it was, whatever happened to it since: contents,
/// sizes, modes, owners, times, xattrs, symlinks and hard links; its inode numbers are its
/// own, and they and everything else survive a remount.
#[test]
fn snapshot_shows_the_container_as_it_was() {
    let mut m = Mounted::new();
    let c = m.c();
    populate(&c);
    let before = capture(&c);
    snapshot_create(&m, "s1");
    let snap = c.join(".snapshots/s1");
    let at_once = capture(&snap);
    assert_same_tree(&at_once, &before, "right after the snapshot");
    change(&c);
    let after = capture(&c);
    assert_ne!(
        after[Path::new("big")].0.data,
        before[Path::new("big")].0.data
    );
    assert!(!after.contains_key(Path::new("sparse")));
    assert_eq!(after[Path::new("small")].0.mode & 0o7777, 0o600);
    assert_eq!(after[Path::new("small")].0.nlink, 1);
    let view = capture(&snap);
    assert_same_tree(&view, &before, "after changes");
    assert_eq!(view, at_once, "inode numbers of the view changed");
    // Spot checks of what the comparison covers.
    let small = &view[Path::new("small")];
    assert_eq!(
        (
            small.0.mode & 0o7777,
            small.0.uid,
            small.0.gid,
            small.0.nlink
        ),
        (0o640, 1234, 5678, 2)
    );
    assert_eq!(small.0.mtime, (1_000_000_000, 456_789_012));
    assert_eq!(
        view[Path::new("small-link")].1,
        small.1,
        "one inode, two names"
    );
    assert_eq!(
        view[Path::new("sub/sym")].0.target.as_deref(),
        Some(Path::new("../small"))
    );
    assert_eq!(view[Path::new("sub/deep/file")].0.xattrs.len(), 2);
    assert_eq!(view[Path::new("sparse")].0.size, 10 * MIB as u64 + 4096);
    assert_eq!(view[Path::new("sparse")].0.blocks, 16, "holes stay holes");
    // Snapshot inode numbers are not live ones.
    let live_inos: BTreeSet<u64> = after.values().map(|(_, i)| *i).collect();
    for (p, (_, ino)) in &view {
        assert!(
            !live_inos.contains(ino),
            "{}: {ino} is also live",
            p.display()
        );
    }
    // The snapshot root is a directory of .snapshots, whose parent is the container.
    let dir = fs::metadata(c.join(".snapshots")).expect("stat .snapshots");
    assert!(dir.is_dir());
    assert_eq!((dir.mode() & 0o7777, dir.nlink()), (0o555, 3));
    let dotdot = fs::metadata(snap.join("..")).expect("stat ..");
    assert_eq!(
        dotdot.ino(),
        fs::metadata(c.join(".snapshots")).expect("stat").ino()
    );
    let names: Vec<String> = fs::read_dir(&c)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.contains(&".snapshots".to_string()), "{names:?}");

    m.remount();
    assert_eq!(capture(&snap), view, "after a remount");
    assert_eq!(capture(&c), after, "live after a remount");
    m.finish();
}

/// Every change through a snapshot is EROFS and changes nothing; `.snapshots` is reserved.
#[test]
fn snapshots_are_read_only() {
    let m = Mounted::new();
    let c = m.c();
    populate(&c);
    snapshot_create(&m, "s1");
    let s = c.join(".snapshots/s1");
    let view = capture(&s);
    let erofs = libc::EROFS;
    let file = s.join("small");
    // Opening for writing is not refused yet (open_for_writing_in_a_snapshot_is_erofs),
    // but no byte gets through.
    for opts in [
        OpenOptions::new().write(true).clone(),
        OpenOptions::new().read(true).write(true).clone(),
        OpenOptions::new().append(true).clone(),
    ] {
        if let Ok(mut f) = opts.open(&file) {
            assert_eq!(errno(f.write_all(b"x")), erofs, "write");
            assert_eq!(errno(f.set_len(1)), erofs, "ftruncate");
        }
    }
    assert_eq!(
        errno(OpenOptions::new().write(true).truncate(true).open(&file)),
        erofs,
        "O_TRUNC"
    );
    assert_eq!(errno(File::create(s.join("new"))), erofs, "create");
    assert_eq!(
        errno(File::create(s.join("sub/new"))),
        erofs,
        "create in a subdir"
    );
    assert_eq!(errno(fs::remove_file(&file)), erofs, "unlink");
    assert_eq!(errno(fs::rename(&file, s.join("renamed"))), erofs, "rename");
    assert_eq!(
        errno(fs::rename(s.join("sub/deep"), s.join("deep"))),
        erofs,
        "rename a directory"
    );
    assert_eq!(
        errno(fs::set_permissions(
            &file,
            fs::Permissions::from_mode(0o777)
        )),
        erofs,
        "chmod"
    );
    assert_eq!(
        errno(std::os::unix::fs::chown(&file, Some(1), Some(1))),
        erofs,
        "chown"
    );
    assert_eq!(errno(set_times(&file, 1, 1)), erofs, "utimens");
    assert_eq!(errno(lsetxattr(&file, "user.x", b"v")), erofs, "setxattr");
    assert_eq!(
        errno(lremovexattr(&s.join("sub/deep/file"), "user.a")),
        erofs,
        "removexattr"
    );
    assert_eq!(errno(fs::create_dir(s.join("d"))), erofs, "mkdir");
    assert_eq!(errno(fs::remove_dir(s.join("empty-dir"))), erofs, "rmdir");
    assert_eq!(
        errno(std::os::unix::fs::symlink("t", s.join("l"))),
        erofs,
        "symlink"
    );
    assert_eq!(errno(fs::hard_link(&file, s.join("l"))), erofs, "link in");
    assert_eq!(errno(fs::hard_link(&file, c.join("l"))), erofs, "link out");
    write_file(&c.join("live"), b"live");
    assert_eq!(
        errno(fs::rename(c.join("live"), s.join("live"))),
        erofs,
        "rename into a snapshot"
    );
    assert_eq!(
        errno(fs::rename(&file, c.join("stolen"))),
        erofs,
        "rename out of a snapshot"
    );
    // .snapshots: no snapshot is made, renamed or removed through it.
    let dir = c.join(".snapshots");
    assert_eq!(
        errno(fs::create_dir(dir.join("new"))),
        erofs,
        "mkdir in .snapshots"
    );
    assert_eq!(errno(fs::remove_dir(&s)), erofs, "rmdir of a snapshot");
    assert_eq!(
        errno(fs::rename(&s, dir.join("s2"))),
        erofs,
        "rename of a snapshot"
    );
    assert_eq!(
        errno(fs::create_dir(&dir)),
        libc::EEXIST,
        "mkdir .snapshots"
    );
    assert!(
        fs::rename(c.join("live"), &dir).is_err(),
        "rename onto .snapshots"
    );
    assert!(fs::metadata(c.join("live")).is_ok());
    assert_eq!(capture(&s), view, "nothing changed");
    // Reading still works, with O_RDONLY and through a long-lived handle.
    let mut f = File::open(s.join("big")).expect("open");
    let mut data = Vec::new();
    io::Read::read_to_end(&mut f, &mut data).expect("read");
    assert!(data == random(3 * MIB / 2, 1));
    drop(f);
    m.finish();
}

/// Snapshots are listed with what they hold; deleting one gives back the space it alone
/// held, as `snapshot list` said; a deleted snapshot is gone from `.snapshots`.
#[test]
fn snapshot_list_and_delete_give_space_back() {
    let m = Mounted::new();
    let c = m.c();
    let started = dedupfs::store::now_ns();
    populate(&c);
    snapshot_create(&m, "s1");
    let created = dedupfs::store::now_ns();
    let empty_before = stored_bytes(&m);
    // Data only the snapshot will hold: a large file deleted, and one overwritten.
    write_file(&c.join("gone"), &random(2 * MIB, 20));
    snapshot_create(&m, "s2");
    fs::remove_file(c.join("gone")).expect("unlink");
    write_file(&c.join("big"), &random(3 * MIB / 2, 21));
    let list = snapshot_list(&m);
    assert_eq!(list.len(), 2, "{list:?}");
    let s1 = &list[0];
    assert_eq!(s1["container"], "c");
    assert_eq!(s1["name"], "s1");
    assert_eq!(list[1]["name"], "s2");
    let created_ns = s1["created_ns"].as_i64().expect("created_ns");
    assert!(
        started <= created_ns && created_ns <= created,
        "{created_ns}"
    );
    // big, small (twice linked), sparse, sub/deep/file, empty-file; sub, sub/deep, empty-dir.
    assert_eq!(s1["files"], 5);
    assert_eq!(s1["dirs"], 3);
    let logical = 3 * MIB / 2 + 5 + 8192 + 200 * KIB;
    assert_eq!(s1["logical_bytes"].as_u64(), Some(logical as u64));
    assert_eq!(list[1]["files"], 6);
    assert!(s1["id"].as_u64().is_some());
    assert_ne!(s1["id"], list[1]["id"]);
    // s2 alone sees "gone"; s1 and s2 share the old "big", which no later version has.
    assert_eq!(
        list[1]["exclusive_logical_bytes"].as_u64(),
        Some(2 * MIB as u64)
    );
    assert_eq!(s1["exclusive_logical_bytes"].as_u64(), Some(0));
    assert_eq!(s1["reclaimable_bytes"].as_u64(), Some(0));
    let promised = list[1]["reclaimable_bytes"]
        .as_u64()
        .expect("reclaimable_bytes");
    assert!(promised > 2 * MIB as u64 - 64 * KIB as u64, "{promised}");
    let stored = stored_bytes(&m);
    assert!(stored > empty_before + 3 * MIB as u64);
    let out = snapshot_delete(&m, "s2");
    assert!(out.contains("deleted snapshot c@s2"), "{out}");
    assert_eq!(stored - stored_bytes(&m), promised, "space given back");
    assert_eq!(errno(fs::metadata(c.join(".snapshots/s2"))), libc::ENOENT);
    // s1 now holds the old "big" alone.
    let list = snapshot_list(&m);
    assert_eq!(list.len(), 1);
    let promised = list[0]["reclaimable_bytes"]
        .as_u64()
        .expect("reclaimable_bytes");
    assert!(promised > MIB as u64, "{promised}");
    assert!(fs::read(c.join(".snapshots/s1/big")).expect("read") == random(3 * MIB / 2, 1));
    let stored = stored_bytes(&m);
    snapshot_delete(&m, "s1");
    assert_eq!(stored - stored_bytes(&m), promised, "space given back");
    assert_eq!(snapshot_list(&m).len(), 0);
    assert_eq!(
        fs::read_dir(c.join(".snapshots"))
            .expect("read_dir")
            .count(),
        0
    );
    m.finish();
}

/// Opening a snapshot file for writing is EROFS, as on a read-only mount, so that a
/// program finds out at open rather than at its first write.
#[test]
fn open_for_writing_in_a_snapshot_is_erofs() {
    let m = Mounted::new();
    let c = m.c();
    write_file(&c.join("f"), b"data");
    snapshot_create(&m, "s");
    let f = c.join(".snapshots/s/f");
    assert_eq!(errno(OpenOptions::new().write(true).open(&f)), libc::EROFS);
    assert_eq!(
        errno(OpenOptions::new().read(true).write(true).open(&f)),
        libc::EROFS
    );
    assert_eq!(errno(OpenOptions::new().append(true).open(&f)), libc::EROFS);
    m.finish();
}

/// A name looked up in `.snapshots` before the snapshot exists is found once it does (the
/// kernel must not keep a negative entry across `snapshot create`), and a name reused
/// after a delete shows the new snapshot.
#[test]
fn snapshot_names_are_found_as_soon_as_they_exist() {
    let m = Mounted::new();
    let c = m.c();
    write_file(&c.join("f"), b"first");
    let dir = c.join(".snapshots");
    assert_eq!(errno(fs::metadata(dir.join("s"))), libc::ENOENT);
    snapshot_create(&m, "s");
    assert_eq!(fs::read(dir.join("s/f")).expect("read s/f"), b"first");
    snapshot_delete(&m, "s");
    write_file(&c.join("f"), b"second");
    snapshot_create(&m, "s");
    assert_eq!(fs::read(dir.join("s/f")).expect("read s/f"), b"second");
    m.finish();
}

/// A directory of 100,000 entries lists from a snapshot about as fast as live.
#[test]
fn large_directory_lists_from_a_snapshot() {
    const N: usize = 100_000;
    let mut m = Mounted::new();
    let c = m.c();
    let dir = c.join("many");
    fs::create_dir(&dir).expect("mkdir");
    let t = Instant::now();
    for i in 0..N {
        File::create(dir.join(format!("entry-{i:06}"))).expect("create");
    }
    eprintln!("created {N} files in {:?}", t.elapsed());
    snapshot_create(&m, "s");
    // Changes after the snapshot add versions that a snapshot listing must skip.
    for i in (0..N).step_by(10) {
        fs::remove_file(dir.join(format!("entry-{i:06}"))).expect("unlink");
    }
    for i in 0..N / 10 {
        File::create(dir.join(format!("later-{i:06}"))).expect("create");
    }
    let list = |p: &Path| -> (usize, std::time::Duration) {
        let t = Instant::now();
        let n = fs::read_dir(p).expect("read_dir").count();
        (n, t.elapsed())
    };
    let snap = c.join(".snapshots/s/many");
    let mut live_best = std::time::Duration::MAX;
    let mut snap_best = std::time::Duration::MAX;
    for _ in 0..3 {
        let (n, t) = list(&dir);
        assert_eq!(n, N);
        live_best = live_best.min(t);
        let (n, t) = list(&snap);
        assert_eq!(n, N);
        snap_best = snap_best.min(t);
    }
    eprintln!("listing {N} entries: live {live_best:?}, snapshot {snap_best:?}");
    let names: BTreeSet<String> = fs::read_dir(&snap)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), N);
    assert!(names.contains("entry-000000") && names.contains("entry-099999"));
    assert!(!names.iter().any(|n| n.starts_with("later-")));
    assert!(
        snap_best <= live_best * 5 + std::time::Duration::from_millis(50),
        "snapshot listing {snap_best:?} vs live {live_best:?}"
    );
    // `ls -l`: a lookup of every entry, with the kernel's caches cold.
    m.remount();
    let stat_all = |p: &Path, prefix: &str| -> std::time::Duration {
        let t = Instant::now();
        for i in (1..N).step_by(10) {
            let md = fs::symlink_metadata(p.join(format!("{prefix}-{i:06}"))).expect("stat");
            assert!(md.is_file());
        }
        t.elapsed()
    };
    let live_stat = stat_all(&dir, "entry");
    let snap_stat = stat_all(&snap, "entry");
    eprintln!(
        "stat of {} entries: live {live_stat:?}, snapshot {snap_stat:?}",
        N / 10
    );
    assert!(
        snap_stat <= live_stat * 5 + std::time::Duration::from_millis(50),
        "snapshot stats {snap_stat:?} vs live {live_stat:?}"
    );
    m.finish();
}

/// `cp -p` sets the times on the open copy before closing it: the snapshot (and live) must
/// keep them, not the time of the writes still pending in the daemon.
#[test]
fn cp_p_keeps_mtime_into_the_snapshot() {
    let m = Mounted::new();
    let c = m.c();
    let src = m.dir.path().join("src");
    write_file(&src, &random(100 * KIB, 30));
    set_times(&src, 978_307_200_000_000_000, 978_307_200_000_000_000).expect("utimens");
    let status = std::process::Command::new("cp")
        .arg("-p")
        .arg(&src)
        .arg(c.join("copied"))
        .status()
        .expect("cp");
    assert!(status.success());
    snapshot_create(&m, "s");
    for p in [c.join("copied"), c.join(".snapshots/s/copied")] {
        let md = fs::metadata(&p).expect("stat");
        assert_eq!(md.mtime(), 978_307_200, "{}", p.display());
    }
    m.finish();
}
