//! A model-based test of snapshots through a real mount: random namespace and data operations
//! (writes, overwrites, truncates, renames, hard links, unlinks, mkdir/rmdir, chmod, mtimes,
//! xattrs, symlinks) interleaved with `snapshot create`, `snapshot delete` and
//! `snapshot rollback`. After every snapshot operation the live tree and every snapshot under
//! `.snapshots/NAME` must equal the model's state (names, kinds, contents, modes, explicitly set
//! mtimes, xattrs, symlink targets, hard-link groups); at the end also after a remount, and
//! fsck must be clean.
//!
//! DEDUPFS_MOUNT_MODEL_OPS sets the number of operations (default 300),
//! DEDUPFS_MOUNT_MODEL_SEED one seed (default: seeds 7, 8 and 9), DEDUPFS_MOUNT_MODEL_TRACE=1 prints each step.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::{self, File, FileTimes, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::{dedupfs, Mounted};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

/// One inode of the model.
#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    data: Vec<u8>,
    mode: u32,
    /// Set explicitly and not changed since: (seconds, nanoseconds).
    mtime: Option<(i64, u32)>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    target: Vec<u8>,
}

/// A tree: paths ("a/b") to inode ids; ids to nodes. Same id = hard links.
#[derive(Clone, Debug, Default)]
struct Model {
    names: BTreeMap<String, u64>,
    nodes: BTreeMap<u64, Node>,
}

fn parent_of(p: &str) -> &str {
    match p.rfind('/') {
        Some(i) => &p[..i],
        None => "",
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

impl Model {
    fn node(&self, p: &str) -> Option<&Node> {
        self.names.get(p).map(|id| &self.nodes[id])
    }
    fn kind(&self, p: &str) -> Option<Kind> {
        self.node(p).map(|n| n.kind)
    }
    fn children(&self, dir: &str) -> Vec<String> {
        self.names
            .keys()
            .filter(|k| parent_of(k) == dir)
            .cloned()
            .collect()
    }
    /// A directory's contents changed: its mtime is no longer the one set explicitly.
    fn touch_dir(&mut self, dir: &str) {
        if let Some(id) = self.names.get(dir) {
            self.nodes.get_mut(id).unwrap().mtime = None;
        }
    }
    fn unlink(&mut self, p: &str) {
        let id = self.names.remove(p).unwrap();
        if !self.names.values().any(|v| *v == id) {
            self.nodes.remove(&id);
        }
        self.touch_dir(parent_of(p));
    }
    fn dirs(&self) -> Vec<String> {
        let mut v = vec![String::new()];
        v.extend(
            self.names
                .iter()
                .filter(|(_, id)| self.nodes[id].kind == Kind::Dir)
                .map(|(k, _)| k.clone()),
        );
        v
    }
    fn of_kind(&self, kind: Kind) -> Vec<String> {
        self.names
            .iter()
            .filter(|(_, id)| self.nodes[id].kind == kind)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn lsetxattr(p: &Path, name: &[u8], value: &[u8]) -> std::io::Result<()> {
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::lsetxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn lremovexattr(p: &Path, name: &[u8]) -> std::io::Result<()> {
    let n = CString::new(name).unwrap();
    let r = unsafe { libc::lremovexattr(cpath(p).as_ptr(), n.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The user.* xattrs of a path (others, e.g. security.*, are not the model's).
fn lxattrs(p: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
    let c = cpath(p);
    let mut buf = vec![0u8; 64 * 1024];
    let n =
        unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if n < 0 {
        return Err(format!(
            "llistxattr {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    let mut out = BTreeMap::new();
    for name in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        if !name.starts_with(b"user.") {
            continue;
        }
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 64 * 1024];
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                val.as_mut_ptr() as *mut libc::c_void,
                val.len(),
            )
        };
        if m < 0 {
            return Err(format!(
                "lgetxattr {} {}: {}",
                p.display(),
                String::from_utf8_lossy(name),
                std::io::Error::last_os_error()
            ));
        }
        val.truncate(m as usize);
        out.insert(name.to_vec(), val);
    }
    Ok(out)
}

/// Walks `root` and lists every path below it.
fn walk(root: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), String> {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let rd = fs::read_dir(&dir).map_err(|e| format!("read_dir {}: {e}", dir.display()))?;
    for e in rd {
        let e = e.map_err(|e| format!("read_dir entry {}: {e}", dir.display()))?;
        let name = e.file_name().into_string().unwrap();
        let p = join(rel, &name);
        let ft = e.file_type().map_err(|e| format!("file_type {p}: {e}"))?;
        out.push(p.clone());
        if ft.is_dir() {
            walk(root, &p, out)?;
        }
    }
    Ok(())
}

/// Compares the tree at `root` with `model`.
fn compare(root: &Path, model: &Model) -> Result<(), String> {
    let mut seen = Vec::new();
    walk(root, "", &mut seen)?;
    let seen_set: BTreeSet<String> = seen.iter().cloned().collect();
    if seen_set.len() != seen.len() {
        return Err(format!("duplicate names in listing: {seen:?}"));
    }
    let want: BTreeSet<String> = model.names.keys().cloned().collect();
    if seen_set != want {
        let extra: Vec<_> = seen_set.difference(&want).collect();
        let missing: Vec<_> = want.difference(&seen_set).collect();
        return Err(format!(
            "names differ: extra {extra:?}, missing {missing:?}"
        ));
    }
    let mut ino_of_id: BTreeMap<u64, u64> = BTreeMap::new();
    let mut id_of_ino: BTreeMap<u64, u64> = BTreeMap::new();
    let mut links: BTreeMap<u64, u64> = BTreeMap::new();
    for id in model.names.values() {
        *links.entry(*id).or_default() += 1;
    }
    for (p, id) in &model.names {
        let n = &model.nodes[id];
        let full = root.join(p);
        let md = fs::symlink_metadata(&full).map_err(|e| format!("stat {p}: {e}"))?;
        let kind = if md.file_type().is_symlink() {
            Kind::Symlink
        } else if md.is_dir() {
            Kind::Dir
        } else if md.is_file() {
            Kind::File
        } else {
            return Err(format!("{p}: odd type {:?}", md.file_type()));
        };
        if kind != n.kind {
            return Err(format!("{p}: kind {kind:?}, model {:?}", n.kind));
        }
        match kind {
            Kind::File => {
                if md.len() != n.data.len() as u64 {
                    return Err(format!("{p}: size {}, model {}", md.len(), n.data.len()));
                }
                let data = fs::read(&full).map_err(|e| format!("read {p}: {e}"))?;
                if data != n.data {
                    let at = data.iter().zip(&n.data).position(|(a, b)| a != b);
                    return Err(format!(
                        "{p}: contents differ (len {} vs model {}, first difference at {at:?})",
                        data.len(),
                        n.data.len()
                    ));
                }
                if md.nlink() != links[id] {
                    return Err(format!("{p}: nlink {}, model {}", md.nlink(), links[id]));
                }
            }
            Kind::Symlink => {
                let t = fs::read_link(&full).map_err(|e| format!("readlink {p}: {e}"))?;
                if t.as_os_str().as_bytes() != n.target.as_slice() {
                    return Err(format!("{p}: target {t:?}, model {:?}", n.target));
                }
            }
            Kind::Dir => {}
        }
        if kind != Kind::Symlink && md.mode() & 0o7777 != n.mode {
            return Err(format!(
                "{p}: mode {:o}, model {:o}",
                md.mode() & 0o7777,
                n.mode
            ));
        }
        if let Some((s, ns)) = n.mtime {
            if (md.mtime(), md.mtime_nsec() as u32) != (s, ns) {
                return Err(format!(
                    "{p}: mtime {}.{:09}, model {s}.{ns:09}",
                    md.mtime(),
                    md.mtime_nsec()
                ));
            }
        }
        if kind != Kind::Symlink {
            let x = lxattrs(&full)?;
            if x != n.xattrs {
                return Err(format!("{p}: xattrs {x:?}, model {:?}", n.xattrs));
            }
        }
        match ino_of_id.get(id) {
            Some(ino) if *ino != md.ino() => {
                return Err(format!("{p}: ino {} but its hard link has {ino}", md.ino()))
            }
            _ => {
                ino_of_id.insert(*id, md.ino());
            }
        }
        match id_of_ino.get(&md.ino()) {
            Some(other) if other != id => {
                return Err(format!(
                    "{p}: ino {} shared with an unrelated entry",
                    md.ino()
                ))
            }
            _ => {
                id_of_ino.insert(md.ino(), *id);
            }
        }
    }
    Ok(())
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn snap_cmd(m: &Mounted, args: &[&str]) -> std::process::Output {
    let mut all: Vec<std::ffi::OsString> = vec!["snapshot".into()];
    all.extend(args.iter().map(|a| a.into()));
    all.push("--store".into());
    all.push(m.store.clone().into());
    dedupfs(all)
}

struct Run {
    m: Mounted,
    rng: StdRng,
    model: Model,
    next_id: u64,
    /// Snapshots, oldest first: name and the model at that moment.
    snaps: Vec<(String, Model)>,
    deleted: Vec<String>,
    next_snap: u64,
    pool: Vec<u8>,
    log: Vec<String>,
    trace: bool,
    seed: u64,
}

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const XNAMES: [&[u8]; 3] = [b"user.a", b"user.b", b"user.long.name.c"];

impl Run {
    fn note(&mut self, s: String) {
        if self.trace {
            eprintln!("{s}");
        }
        self.log.push(s);
    }

    fn fail(&self, what: &str) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(40).rev().collect();
        let mut msg = format!("seed {}: {what}\nlast operations:\n", self.seed);
        for l in tail {
            msg.push_str("  ");
            msg.push_str(l);
            msg.push('\n');
        }
        panic!("{msg}");
    }

    fn live(&self, p: &str) -> std::path::PathBuf {
        self.m.c().join(p)
    }

    fn data(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let piece = (len - out.len()).min(self.rng.gen_range(1..=96 * 1024));
            match self.rng.gen_range(0..4) {
                0 => out.extend(std::iter::repeat_n(0u8, piece)),
                1 | 2 => {
                    // Shared between files: 4 KiB-aligned slices of one pool.
                    let at = self.rng.gen_range(0..=(self.pool.len() - piece) / 4096) * 4096;
                    out.extend_from_slice(&self.pool[at..at + piece]);
                }
                _ => {
                    let start = out.len();
                    out.resize(start + piece, 0);
                    self.rng.fill_bytes(&mut out[start..]);
                }
            }
        }
        out
    }

    fn new_node(&mut self, node: Node) -> u64 {
        self.next_id += 1;
        self.model.nodes.insert(self.next_id, node);
        self.next_id
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.rng.gen_range(0..v.len())].clone())
        }
    }

    /// A free name in a random directory.
    fn free_path(&mut self) -> Option<String> {
        let dirs = self.model.dirs();
        let d = self.pick(&dirs).unwrap();
        let n = NAMES[self.rng.gen_range(0..NAMES.len())];
        let p = join(&d, n);
        if self.model.names.contains_key(&p) {
            None
        } else {
            Some(p)
        }
    }

    fn expect_ok<T>(&self, r: std::io::Result<T>, what: &str) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(&format!("{what}: {e}")),
        }
    }

    /// One random operation; false if it was not applicable.
    fn step(&mut self) -> bool {
        match self.rng.gen_range(0..16) {
            0 | 1 => {
                // Write a new file, or replace the contents of an existing one.
                let dirs = self.model.dirs();
                let d = self.pick(&dirs).unwrap();
                let p = join(&d, NAMES[self.rng.gen_range(0..NAMES.len())]);
                let existing = self.model.kind(&p);
                if matches!(existing, Some(Kind::Dir) | Some(Kind::Symlink)) {
                    return false;
                }
                let len = self.rng.gen_range(0..300 * 1024);
                let data = self.data(len);
                self.note(format!(
                    "write {p} len {len} (existing: {})",
                    existing.is_some()
                ));
                let r = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o644)
                    .open(self.live(&p))
                    .and_then(|f| f.write_all_at(&data, 0));
                self.expect_ok(r, &format!("write {p}"));
                match self.model.names.get(&p).copied() {
                    Some(id) => {
                        let n = self.model.nodes.get_mut(&id).unwrap();
                        n.data = data;
                        n.mtime = None;
                    }
                    None => {
                        let id = self.new_node(Node {
                            kind: Kind::File,
                            data,
                            mode: 0o644,
                            mtime: None,
                            xattrs: BTreeMap::new(),
                            target: Vec::new(),
                        });
                        self.model.names.insert(p.clone(), id);
                        self.model.touch_dir(parent_of(&p));
                    }
                }
            }
            2 | 3 => {
                // Overwrite a random range (possibly past the end).
                let files = self.model.of_kind(Kind::File);
                let Some(p) = self.pick(&files) else {
                    return false;
                };
                let id = self.model.names[&p];
                let size = self.model.nodes[&id].data.len();
                let off = self.rng.gen_range(0..=size + 8192);
                let len = self.rng.gen_range(1..=64 * 1024);
                let data = self.data(len);
                self.note(format!("overwrite {p} at {off} len {len} (size {size})"));
                let r = OpenOptions::new()
                    .write(true)
                    .open(self.live(&p))
                    .and_then(|f| f.write_all_at(&data, off as u64));
                self.expect_ok(r, &format!("overwrite {p}"));
                let n = self.model.nodes.get_mut(&id).unwrap();
                if n.data.len() < off + len {
                    n.data.resize(off + len, 0);
                }
                n.data[off..off + len].copy_from_slice(&data);
                n.mtime = None;
            }
            4 => {
                let files = self.model.of_kind(Kind::File);
                let Some(p) = self.pick(&files) else {
                    return false;
                };
                let id = self.model.names[&p];
                let size = self.model.nodes[&id].data.len();
                let to = self.rng.gen_range(0..=size * 2 + 4096).min(400 * 1024);
                self.note(format!("truncate {p} {size} -> {to}"));
                let r = OpenOptions::new()
                    .write(true)
                    .open(self.live(&p))
                    .and_then(|f| f.set_len(to as u64));
                self.expect_ok(r, &format!("truncate {p}"));
                let n = self.model.nodes.get_mut(&id).unwrap();
                n.data.resize(to, 0);
                n.mtime = None;
            }
            5 | 6 => return self.rename(),
            7 => {
                let files = self.model.of_kind(Kind::File);
                let Some(src) = self.pick(&files) else {
                    return false;
                };
                let Some(dst) = self.free_path() else {
                    return false;
                };
                self.note(format!("link {src} {dst}"));
                let r = fs::hard_link(self.live(&src), self.live(&dst));
                self.expect_ok(r, &format!("link {src} {dst}"));
                let id = self.model.names[&src];
                self.model.names.insert(dst.clone(), id);
                self.model.touch_dir(parent_of(&dst));
            }
            8 => {
                let mut v = self.model.of_kind(Kind::File);
                v.extend(self.model.of_kind(Kind::Symlink));
                let Some(p) = self.pick(&v) else { return false };
                self.note(format!("unlink {p}"));
                let r = fs::remove_file(self.live(&p));
                self.expect_ok(r, &format!("unlink {p}"));
                self.model.unlink(&p);
            }
            9 => {
                let Some(p) = self.free_path() else {
                    return false;
                };
                self.note(format!("mkdir {p}"));
                let r = fs::create_dir(self.live(&p));
                self.expect_ok(r, &format!("mkdir {p}"));
                // A setgid parent passes its setgid bit on to a new directory.
                let sgid = self
                    .model
                    .node(parent_of(&p))
                    .map_or(0, |n| n.mode & 0o2000);
                let id = self.new_node(Node {
                    kind: Kind::Dir,
                    data: Vec::new(),
                    mode: 0o755 | sgid,
                    mtime: None,
                    xattrs: BTreeMap::new(),
                    target: Vec::new(),
                });
                self.model.names.insert(p.clone(), id);
                self.model.touch_dir(parent_of(&p));
            }
            10 => {
                let dirs = self.model.of_kind(Kind::Dir);
                let empty: Vec<String> = dirs
                    .into_iter()
                    .filter(|d| self.model.children(d).is_empty())
                    .collect();
                let Some(p) = self.pick(&empty) else {
                    return false;
                };
                self.note(format!("rmdir {p}"));
                let r = fs::remove_dir(self.live(&p));
                self.expect_ok(r, &format!("rmdir {p}"));
                self.model.unlink(&p);
            }
            11 => {
                let mut v = self.model.of_kind(Kind::File);
                v.extend(self.model.of_kind(Kind::Dir));
                let Some(p) = self.pick(&v) else { return false };
                let modes = [0o600, 0o640, 0o644, 0o700, 0o755, 0o444, 0o1777, 0o2750];
                let mode = modes[self.rng.gen_range(0..modes.len())];
                self.note(format!("chmod {p} {mode:o}"));
                let r = fs::set_permissions(self.live(&p), fs::Permissions::from_mode(mode));
                self.expect_ok(r, &format!("chmod {p}"));
                let id = self.model.names[&p];
                self.model.nodes.get_mut(&id).unwrap().mode = mode;
            }
            12 => {
                let mut v = self.model.of_kind(Kind::File);
                v.extend(self.model.of_kind(Kind::Dir));
                let Some(p) = self.pick(&v) else { return false };
                let s: i64 = self.rng.gen_range(0..2_000_000_000);
                let ns: u32 = self.rng.gen_range(0..1_000_000_000);
                self.note(format!("set mtime {p} {s}.{ns:09}"));
                let t = UNIX_EPOCH + Duration::new(s as u64, ns);
                let r = File::open(self.live(&p))
                    .and_then(|f| f.set_times(FileTimes::new().set_modified(t)));
                self.expect_ok(r, &format!("set mtime {p}"));
                let id = self.model.names[&p];
                self.model.nodes.get_mut(&id).unwrap().mtime = Some((s, ns));
            }
            13 => {
                let mut v = self.model.of_kind(Kind::File);
                v.extend(self.model.of_kind(Kind::Dir));
                let Some(p) = self.pick(&v) else { return false };
                let id = self.model.names[&p];
                let name = XNAMES[self.rng.gen_range(0..XNAMES.len())];
                let present = self.model.nodes[&id].xattrs.contains_key(name);
                if present && self.rng.gen_bool(0.4) {
                    self.note(format!("removexattr {p} {}", String::from_utf8_lossy(name)));
                    let r = lremovexattr(&self.live(&p), name);
                    self.expect_ok(r, &format!("removexattr {p}"));
                    self.model.nodes.get_mut(&id).unwrap().xattrs.remove(name);
                } else {
                    let len = self.rng.gen_range(0..200);
                    let val = self.data(len);
                    self.note(format!(
                        "setxattr {p} {} len {len}",
                        String::from_utf8_lossy(name)
                    ));
                    let r = lsetxattr(&self.live(&p), name, &val);
                    self.expect_ok(r, &format!("setxattr {p}"));
                    self.model
                        .nodes
                        .get_mut(&id)
                        .unwrap()
                        .xattrs
                        .insert(name.to_vec(), val);
                }
            }
            14 => {
                let Some(p) = self.free_path() else {
                    return false;
                };
                let len = self.rng.gen_range(1..120);
                let target: Vec<u8> = (0..len)
                    .map(|_| b"abcdefxyz/._-"[self.rng.gen_range(0..13)])
                    .collect();
                self.note(format!(
                    "symlink {p} -> {}",
                    String::from_utf8_lossy(&target)
                ));
                let r =
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), self.live(&p));
                self.expect_ok(r, &format!("symlink {p}"));
                let id = self.new_node(Node {
                    kind: Kind::Symlink,
                    data: Vec::new(),
                    mode: 0o777,
                    mtime: None,
                    xattrs: BTreeMap::new(),
                    target,
                });
                self.model.names.insert(p.clone(), id);
                self.model.touch_dir(parent_of(&p));
            }
            _ => {
                // Read a file back between changes, to fill the kernel's caches.
                let files = self.model.of_kind(Kind::File);
                let Some(p) = self.pick(&files) else {
                    return false;
                };
                self.note(format!("read {p}"));
                let got = self.expect_ok(fs::read(self.live(&p)), &format!("read {p}"));
                let want = &self.model.node(&p).unwrap().data;
                if &got != want {
                    let at = got.iter().zip(want).position(|(a, b)| a != b);
                    self.fail(&format!(
                        "read {p}: contents differ from the model (len {} vs model {}, first difference at {at:?})",
                        got.len(),
                        want.len()
                    ));
                }
            }
        }
        true
    }

    fn rename(&mut self) -> bool {
        let srcs: Vec<String> = self.model.names.keys().cloned().collect();
        let Some(src) = self.pick(&srcs) else {
            return false;
        };
        let dirs = self.model.dirs();
        let d = self.pick(&dirs).unwrap();
        let dst = join(&d, NAMES[self.rng.gen_range(0..NAMES.len())]);
        if dst == src || dst.starts_with(&format!("{src}/")) {
            return false;
        }
        let sk = self.model.kind(&src).unwrap();
        let refused = match self.model.kind(&dst) {
            None => false,
            Some(Kind::Dir) => sk != Kind::Dir || !self.model.children(&dst).is_empty(),
            Some(_) => sk == Kind::Dir || self.model.names[&dst] == self.model.names[&src],
        };
        if refused {
            return false;
        }
        self.note(format!(
            "rename {src} -> {dst} (over {:?})",
            self.model.kind(&dst)
        ));
        let r = fs::rename(self.live(&src), self.live(&dst));
        self.expect_ok(r, &format!("rename {src} {dst}"));
        if self.model.names.contains_key(&dst) {
            self.model.unlink(&dst);
        }
        let prefix = format!("{src}/");
        let moved: Vec<(String, u64)> = self
            .model
            .names
            .iter()
            .filter(|(k, _)| **k == src || k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (k, _) in &moved {
            self.model.names.remove(k);
        }
        for (k, v) in moved {
            let nk = format!("{dst}{}", &k[src.len()..]);
            self.model.names.insert(nk, v);
        }
        self.model.touch_dir(parent_of(&src));
        self.model.touch_dir(parent_of(&dst));
        if sk == Kind::Dir {
            // Its ".." may have changed.
            self.model.touch_dir(&dst);
        }
        true
    }

    fn snapshot_op(&mut self) {
        let r = self.rng.gen_range(0..10);
        if self.snaps.is_empty() || r < 5 {
            // Sometimes reuse the name of a deleted snapshot.
            let name = if !self.deleted.is_empty() && self.rng.gen_bool(0.3) {
                let i = self.rng.gen_range(0..self.deleted.len());
                self.deleted.remove(i)
            } else {
                self.next_snap += 1;
                format!("s{}", self.next_snap)
            };
            self.note(format!("snapshot create {name}"));
            let out = snap_cmd(&self.m, &["create", "c", &name]);
            if !out.status.success() {
                self.fail(&format!(
                    "snapshot create {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            self.snaps.push((name, self.model.clone()));
        } else if r < 7 {
            let i = self.rng.gen_range(0..self.snaps.len());
            let name = self.snaps[i].0.clone();
            self.note(format!("snapshot delete {name}"));
            let out = snap_cmd(&self.m, &["delete", "c", &name]);
            if !out.status.success() {
                self.fail(&format!(
                    "snapshot delete {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            self.snaps.remove(i);
            self.deleted.push(name.clone());
            let gone = self.m.c().join(".snapshots").join(&name);
            if fs::symlink_metadata(&gone).is_ok() {
                self.fail(&format!("deleted snapshot {name} is still visible"));
            }
        } else {
            // Mostly the newest; sometimes an older one, destroying the newer ones.
            let i = if self.rng.gen_bool(0.7) {
                self.snaps.len() - 1
            } else {
                self.rng.gen_range(0..self.snaps.len())
            };
            let name = self.snaps[i].0.clone();
            self.note(format!(
                "snapshot rollback {name} (destroys {} newer)",
                self.snaps.len() - 1 - i
            ));
            let out = snap_cmd(
                &self.m,
                &["rollback", "c", &name, "--destroy-newer", "--force"],
            );
            if !out.status.success() {
                self.fail(&format!(
                    "snapshot rollback {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            for (n, _) in self.snaps.drain(i + 1..) {
                self.deleted.push(n);
            }
            self.model = self.snaps[i].1.clone();
        }
        self.check_all("after a snapshot operation");
    }

    fn check_all(&self, when: &str) {
        if let Err(e) = compare(&self.m.c(), &self.model) {
            self.fail(&format!("live tree {when}: {e}"));
        }
        for (name, model) in &self.snaps {
            let root = self.m.c().join(".snapshots").join(name);
            if let Err(e) = compare(&root, model) {
                self.fail(&format!("snapshot {name} {when}: {e}"));
            }
        }
        // The listing of .snapshots is exactly the live snapshots.
        let listed: BTreeSet<String> = match fs::read_dir(self.m.c().join(".snapshots")) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(e) => self.fail(&format!("read_dir .snapshots {when}: {e}")),
        };
        let want: BTreeSet<String> = self.snaps.iter().map(|(n, _)| n.clone()).collect();
        if listed != want {
            self.fail(&format!(
                ".snapshots lists {listed:?}, model {want:?} ({when})"
            ));
        }
    }
}

/// Seeds 7, 8 and 9 by default (a few seconds each), or DEDUPFS_MOUNT_MODEL_SEED alone.
#[test]
fn snapshots_through_the_mount_match_a_model() {
    unsafe {
        libc::umask(0o022);
    }
    let ops = env_num("DEDUPFS_MOUNT_MODEL_OPS", 300) as usize;
    let seeds = match std::env::var("DEDUPFS_MOUNT_MODEL_SEED") {
        Ok(s) => vec![s.parse().expect("DEDUPFS_MOUNT_MODEL_SEED")],
        Err(_) => vec![7, 8, 9],
    };
    for seed in seeds {
        run_model(seed, ops);
    }
}

fn run_model(seed: u64, ops: usize) {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pool = vec![0u8; 1 << 20];
    rng.fill_bytes(&mut pool);
    let mut run = Run {
        m: Mounted::new(),
        rng,
        model: Model::default(),
        next_id: 0,
        snaps: Vec::new(),
        deleted: Vec::new(),
        next_snap: 0,
        pool,
        log: Vec::new(),
        trace: std::env::var_os("DEDUPFS_MOUNT_MODEL_TRACE").is_some(),
        seed,
    };
    let (mut done, mut snap_ops) = (0, 0);
    let mut since_snap = 0;
    let mut gap = 15;
    while done < ops {
        if since_snap >= gap {
            run.snapshot_op();
            snap_ops += 1;
            since_snap = 0;
            gap = run.rng.gen_range(8..=22);
        }
        if run.step() {
            done += 1;
            since_snap += 1;
        }
    }
    // A last snapshot, then everything once more, and again after a remount.
    run.snapshot_op();
    run.check_all("at the end");
    run.note("remount".into());
    run.m.remount();
    run.check_all("after a remount");
    eprintln!(
        "seed {seed}: {ops} operations, {snap_ops} snapshot operations, {} snapshots at the end, {} entries live, {:.1?}",
        run.snaps.len(),
        run.model.names.len(),
        started.elapsed()
    );
    run.m.finish();
}
