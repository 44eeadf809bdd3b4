//! A snapshot as a [`restore::Source`]: `dedupfs restore` reads through the namespace when
//! no mount holds the store. Paths resolve component by component in the snapshot's view
//! (each remembered once met), and every chunk read is verified.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{FsError, Namespace, View};
use crate::format::Kind;
use crate::ids::InodeNo;
use crate::restore::{EntryKind, Source, SourceMeta};

/// Paths whose inode [`SnapshotSource`] remembers before it forgets them all: a few MiB.
const KNOWN_PATHS: usize = 1 << 16;

/// One snapshot of one container, read through the library.
pub struct SnapshotSource {
    ns: Arc<Namespace>,
    root: InodeNo,
    /// Inodes of paths met so far. A restore asks about every path several times (stat,
    /// xattrs, open) right after listing its directory, and walking from the root each time
    /// cost two reads of the store per component. A snapshot never changes, so an entry never
    /// goes stale.
    known: Mutex<HashMap<PathBuf, InodeNo>>,
}

fn io_error(e: FsError) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl SnapshotSource {
    /// The snapshot `name` of `container`.
    pub fn new(ns: Arc<Namespace>, container: &str, name: &str) -> Result<SnapshotSource, FsError> {
        let c = ns.container_by_name(container).ok_or(FsError::NotFound)?;
        let s = ns.snapshot_by_name(c.id, name).ok_or(FsError::NotFound)?;
        Ok(SnapshotSource {
            root: View::Snapshot(s.id, c.root).ino(),
            ns,
            known: Mutex::new(HashMap::new()),
        })
    }

    fn resolve(&self, rel: &Path) -> io::Result<InodeNo> {
        self.resolve_clean(&clean(rel)?)
    }

    /// `resolve` of a path made only of names.
    fn resolve_clean(&self, path: &Path) -> io::Result<InodeNo> {
        let Some(name) = path.file_name() else {
            return Ok(self.root);
        };
        if let Some(&ino) = self.known.lock().get(path) {
            return Ok(ino);
        }
        let parent = self.resolve_clean(path.parent().unwrap_or(Path::new("")))?;
        let ino = self
            .ns
            .lookup(parent, name.as_bytes())
            .map_err(io_error)?
            .ino;
        self.remember(vec![(path.to_path_buf(), ino)]);
        Ok(ino)
    }

    fn remember(&self, paths: Vec<(PathBuf, InodeNo)>) {
        if paths.len() > KNOWN_PATHS / 2 {
            return; // a huge directory: its entries are looked up one by one
        }
        let mut known = self.known.lock();
        if known.len() + paths.len() > KNOWN_PATHS {
            known.clear();
        }
        known.extend(paths);
    }
}

/// `rel` as names only, the form `SnapshotSource::known` is keyed by.
fn clean(rel: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for part in rel.components() {
        match part {
            Component::Normal(name) => out.push(name),
            Component::CurDir | Component::RootDir => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
    Ok(out)
}

impl Source for SnapshotSource {
    fn stat(&self, rel: &Path) -> io::Result<SourceMeta> {
        let a = self.ns.getattr(self.resolve(rel)?).map_err(io_error)?;
        let r = &a.rec;
        Ok(SourceMeta {
            kind: match r.kind {
                Kind::File => EntryKind::File,
                Kind::Dir => EntryKind::Dir,
                Kind::Symlink => EntryKind::Symlink,
                Kind::Fifo => EntryKind::Fifo,
                Kind::Socket => EntryKind::Socket,
                Kind::CharDev => EntryKind::CharDev,
                Kind::BlockDev => EntryKind::BlockDev,
            },
            perm: r.perm as u32,
            uid: r.uid,
            gid: r.gid,
            size: r.size,
            atime_ns: r.atime,
            mtime_ns: r.mtime,
            ino: a.ino.0,
            nlink: r.nlink,
            rdev: r.rdev as u64,
        })
    }

    fn read_dir(&self, rel: &Path) -> io::Result<Vec<OsString>> {
        let dir = clean(rel)?;
        let entries = self
            .ns
            .readdir(self.resolve_clean(&dir)?)
            .map_err(io_error)?;
        let (mut names, mut paths) = (Vec::new(), Vec::new());
        for e in entries {
            let name = OsString::from_vec(e.name);
            paths.push((dir.join(&name), e.ino));
            names.push(name);
        }
        self.remember(paths);
        Ok(names)
    }

    fn read_link(&self, rel: &Path) -> io::Result<PathBuf> {
        let target = self.ns.readlink(self.resolve(rel)?).map_err(io_error)?;
        Ok(PathBuf::from(OsString::from_vec(target)))
    }

    fn open(&self, rel: &Path) -> io::Result<Box<dyn Read + Send + '_>> {
        let ino = self.resolve(rel)?;
        self.ns.open(ino).map_err(io_error)?;
        Ok(Box::new(SnapshotReader {
            ns: &self.ns,
            ino,
            offset: 0,
            end: false,
        }))
    }

    fn xattrs(&self, rel: &Path) -> io::Result<Vec<(OsString, Vec<u8>)>> {
        let ino = self.resolve(rel)?;
        let names = self.ns.listxattr(ino).map_err(io_error)?;
        let mut out = Vec::new();
        for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let value = self.ns.getxattr(ino, name).map_err(io_error)?;
            out.push((OsString::from_vec(name.to_vec()), value));
        }
        Ok(out)
    }
}

/// Reads a snapshot file sequentially; releases it when dropped.
struct SnapshotReader<'a> {
    ns: &'a Namespace,
    ino: InodeNo,
    offset: u64,
    /// The namespace returned nothing: the end of the file.
    end: bool,
}

/// Bytes per read: a few chunks, so that the namespace's reads stay large.
const READ_SIZE: u32 = 1 << 20;

impl Read for SnapshotReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.end || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(READ_SIZE as u64) as u32;
        let data = self
            .ns
            .read(self.ino, self.offset, want)
            .map_err(io_error)?;
        self.end = data.is_empty();
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        self.offset += n as u64;
        Ok(n)
    }
}

impl Drop for SnapshotReader<'_> {
    fn drop(&mut self) {
        let _ = self.ns.release(self.ino);
    }
}
