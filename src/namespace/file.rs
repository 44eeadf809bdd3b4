//! File data: write buffers, content-defined re-chunking on commit, verified reads.
//!
//! Writes land in the file's dirty ranges and are acknowledged. A commit (flush, fsync,
//! release, the size bound, the idle timer) re-chunks only around the dirty bytes: it starts
//! at the boundary of the chunk holding the first dirty byte and stops at the first cut
//! after the dirty bytes that falls on an old chunk boundary, where content-defined cuts
//! have resynchronised; every chunk before and after is reused. Holes are never chunked.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::ops::FILE_SIZE_MAX;
use super::{
    is_snapshot_ino, writable, Attr, Caller, FsError, FsResult, Namespace, OpenEntry, Txn, View,
};
use crate::chunk_store::ChunkError;
use crate::chunking;
use crate::format::{key, ExtentRecord, InodeRecord, Kind};
use crate::ids::{ChunkId, ContainerId, Epoch, InodeNo};
use crate::kv::{Cf, Sync};
use crate::store::now_ns;

/// Dirty bytes of one file that trigger a commit, at most (fewer when many files are open,
/// see `Namespace::file_dirty_limit`). Big enough that hashing and compression run on large
/// batches on every core, small enough to bound memory per writer.
pub const DIRTY_LIMIT: usize = 16 << 20;

/// A committed chunk of a file.
#[derive(Clone, Copy, Debug)]
struct Extent {
    chunk: ChunkId,
    len: u32,
    birth: Epoch,
}

impl Extent {
    fn end(&self, start: u64) -> u64 {
        start + self.len as u64
    }
}

/// A file that is open (or being worked on): its extent map and pending writes.
pub struct OpenFile {
    pub ino: InodeNo,
    state: Mutex<FileState>,
    /// Signalled when a commit of this file finishes.
    idle: Condvar,
}

struct FileState {
    container: ContainerId,
    /// Size including pending writes.
    size: u64,
    /// Size in the stored inode record.
    disk_size: u64,
    /// Bytes covered by committed extents.
    data_bytes: u64,
    extents: BTreeMap<u64, Extent>,
    /// Pending bytes: disjoint, non-adjacent ranges.
    dirty: BTreeMap<u64, Vec<u8>>,
    dirty_bytes: usize,
    /// Pending bytes a commit in flight is storing; `dirty` overlays them.
    sealed: BTreeMap<u64, Arc<Vec<u8>>>,
    sealed_bytes: usize,
    /// A commit is between sealing and completing. Commits of one file never overlap.
    in_flight: bool,
    /// Failure of a background commit, reported by the next write, flush or fsync.
    error: Option<FsError>,
    /// Extents a truncate dropped, to release at the next commit.
    released: Vec<(u64, Extent)>,
    /// mtime and ctime to record at the next commit.
    times_dirty: Option<i64>,
    /// The times a commit in flight took from `times_dirty`, until it stores them.
    sealed_times: Option<i64>,
    /// Bytes of the extents a commit in flight is releasing (out of `released`, still in
    /// `data_bytes` until it stores its batch).
    sealed_released_bytes: u64,
    /// A natural cut at which a held-back tail starts: re-chunking may begin there.
    resume_at: Option<u64>,
    dirty_since: Option<Instant>,
    /// Flushed by a close with nothing written since: the pending writes wait only for the
    /// release.
    closed: bool,
}

impl FileState {
    /// The state of an open file whose inode no longer exists.
    fn gone(container: ContainerId) -> FileState {
        FileState {
            container,
            size: 0,
            disk_size: 0,
            data_bytes: 0,
            extents: BTreeMap::new(),
            dirty: BTreeMap::new(),
            dirty_bytes: 0,
            sealed: BTreeMap::new(),
            sealed_bytes: 0,
            in_flight: false,
            error: Some(FsError::NotFound),
            released: Vec::new(),
            times_dirty: None,
            sealed_times: None,
            sealed_released_bytes: 0,
            resume_at: None,
            dirty_since: None,
            closed: false,
        }
    }

    fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
            || !self.released.is_empty()
            || self.times_dirty.is_some()
            || self.disk_size != self.size
    }

    fn insert_dirty(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        // Fast path: appending right after a range, with nothing pending after it.
        let nothing_after = self.dirty.range(offset + 1..=end).next().is_none();
        if let Some((&s, v)) = self.dirty.range_mut(..=offset).next_back() {
            if nothing_after && s + v.len() as u64 == offset {
                v.extend_from_slice(data);
                self.dirty_bytes += data.len();
                return;
            }
        }
        // General case: merge every range that overlaps or touches [offset, end].
        let touching: Vec<u64> = self
            .dirty
            .range(..=end)
            .rev()
            .take_while(|(s, v)| **s + v.len() as u64 >= offset)
            .map(|(s, _)| *s)
            .collect();
        let mut start = offset;
        let mut stop = end;
        for s in &touching {
            let len = self.dirty[s].len() as u64;
            start = start.min(*s);
            stop = stop.max(s + len);
        }
        let mut merged = vec![0u8; (stop - start) as usize];
        for s in touching {
            let old = self.dirty.remove(&s).unwrap_or_default();
            self.dirty_bytes -= old.len();
            let at = (s - start) as usize;
            merged[at..at + old.len()].copy_from_slice(&old);
        }
        let at = (offset - start) as usize;
        merged[at..at + data.len()].copy_from_slice(data);
        self.dirty_bytes += merged.len();
        self.dirty.insert(start, merged);
    }

    /// Drops pending bytes at and after `size`.
    fn trim_dirty(&mut self, size: u64) {
        let beyond: Vec<u64> = self.dirty.range(size..).map(|(s, _)| *s).collect();
        for s in beyond {
            if let Some(v) = self.dirty.remove(&s) {
                self.dirty_bytes -= v.len();
            }
        }
        if let Some((&s, v)) = self.dirty.range_mut(..size).next_back() {
            let keep = (size - s) as usize;
            if v.len() > keep {
                self.dirty_bytes -= v.len() - keep;
                v.truncate(keep);
            }
        }
    }

    /// Drops the pending bytes in `[start, end)`; a range reaching past either end keeps
    /// its parts outside.
    fn cut_dirty(&mut self, start: u64, end: u64) {
        let first = self
            .dirty
            .range(..=start)
            .next_back()
            .map_or(start, |(s, _)| *s);
        let hit: Vec<u64> = self
            .dirty
            .range(first..end)
            .filter(|(s, v)| **s + v.len() as u64 > start)
            .map(|(s, _)| *s)
            .collect();
        for s in hit {
            let Some(v) = self.dirty.remove(&s) else {
                continue;
            };
            self.dirty_bytes -= v.len();
            // What stays keeps a gap on both sides: the ranges stay non-adjacent.
            if s < start {
                let left = v[..(start - s) as usize].to_vec();
                self.dirty_bytes += left.len();
                self.dirty.insert(s, left);
            }
            if s + v.len() as u64 > end {
                let right = v[(end - s) as usize..].to_vec();
                self.dirty_bytes += right.len();
                self.dirty.insert(end, right);
            }
        }
    }

    fn last_extent_end(&self) -> u64 {
        self.extents
            .iter()
            .next_back()
            .map(|(s, e)| e.end(*s))
            .unwrap_or(0)
    }

    /// The pieces `[pos, pos+len)` (clamped to the size) is made of, in order. With
    /// [`Holes::Stop`] the walk ends at the first byte neither a chunk nor a pending write
    /// covers.
    fn spans(&self, pos: u64, len: u64, holes: Holes) -> Vec<Span<'_>> {
        /// The range of `layer` holding `p`, or where the next range starts.
        fn covering<B: std::borrow::Borrow<Vec<u8>>>(
            layer: &BTreeMap<u64, B>,
            p: u64,
        ) -> Result<(u64, &[u8]), u64> {
            if let Some((&s, v)) = layer.range(..=p).next_back() {
                let v: &Vec<u8> = v.borrow();
                if s + v.len() as u64 > p {
                    return Ok((s, v));
                }
            }
            Err(layer
                .range(p + 1..)
                .next()
                .map(|(s, _)| *s)
                .unwrap_or(u64::MAX))
        }
        let limit = (pos + len).min(self.size);
        let mut out = Vec::new();
        let mut p = pos;
        while p < limit {
            // Newest first: pending writes, then those a commit in flight is storing.
            let next_dirty = match covering(&self.dirty, p) {
                Ok((s, v)) => {
                    let stop = (s + v.len() as u64).min(limit);
                    out.push(Span::Pending(&v[(p - s) as usize..(stop - s) as usize]));
                    p = stop;
                    continue;
                }
                Err(next) => next,
            };
            let next_sealed = match covering(&self.sealed, p) {
                Ok((s, v)) => {
                    let stop = (s + v.len() as u64).min(limit).min(next_dirty);
                    out.push(Span::Pending(&v[(p - s) as usize..(stop - s) as usize]));
                    p = stop;
                    continue;
                }
                Err(next) => next.min(next_dirty),
            };
            if let Some((&s, e)) = self.extents.range(..=p).next_back() {
                if e.end(s) > p {
                    let stop = e.end(s).min(limit).min(next_sealed);
                    out.push(Span::Chunk {
                        offset: s,
                        extent: *e,
                        from: (p - s) as usize,
                        to: (stop - s) as usize,
                    });
                    p = stop;
                    continue;
                }
            }
            if matches!(holes, Holes::Stop) {
                break;
            }
            let next_extent = self
                .extents
                .range(p + 1..)
                .next()
                .map(|(s, _)| *s)
                .unwrap_or(u64::MAX);
            let stop = next_sealed.min(next_extent).min(limit);
            out.push(Span::Hole((stop - p) as usize));
            p = stop;
        }
        out
    }

    /// The data bytes the file holds with its pending writes (for st_blocks): the committed
    /// extents' bytes, less those a truncate or punched hole released, plus the pending bytes
    /// no extent covers. An overwrite of stored bytes replaces them, so it adds nothing until
    /// its commit changes the chunks' lengths.
    fn data_bytes_with_pending(&self) -> u64 {
        let mut ranges: Vec<(u64, u64)> = self
            .dirty
            .iter()
            .map(|(s, v)| (*s, *s + v.len() as u64))
            .chain(self.sealed.iter().map(|(s, v)| (*s, *s + v.len() as u64)))
            .collect();
        ranges.sort_unstable();
        // Dirty ranges overlay sealed ones: count each byte once.
        let released: u64 = self.released.iter().map(|(_, e)| e.len as u64).sum();
        let mut total = self
            .data_bytes
            .saturating_sub(released + self.sealed_released_bytes);
        let mut run: Option<(u64, u64)> = None;
        for (start, end) in ranges {
            run = match run {
                Some((a, b)) if start <= b => Some((a, b.max(end))),
                Some((a, b)) => {
                    total += self.uncovered(a, b);
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        if let Some((a, b)) = run {
            total += self.uncovered(a, b);
        }
        total
    }

    /// Bytes of `[start, end)` that no committed extent covers.
    fn uncovered(&self, start: u64, end: u64) -> u64 {
        let first = self
            .extents
            .range(..=start)
            .next_back()
            .map_or(start, |(s, _)| *s);
        let covered: u64 = self
            .extents
            .range(first..end)
            .map(|(&s, e)| e.end(s).min(end).saturating_sub(s.max(start)))
            .sum();
        (end - start).saturating_sub(covered)
    }

    /// The ranges holding data, committed or pending, that end after `offset`, by start
    /// (they may overlap: pending writes overlay chunks).
    fn data_ranges_after(&self, offset: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        fn after<'a, V>(
            map: &'a BTreeMap<u64, V>,
            offset: u64,
            len: impl Fn(&V) -> u64 + 'a,
        ) -> impl Iterator<Item = (u64, u64)> + 'a {
            let before = map.range(..=offset).next_back();
            before
                .into_iter()
                .chain(map.range(offset.saturating_add(1)..))
                .map(move |(s, v)| (*s, *s + len(v)))
                .filter(move |(_, end)| *end > offset)
        }
        merge_by_start([
            Box::new(after(&self.extents, offset, |e: &Extent| e.len as u64))
                as Box<dyn Iterator<Item = (u64, u64)>>,
            Box::new(after(&self.dirty, offset, |v: &Vec<u8>| v.len() as u64)),
            Box::new(after(&self.sealed, offset, |v: &Arc<Vec<u8>>| {
                v.len() as u64
            })),
        ])
    }

    /// Puts `bytes` back under the current pending writes (newer writes win).
    fn restore_under(&mut self, older: BTreeMap<u64, Vec<u8>>) {
        let newer = std::mem::replace(&mut self.dirty, older);
        self.dirty_bytes = self.dirty.values().map(Vec::len).sum();
        for (offset, bytes) in newer {
            self.insert_dirty(offset, &bytes);
        }
    }

    /// True when the pending bytes are one range that ends at EOF, with no committed chunk
    /// at or after its start and a natural cut (or nothing) before it: a writer streaming
    /// a file. Such a range is cut on its own, with no old chunk bytes around it.
    fn is_streaming_append(&self) -> bool {
        let mut ranges = self.dirty.iter();
        let (Some((&start, bytes)), None) = (ranges.next(), ranges.next()) else {
            return false;
        };
        self.released.is_empty()
            && start + bytes.len() as u64 == self.size
            && self.region_start(start) == start
            && self.last_extent_end() <= start
    }

    /// Where re-chunking for dirty bytes starting at `d0` must begin.
    fn region_start(&self, d0: u64) -> u64 {
        if self.resume_at == Some(d0) {
            return d0;
        }
        match self.extents.range(..=d0).next_back() {
            // Inside a chunk: start at its beginning.
            Some((&s, e)) if e.end(s) > d0 => s,
            // Right after a chunk that ends at a hole or EOF: that cut was forced by the end
            // of the data, not chosen by content, so re-chunk it with what follows.
            Some((&s, e)) if e.end(s) == d0 && !self.extents.contains_key(&d0) => s,
            _ => d0,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CommitMode {
    /// Commit every pending byte.
    All,
    /// Keep an unfinished last chunk at EOF pending: the writer is likely still appending.
    HoldTail,
}

/// A stretch of the file re-chunked in one pass: its bytes and where the cuts fall.
struct Region {
    start: u64,
    /// Shared with the sealed pending bytes when the region is exactly one pending range.
    bytes: Arc<Vec<u8>>,
    /// End of each new chunk, as an index into `bytes`.
    cuts: Vec<usize>,
}

#[derive(Default)]
struct CutPlan {
    regions: Vec<Region>,
    /// Offsets of old extents the new chunks replace.
    removed: Vec<u64>,
    /// A tail at EOF left pending: offset and bytes.
    held: Option<(u64, Vec<u8>)>,
}

impl CutPlan {
    /// New chunks: file offset and bytes.
    fn chunks(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.regions.iter().flat_map(|r| {
            let mut from = 0;
            r.cuts.iter().map(move |&to| {
                let chunk = (r.start + from as u64, &r.bytes[from..to]);
                from = to;
                chunk
            })
        })
    }
}

/// Ok for a regular file; EISDIR for a directory, EINVAL for anything else.
pub(super) fn regular(rec: &InodeRecord) -> FsResult<()> {
    match rec.kind {
        Kind::File => Ok(()),
        Kind::Dir => Err(FsError::IsDir),
        _ => Err(FsError::Invalid),
    }
}

/// Sorted iterators of (start, end) merged into one sorted by start.
pub(crate) fn merge_by_start<'a, const N: usize>(
    sources: [Box<dyn Iterator<Item = (u64, u64)> + 'a>; N],
) -> impl Iterator<Item = (u64, u64)> + 'a {
    let mut sources = sources.map(|s| s.peekable());
    std::iter::from_fn(move || {
        let next = sources
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.peek().map(|r| (r.0, i)))
            .min()?;
        sources[next.1].next()
    })
}

/// Where lseek(2) SEEK_DATA (`hole` false) or SEEK_HOLE from `offset` lands in a file of
/// `size` bytes whose data lies in `ranges` (sorted by start, each ending after `offset`).
/// Past the last data SEEK_DATA fails with ENXIO; the end of the file is a hole.
pub(crate) fn seek_in(
    mut ranges: impl Iterator<Item = (u64, u64)>,
    offset: u64,
    size: u64,
    hole: bool,
) -> FsResult<u64> {
    if offset >= size {
        return Err(FsError::NoDataAfter);
    }
    if !hole {
        return match ranges.next() {
            Some((start, _)) if start.max(offset) < size => Ok(start.max(offset)),
            _ => Err(FsError::NoDataAfter),
        };
    }
    let mut at = offset;
    for (start, end) in ranges {
        if start > at {
            break;
        }
        at = at.max(end);
    }
    Ok(at.min(size))
}

/// Changes a setattr makes to the inode record in the same batch as a truncate.
type RecordPatch<'a> = dyn Fn(&mut InodeRecord) -> FsResult<()> + 'a;

/// A commit between [`Namespace::seal`] and [`Namespace::complete`].
struct Sealed {
    plan: CutPlan,
    /// A streaming append not cut yet: one pending range at EOF with nothing to re-chunk
    /// around it, which the committing thread cuts itself (see [`Namespace::cut_stream`]).
    stream: Option<(u64, Arc<Vec<u8>>)>,
    /// Extents a truncate dropped.
    released: Vec<(u64, Extent)>,
    /// The file's size when sealed; the size recorded stops where a held-back tail starts.
    size: u64,
    /// mtime and ctime to record.
    times: Option<i64>,
}

/// A piece of a file range: pending bytes, part of a chunk, or a hole.
enum Span<'a> {
    Pending(&'a [u8]),
    Chunk {
        offset: u64,
        extent: Extent,
        from: usize,
        to: usize,
    },
    Hole(usize),
}

/// What a walk over a file range does at a hole.
enum Holes {
    /// Reading: holes read as zeros.
    Zero,
    /// Re-chunking: stop at the first hole.
    Stop,
}

impl OpenFile {
    /// The stored record of the file read by `read`, with the pending writes applied. The
    /// record is read under the file's lock, which every commit of the file holds while it
    /// stores its batch: the record and the pending state are of the same moment.
    pub(crate) fn attr_with_pending(
        &self,
        read: impl FnOnce() -> FsResult<InodeRecord>,
    ) -> FsResult<InodeRecord> {
        let st = self.state.lock();
        let mut rec = read()?;
        rec.size = st.size;
        rec.data_bytes = st.data_bytes_with_pending();
        // A commit in flight has taken the writes' times and not stored them yet.
        if let Some(t) = st.times_dirty.or(st.sealed_times) {
            rec.mtime = t;
            rec.ctime = t;
        }
        Ok(rec)
    }
}

impl Namespace {
    fn load_file(&self, ino: InodeNo, rec: &InodeRecord) -> FsResult<OpenFile> {
        let mut extents = BTreeMap::new();
        let mut data_bytes = 0;
        let mut last_offset = None;
        for item in self.kv.scan_prefix(Cf::Extent, &key::extents_prefix(ino)) {
            let (k, v) = item?;
            let Some((_, offset, birth)) = key::parse_extent(&k) else {
                tracing::error!("{ino}: malformed extent key {}", hex::encode(&k));
                return Err(FsError::Io);
            };
            // Versions of one offset are adjacent, newest first.
            if last_offset == Some(offset) {
                continue;
            }
            last_offset = Some(offset);
            if crate::format::is_tombstone(&v) {
                continue;
            }
            let rec = ExtentRecord::decode(&v).ok_or_else(|| {
                tracing::error!("{ino}: extent at offset {offset} does not decode");
                FsError::Io
            })?;
            data_bytes += rec.len as u64;
            extents.insert(
                offset,
                Extent {
                    chunk: rec.chunk,
                    len: rec.len,
                    birth,
                },
            );
        }
        Ok(OpenFile {
            ino,
            state: Mutex::new(FileState {
                container: rec.container,
                size: rec.size,
                disk_size: rec.size,
                data_bytes,
                extents,
                dirty: BTreeMap::new(),
                dirty_bytes: 0,
                sealed: BTreeMap::new(),
                sealed_bytes: 0,
                in_flight: false,
                error: None,
                released: Vec::new(),
                times_dirty: None,
                sealed_times: None,
                sealed_released_bytes: 0,
                resume_at: None,
                dirty_since: None,
                closed: false,
            }),
            idle: Condvar::new(),
        })
    }

    /// Opens a file for reading and writing (or, in a snapshot view, for reading). Its state
    /// stays in memory until the last [`Namespace::release`].
    pub fn open(&self, ino: InodeNo) -> FsResult<()> {
        match View::of(ino) {
            View::Live(_) => self.open_live(ino).map(|_| ()),
            View::SnapshotsDir(_) => Err(FsError::IsDir),
            View::Snapshot(id, inner) => self.view_open(ino, id, inner),
        }
    }

    /// The open state of `ino`, if it is open.
    pub(crate) fn open_file(&self, ino: InodeNo) -> Option<Arc<OpenFile>> {
        self.open_files.lock().get(&ino).map(|e| e.file.clone())
    }

    /// Every open file, taken out of the table so that its lock is not held while they are
    /// worked on.
    pub(crate) fn open_file_list(&self) -> Vec<Arc<OpenFile>> {
        self.open_files
            .lock()
            .values()
            .map(|e| e.file.clone())
            .collect()
    }

    fn open_live(&self, ino: InodeNo) -> FsResult<Arc<OpenFile>> {
        if let Some(entry) = self.open_files.lock().get_mut(&ino) {
            entry.handles += 1;
            return Ok(entry.file.clone());
        }
        // Loading happens under the commit lock so that no unlink can purge the inode
        // between reading it and registering it as open.
        let st = self.commit.lock();
        let mut open = self.open_files.lock();
        if let Some(entry) = open.get_mut(&ino) {
            entry.handles += 1;
            return Ok(entry.file.clone());
        }
        let rec = self.inode(ino)?;
        regular(&rec)?;
        if rec.nlink == 0 {
            return Err(FsError::NotFound);
        }
        let file = Arc::new(self.load_file(ino, &rec)?);
        open.insert(
            ino,
            OpenEntry {
                file: file.clone(),
                handles: 1,
                releasing: 0,
            },
        );
        drop(open);
        drop(st);
        Ok(file)
    }

    /// Drops one open handle. The last one commits pending writes and, for a file unlinked
    /// while open, reclaims it.
    pub fn release(&self, ino: InodeNo) -> FsResult<()> {
        if is_snapshot_ino(ino) {
            self.view_release(ino);
            return Ok(());
        }
        let file = {
            let mut open = self.open_files.lock();
            let Some(entry) = open.get_mut(&ino) else {
                return Ok(());
            };
            entry.handles = entry.handles.saturating_sub(1);
            if entry.handles > 0 {
                return Ok(());
            }
            entry.releasing += 1;
            entry.file.clone()
        };
        let result = self.commit_open_file(&file, Sync::Process);
        {
            // The file may have been opened, written and released again while this commit
            // ran: only the last release to finish lets go of the state, or an open in
            // between would load the store's copy without the other release's writes.
            let mut open = self.open_files.lock();
            if let Some(entry) = open.get_mut(&ino) {
                entry.releasing -= 1;
                if entry.handles == 0 && entry.releasing == 0 {
                    open.remove(&ino);
                }
            }
        }
        if let Err(e) = result {
            // The writer has closed the file and may be gone: keep the failure for the next
            // sync of the store, and say which file lost its writes.
            tracing::error!("{ino}: committing the writes of a closed file failed: {e}");
            self.lost_commit.lock().get_or_insert(e);
            return Err(e);
        }
        self.purge_if_orphan(ino)
    }

    /// Runs `f` on the open state of `ino`, opening it for the duration if needed.
    fn with_file<T>(
        &self,
        ino: InodeNo,
        f: impl FnOnce(&Arc<OpenFile>) -> FsResult<T>,
    ) -> FsResult<T> {
        let file = self.open_live(ino)?;
        let result = f(&file);
        let released = self.release(ino);
        let value = result?;
        released?;
        Ok(value)
    }

    pub fn create_file(
        &self,
        parent: InodeNo,
        name: &[u8],
        perm: u16,
        caller: Caller,
    ) -> FsResult<Attr> {
        self.make_node(parent, name, Kind::File, perm, 0, b"", caller)
    }

    pub fn write(&self, ino: InodeNo, offset: u64, data: &[u8]) -> FsResult<u32> {
        writable(ino)?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= FILE_SIZE_MAX)
            .ok_or(FsError::TooBig)?;
        if self.kv.is_poisoned() {
            return Err(FsError::ReadOnly);
        }
        // Refuse at write time, not only at the commit, so the writer sees ENOSPC on the
        // write that does not fit.
        self.check_space(data.len() as u64)?;
        self.with_file(ino, |file| {
            let limit = self.file_dirty_limit();
            let mut st = file.state.lock();
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            st.insert_dirty(offset, data);
            st.closed = false;
            st.size = st.size.max(end);
            st.times_dirty = Some(now_ns());
            st.dirty_since.get_or_insert_with(Instant::now);
            self.io
                .bytes_written
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if st.dirty_bytes >= limit {
                self.commit_in_background(file, st, limit)?;
            }
            Ok(data.len() as u32)
        })
    }

    pub fn read(&self, ino: InodeNo, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        if let View::Snapshot(id, inner) = View::of(ino) {
            return self.view_read(ino, id, inner, offset, size);
        }
        self.with_file(ino, |file| {
            // Plan under the lock, copying pending bytes; fetch chunks after it, so that
            // parallel reads of one file (kernel read-ahead) decompress in parallel.
            enum Piece {
                Bytes(Vec<u8>),
                Chunk(u64, Extent, usize, usize),
                Hole(usize),
            }
            let pieces: Vec<Piece> = {
                let st = file.state.lock();
                if offset >= st.size {
                    return Ok(Vec::new());
                }
                st.spans(offset, size as u64, Holes::Zero)
                    .into_iter()
                    .map(|span| match span {
                        Span::Pending(b) => Piece::Bytes(b.to_vec()),
                        Span::Chunk {
                            offset,
                            extent,
                            from,
                            to,
                        } => Piece::Chunk(offset, extent, from, to),
                        Span::Hole(n) => Piece::Hole(n),
                    })
                    .collect()
            };
            let mut out = Vec::with_capacity(size as usize);
            for piece in pieces {
                match piece {
                    Piece::Bytes(b) => out.extend_from_slice(&b),
                    Piece::Hole(n) => out.resize(out.len() + n, 0),
                    Piece::Chunk(at, extent, from, to) => match self.chunks.read(&extent.chunk) {
                        Ok(data) if data.len() == extent.len as usize => {
                            out.extend_from_slice(&data[from..to])
                        }
                        // A commit since the plan replaced and reclaimed the chunk: read
                        // again under the lock.
                        Err(ChunkError::Missing(_)) => {
                            let st = file.state.lock();
                            out = self.fill(ino, &st, offset, size as u64, Holes::Zero)?;
                            break;
                        }
                        // Corrupt or unreadable: read again to log it with the file's name.
                        _ => {
                            let data = self.read_extent(ino, at, &extent)?;
                            out.extend_from_slice(&data[from..to]);
                        }
                    },
                }
            }
            self.io
                .bytes_read
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            Ok(out)
        })
    }

    /// lseek(2) SEEK_DATA (`hole` false) or SEEK_HOLE: the first byte at or after `offset`
    /// that holds data, or that is in a hole (the end of the file counts as one). Pending
    /// writes count as data.
    pub fn seek(&self, ino: InodeNo, offset: u64, hole: bool) -> FsResult<u64> {
        if let View::Snapshot(id, inner) = View::of(ino) {
            return self.view_seek(ino, id, inner, offset, hole);
        }
        // Opening refuses what is not a regular file (EISDIR, EINVAL).
        self.with_file(ino, |file| {
            let st = file.state.lock();
            seek_in(st.data_ranges_after(offset), offset, st.size, hole)
        })
    }

    /// What `close(2)` waits for: the failure of an earlier background commit of the file,
    /// if any. The pending writes are committed by the release that follows, which the
    /// kernel sends without making the closing process wait, so a writer of many small
    /// files does not wait for each one's chunking, compression and batch; what it reads
    /// back meanwhile comes from the open file's pending state.
    pub fn flush_on_close(&self, ino: InodeNo) -> FsResult<()> {
        let Some(file) = self.open_file(ino) else {
            return Ok(());
        };
        let mut st = file.state.lock();
        st.closed = true;
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Commits the files closed since their last writes whose release has not come yet, so
    /// that what reports space (statfs, stats) counts everything a writer has closed.
    pub fn commit_closed_files(&self) -> FsResult<()> {
        let files: Vec<Arc<OpenFile>> = self.open_file_list();
        for file in files {
            let st = file.state.lock();
            if st.closed && st.has_pending() {
                self.commit(&file, st, CommitMode::All, Sync::Process, None)?;
            }
        }
        Ok(())
    }

    /// Commits pending writes.
    pub fn flush(&self, ino: InodeNo) -> FsResult<()> {
        if is_snapshot_ino(ino) {
            return Ok(());
        }
        self.with_file(ino, |file| self.commit_open_file(file, Sync::Process))
    }

    /// Commits pending writes and makes them durable before returning.
    pub fn fsync(&self, ino: InodeNo) -> FsResult<()> {
        if is_snapshot_ino(ino) {
            return Ok(());
        }
        let rec = self.inode(ino)?;
        if rec.kind != Kind::File {
            return Ok(self.kv.sync_wal()?);
        }
        self.with_file(ino, |file| self.commit_open_file(file, Sync::Disk))
    }

    /// Makes every committed operation durable (fsync of a directory, syncfs). Reports,
    /// once, a commit after close that failed since the last call.
    pub fn sync_all(&self) -> FsResult<()> {
        self.kv.sync_wal()?;
        match self.lost_commit.lock().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(crate) fn commit_open_file(&self, file: &OpenFile, sync: Sync) -> FsResult<()> {
        let st = file.state.lock();
        self.commit(file, st, CommitMode::All, sync, None)
    }

    /// Commits files whose writes have waited longer than `age` (the idle timer).
    pub fn commit_idle(&self, age: Duration) -> FsResult<()> {
        let files: Vec<Arc<OpenFile>> = self.open_file_list();
        for file in files {
            let st = file.state.lock();
            if st.dirty_since.is_some_and(|t| t.elapsed() >= age) && !st.in_flight {
                self.commit(&file, st, CommitMode::All, Sync::Process, None)?;
            }
        }
        Ok(())
    }

    /// Sets the size of a regular file; `patch` applies the rest of a setattr in the same
    /// batch.
    pub(crate) fn truncate(
        &self,
        ino: InodeNo,
        size: u64,
        _caller: Caller,
        patch: impl Fn(&mut InodeRecord, i64) -> FsResult<()>,
    ) -> FsResult<Attr> {
        self.with_file(ino, |file| {
            let mut st = file.state.lock();
            Self::wait_idle(file, &mut st);
            if size < st.size {
                st.trim_dirty(size);
                if st.resume_at.is_some_and(|r| r >= size) {
                    st.resume_at = None;
                }
                let beyond: Vec<u64> = st.extents.range(size..).map(|(s, _)| *s).collect();
                for s in beyond {
                    if let Some(e) = st.extents.remove(&s) {
                        st.released.push((s, e));
                    }
                }
                let straddler = st
                    .extents
                    .range(..size)
                    .next_back()
                    .filter(|(s, e)| e.end(**s) > size)
                    .map(|(s, e)| (*s, *e));
                if let Some((s, e)) = straddler {
                    // The part before the cut becomes pending data; the chunk goes.
                    let keep = self.fill(ino, &st, s, size - s, Holes::Zero)?;
                    st.extents.remove(&s);
                    st.released.push((s, e));
                    st.insert_dirty(s, &keep);
                }
            }
            let changed = size != st.size;
            st.size = size;
            let now = now_ns();
            if changed {
                st.times_dirty = Some(now);
            }
            let patch_ref = &patch;
            self.commit(
                file,
                st,
                CommitMode::All,
                Sync::Process,
                Some(&|rec: &mut InodeRecord| patch_ref(rec, now)),
            )
        })?;
        self.getattr(ino)
    }

    /// fallocate(2) PUNCH_HOLE: `[offset, offset+len)`, clipped to the size, becomes a hole,
    /// in one batch; the size stays. Chunks wholly inside are released (their space comes
    /// back unless a snapshot or another file holds them); the bytes a chunk straddling an
    /// end holds outside the range are re-chunked as a write of them would be.
    pub fn punch_hole(&self, ino: InodeNo, offset: u64, len: u64) -> FsResult<()> {
        self.zero_range(ino, offset, len, false)
    }

    /// fallocate(2) ZERO_RANGE: [`Namespace::punch_hole`], and with `extend` a range reaching
    /// past the end also extends the size to its end, in the same batch.
    pub fn zero_range(&self, ino: InodeNo, offset: u64, len: u64, extend: bool) -> FsResult<()> {
        writable(ino)?;
        let end = offset.checked_add(len).ok_or(FsError::Invalid)?;
        if end > FILE_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        if self.kv.is_poisoned() {
            return Err(FsError::ReadOnly);
        }
        self.with_file(ino, |file| {
            let mut st = file.state.lock();
            Self::wait_idle(file, &mut st);
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            let grow = extend && end > st.size;
            let end = end.min(st.size);
            if offset >= end && !grow {
                return Ok(());
            }
            let first = st
                .extents
                .range(..=offset)
                .next_back()
                .map_or(offset, |(s, _)| *s);
            let hit: Vec<(u64, Extent)> = st
                .extents
                .range(first..end)
                .filter(|(s, e)| e.end(**s) > offset)
                .map(|(s, e)| (*s, *e))
                .collect();
            // Everything that can fail comes before the state changes: what the straddling
            // chunks hold outside the range (pending bytes over them included).
            let mut keep = Vec::new();
            for (s, e) in &hit {
                if *s < offset {
                    keep.push((*s, self.fill(ino, &st, *s, offset - s, Holes::Zero)?));
                }
                if e.end(*s) > end {
                    keep.push((end, self.fill(ino, &st, end, e.end(*s) - end, Holes::Zero)?));
                }
            }
            // To put back should the batch fail: the pending bytes the range drops.
            let cut: Vec<(u64, Vec<u8>)> = st
                .dirty
                .iter()
                .filter(|(s, v)| **s < end && **s + v.len() as u64 > offset)
                .map(|(s, v)| (*s, v.clone()))
                .collect();
            let (old_size, old_resume) = (st.size, st.resume_at);
            if end > offset {
                st.cut_dirty(offset, end);
            }
            if st.resume_at.is_some_and(|r| r >= offset && r < end) {
                st.resume_at = None;
            }
            for (s, e) in &hit {
                st.extents.remove(s);
                st.released.push((*s, *e));
            }
            for (s, bytes) in keep {
                st.insert_dirty(s, &bytes);
            }
            if grow {
                st.size = offset.saturating_add(len);
            }
            st.times_dirty = Some(now_ns());
            let result = self.commit(file, st, CommitMode::All, Sync::Process, None);
            if result.is_err() {
                // Leave the file as it was, not with a hole the next commit would store
                // although fallocate failed.
                let mut st = file.state.lock();
                Self::wait_idle(file, &mut st);
                let offsets: std::collections::HashSet<u64> = hit.iter().map(|(s, _)| *s).collect();
                st.released.retain(|(s, _)| !offsets.contains(s));
                st.extents.extend(hit);
                for (s, bytes) in cut {
                    st.insert_dirty(s, &bytes);
                }
                st.size = old_size;
                st.resume_at = old_resume;
            }
            result
        })
    }

    /// copy_file_range(2) by reference: `src`'s chunks from `offset` on become `dst`'s at the
    /// same offset, each gaining a reference, in one batch; no byte is read, cut, hashed or
    /// compressed. Done only for the shape a whole-file copy takes (`cp`): the same offset on
    /// both sides, `dst` ending there with nothing pending, and no chunk of `src` cut by the
    /// start. The copy stops short of `max` bytes at a chunk boundary. Ok(None) for any other
    /// shape: the caller copies bytes instead. `src` may be a snapshot's file.
    pub fn copy_by_reference(
        &self,
        src: InodeNo,
        dst: InodeNo,
        offset: u64,
        offset_out: u64,
        max: u64,
    ) -> FsResult<Option<u64>> {
        writable(dst)?;
        if offset != offset_out || src == dst || max == 0 {
            return Ok(None);
        }
        if self.kv.is_poisoned() {
            return Err(FsError::ReadOnly);
        }
        // The copy takes what is committed: the source's pending writes first. A source
        // whose background commit failed keeps that failure for its writer: bytes instead.
        if let Some(f) = self.open_file(src) {
            if f.state.lock().error.is_some() {
                return Ok(None);
            }
        }
        if !is_snapshot_ino(src) {
            self.flush(src)?;
        }
        self.with_file(dst, |file| {
            let mut st = file.state.lock();
            Self::wait_idle(file, &mut st);
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            if st.size != offset || st.has_pending() {
                return Ok(None);
            }
            // Under the commit lock no batch can release the source's chunks meanwhile.
            let mut commit = self.commit.lock();
            // Only the window's extents, and those a chunk's length before it (one may hold
            // `offset`).
            let limit = offset.saturating_add(max);
            let from = offset.saturating_sub(self.longest_extent());
            let (src_size, src_extents) = self.committed_extents(src, from, limit)?;
            if offset >= src_size {
                return Ok(Some(0));
            }
            let mut end = offset.saturating_add(max).min(src_size);
            if let Some((s, e)) = src_extents.range(..=offset).next_back() {
                if *s < offset && s + e.len as u64 > offset {
                    return Ok(None); // the start cuts a chunk
                }
            }
            if let Some((s, e)) = src_extents.range(..end).next_back() {
                if s + e.len as u64 > end {
                    end = *s; // stop before the chunk the limit cuts
                }
            }
            if end <= offset {
                return Ok(None);
            }
            // A damaged chunk is not copied on: the byte copy meets it as EIO.
            if src_extents
                .range(offset..end)
                .any(|(_, r)| self.chunks.is_suspect(&r.chunk))
            {
                return Ok(None);
            }
            let mut txn = Txn::new(Sync::Process);
            let live = self.live_epoch(st.container);
            let mut added = Vec::new();
            let mut logical = 0u64;
            for (&at, rec) in src_extents.range(offset..end) {
                self.put_extent(&mut txn, dst, at, st.container, rec, false)?;
                txn.reference(rec.chunk, None);
                logical += rec.len as u64;
                let birth = live;
                added.push((
                    at,
                    Extent {
                        chunk: rec.chunk,
                        len: rec.len,
                        birth,
                    },
                ));
            }
            let (mut rec, _) = self.read_inode(dst)?.ok_or(FsError::NotFound)?;
            let now = now_ns();
            rec.size = end;
            rec.data_bytes = st.data_bytes + logical;
            rec.mtime = now;
            rec.ctime = now;
            self.put_inode(&mut txn, dst, &rec)?;
            txn.count(st.container, |d| d.logical_bytes += logical as i64);
            self.apply(&mut commit, txn, &|_| None)?;
            drop(commit);
            st.extents.extend(added);
            st.data_bytes = rec.data_bytes;
            st.size = end;
            st.disk_size = end;
            st.times_dirty = None;
            Ok(Some(end - offset))
        })
    }

    /// How far before an offset the extent holding it may start. What must hold: no extent
    /// is longer than the store's largest chunk (every writer cuts with the store's chunker;
    /// truncates and punched holes only shorten extents).
    pub(super) fn longest_extent(&self) -> u64 {
        u64::from(self.store.config.chunker.max)
    }

    /// The committed size of a regular file, live (as the last batch left it) or in a
    /// snapshot, and its extents that start in `[from, to)`.
    fn committed_extents(
        &self,
        ino: InodeNo,
        from: u64,
        to: u64,
    ) -> FsResult<(u64, BTreeMap<u64, ExtentRecord>)> {
        if let View::Snapshot(id, inner) = View::of(ino) {
            let file = self.load_snap_range(id, inner, from, to)?;
            return Ok((file.size, file.extents));
        }
        let rec = self.inode(ino)?;
        regular(&rec)?;
        let extents = self.extents_at(ino, Epoch(u64::MAX), from, to)?;
        Ok((rec.size, extents))
    }

    /// Bytes of `[pos, pos+len)` from pending writes over committed chunks. With
    /// [`Holes::Stop`] the result ends at the first byte that neither covers.
    fn fill(
        &self,
        ino: InodeNo,
        st: &FileState,
        pos: u64,
        len: u64,
        holes: Holes,
    ) -> FsResult<Vec<u8>> {
        let mut out = Vec::new();
        self.fill_into(ino, st, pos, len, holes, &mut out)?;
        Ok(out)
    }

    /// [`Namespace::fill`] appending to `out`; returns the number of bytes appended.
    fn fill_into(
        &self,
        ino: InodeNo,
        st: &FileState,
        pos: u64,
        len: u64,
        holes: Holes,
        out: &mut Vec<u8>,
    ) -> FsResult<u64> {
        let limit = (pos + len).min(st.size);
        out.reserve(limit.saturating_sub(pos) as usize);
        let start = out.len();
        for span in st.spans(pos, len, holes) {
            match span {
                Span::Pending(bytes) => out.extend_from_slice(bytes),
                Span::Chunk {
                    offset,
                    extent,
                    from,
                    to,
                } => {
                    let data = self.read_extent(ino, offset, &extent)?;
                    out.extend_from_slice(&data[from..to]);
                }
                Span::Hole(n) => out.resize(out.len() + n, 0),
            }
        }
        Ok((out.len() - start) as u64)
    }

    /// The bytes of the chunk of `extent`, which starts at `offset` of file `ino`.
    fn read_extent(&self, ino: InodeNo, offset: u64, extent: &Extent) -> FsResult<Arc<Vec<u8>>> {
        let data = self.chunks.read(&extent.chunk).map_err(|err| {
            tracing::error!(
                "{} at offset {offset}: chunk {}: {err}",
                self.describe(ino),
                extent.chunk.to_hex()
            );
            FsError::from(err)
        })?;
        if data.len() != extent.len as usize {
            tracing::error!(
                "{} at offset {offset}: chunk {} has {} bytes, the extent says {}",
                self.describe(ino),
                extent.chunk.to_hex(),
                data.len(),
                extent.len
            );
            return Err(FsError::Io);
        }
        Ok(data)
    }

    /// Decides the new chunks of a commit.
    fn cut(&self, ino: InodeNo, st: &FileState, mode: CommitMode) -> FsResult<CutPlan> {
        let params = self.store.config.chunker;
        let max = params.max as u64;
        let intervals: Vec<(u64, u64)> = st
            .dirty
            .iter()
            .map(|(s, v)| (*s, s + v.len() as u64))
            .collect();
        let mut plan = CutPlan::default();
        let mut covered = 0u64;
        let mut i = 0;
        while i < intervals.len() {
            let (d0, d1) = intervals[i];
            i += 1;
            if d1 <= covered {
                continue;
            }
            let start = st.region_start(d0.max(covered)).max(covered);
            let mut pos = start;
            let mut dirty_end = d1;
            // The region's bytes, read ahead up to one maximum chunk past the last cut.
            let mut bytes: Vec<u8> = Vec::new();
            let mut cuts = Vec::new();
            let mut at = 0usize;
            let mut exhausted = false;
            loop {
                let ahead = (bytes.len() - at) as u64;
                if ahead < max && !exhausted {
                    let want = max - ahead;
                    let got =
                        self.fill_into(ino, st, pos + ahead, want, Holes::Stop, &mut bytes)?;
                    exhausted = got < want;
                }
                let window = &bytes[at..];
                if window.is_empty() {
                    break;
                }
                let cut = params.next_cut(window);
                let window_end = pos + window.len() as u64;
                if mode == CommitMode::HoldTail
                    && !cut.natural
                    && window_end == st.size
                    && st.last_extent_end() <= pos
                    && st
                        .dirty
                        .range(..=pos)
                        .next_back()
                        .is_some_and(|(s, v)| *s + v.len() as u64 >= st.size)
                {
                    plan.held = Some((pos, window.to_vec()));
                    bytes.truncate(at);
                    i = intervals.len();
                    break;
                }
                at += cut.len;
                cuts.push(at);
                pos += cut.len as u64;
                while i < intervals.len() && intervals[i].0 < pos {
                    dirty_end = dirty_end.max(intervals[i].1);
                    i += 1;
                }
                if !cut.natural || pos >= st.size {
                    break;
                }
                if pos >= dirty_end && st.extents.contains_key(&pos) {
                    break;
                }
            }
            bytes.truncate(at);
            plan.regions.push(Region {
                start,
                bytes: Arc::new(bytes),
                cuts,
            });
            plan.removed
                .extend(st.extents.range(start..pos).map(|(s, _)| *s));
            covered = pos;
        }
        Ok(plan)
    }

    /// Waits until no commit of `file` is in flight.
    /// Runs `f`, which rewrites the committed state of `files` (a rollback), with each of
    /// them locked and no commit of theirs in flight; then reloads each one's state from
    /// the store and drops its pending writes, so an open handle sees the file as `f` left
    /// it (or, when `f` removed it, as a file whose every commit fails with ENOENT).
    pub(crate) fn with_files_replaced<T>(
        &self,
        files: &[Arc<OpenFile>],
        f: impl FnOnce() -> FsResult<T>,
    ) -> FsResult<T> {
        let mut files: Vec<&Arc<OpenFile>> = files.iter().collect();
        files.sort_by_key(|f| f.ino);
        files.dedup_by_key(|f| f.ino);
        let mut guards = Vec::with_capacity(files.len());
        for file in &files {
            let mut st = file.state.lock();
            Self::wait_idle(file, &mut st);
            guards.push(st);
        }
        let result = f();
        for (file, st) in files.iter().zip(guards.iter_mut()) {
            let container = st.container;
            let fresh = self
                .read_inode(file.ino)
                .ok()
                .flatten()
                .and_then(|(rec, _)| self.load_file(file.ino, &rec).ok());
            **st = match fresh {
                Some(loaded) => loaded.state.into_inner(),
                None => FileState::gone(container),
            };
        }
        result
    }

    /// Runs `f` (which sets the file's times) with the pending writes' own times dropped:
    /// the file is locked and no commit of it in flight, so no later commit brings them
    /// back. Writes after `f` set the times again, as they should.
    pub(crate) fn with_write_times_dropped<T>(
        &self,
        ino: InodeNo,
        f: impl FnOnce() -> FsResult<T>,
    ) -> FsResult<T> {
        let open = self.open_file(ino);
        let Some(file) = open else {
            return f();
        };
        let mut st = file.state.lock();
        Self::wait_idle(&file, &mut st);
        st.times_dirty = None;
        f()
    }

    fn wait_idle(file: &OpenFile, st: &mut MutexGuard<'_, FileState>) {
        while st.in_flight {
            file.idle.wait(st);
        }
    }

    /// Commits the pending state of a file in one batch, waiting for a commit in flight
    /// first. The file lock is released while chunks are hashed and compressed, so reads and
    /// writes of the file go on meanwhile.
    fn commit(
        &self,
        file: &OpenFile,
        mut st: MutexGuard<'_, FileState>,
        mode: CommitMode,
        sync: Sync,
        patch: Option<&RecordPatch>,
    ) -> FsResult<()> {
        Self::wait_idle(file, &mut st);
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        if !st.has_pending() && patch.is_none() {
            drop(st);
            if sync == Sync::Disk {
                self.kv.sync_wal()?;
            }
            return Ok(());
        }
        let sealed = self.seal(file.ino, &mut st, mode)?;
        drop(st);
        self.complete(file, sealed, sync, patch)
    }

    /// Starts a commit of a file past the dirty bound on another thread and returns; waits
    /// first if a commit of the file is still in flight (so at most two bounds of pending
    /// data per file).
    fn commit_in_background(
        &self,
        file: &Arc<OpenFile>,
        mut st: MutexGuard<'_, FileState>,
        limit: usize,
    ) -> FsResult<()> {
        Self::wait_idle(file, &mut st);
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        if st.dirty_bytes < limit {
            return Ok(());
        }
        let sealed = self.seal(file.ino, &mut st, CommitMode::HoldTail)?;
        drop(st);
        let Some(ns) = self.me.get().and_then(|w| w.upgrade()) else {
            return self.complete(file, sealed, Sync::Process, None);
        };
        // Shared so that, should no thread start, this thread can complete the commit.
        let job = Arc::new(Mutex::new(Some(sealed)));
        let job_file = file.clone();
        let job_sealed = job.clone();
        let jobs = self.jobs.clone();
        *jobs.0.lock() += 1;
        let spawned = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || {
                let mut error = None;
                if let Some(sealed) = job_sealed.lock().take() {
                    if let Err(e) = ns.complete_work(&job_file, sealed, Sync::Process, None) {
                        tracing::error!("{}: background commit failed: {e}", job_file.ino);
                        error = Some(e);
                    }
                }
                // Let go of the namespace before anyone can see the commit finished, so
                // that whoever waits for it can close and reopen the store.
                drop(ns);
                Self::land(&job_file, error);
                *jobs.0.lock() -= 1;
                jobs.1.notify_all();
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a commit thread ({e}); committing inline");
            *self.jobs.0.lock() -= 1;
            if let Some(sealed) = job.lock().take() {
                return self.complete(file, sealed, Sync::Process, None);
            }
        }
        Ok(())
    }

    /// Cuts the pending bytes into chunks and moves them aside for [`Namespace::complete`];
    /// the file is then "in flight" until it completes.
    fn seal(&self, ino: InodeNo, st: &mut FileState, mode: CommitMode) -> FsResult<Sealed> {
        let stream = mode == CommitMode::HoldTail && st.is_streaming_append();
        let plan = if stream {
            CutPlan::default()
        } else {
            self.cut(ino, st, mode)?
        };
        st.sealed = std::mem::take(&mut st.dirty)
            .into_iter()
            .map(|(offset, bytes)| (offset, Arc::new(bytes)))
            .collect();
        st.sealed_bytes = std::mem::replace(&mut st.dirty_bytes, 0);
        st.in_flight = true;
        st.dirty_since = None;
        let stream = if stream {
            st.sealed.iter().next().map(|(s, b)| (*s, b.clone()))
        } else {
            None
        };
        st.sealed_released_bytes = st.released.iter().map(|(_, e)| e.len as u64).sum();
        Ok(Sealed {
            plan,
            stream,
            released: std::mem::take(&mut st.released),
            size: st.size,
            times: {
                st.sealed_times = st.times_dirty.take();
                st.sealed_times
            },
        })
    }

    /// Cuts a streaming append (see [`FileState::is_streaming_append`]) without copying
    /// it: every natural cut becomes a chunk, the unfinished last chunk is held back.
    fn cut_stream(&self, start: u64, bytes: Arc<Vec<u8>>) -> CutPlan {
        let params = self.store.config.chunker;
        let mut cuts = Vec::new();
        let mut held = None;
        let mut at = 0;
        while at < bytes.len() {
            let cut = params.next_cut(&bytes[at..]);
            if !cut.natural {
                held = Some((start + at as u64, bytes[at..].to_vec()));
                break;
            }
            at += cut.len;
            cuts.push(at);
        }
        CutPlan {
            regions: vec![Region { start, bytes, cuts }],
            removed: Vec::new(),
            held,
        }
    }

    /// Hashes and compresses a sealed commit's chunks without the file lock, then commits
    /// the batch and updates the file's state under it.
    fn complete(
        &self,
        file: &OpenFile,
        sealed: Sealed,
        sync: Sync,
        patch: Option<&RecordPatch>,
    ) -> FsResult<()> {
        let result = self.complete_work(file, sealed, sync, patch);
        Self::land(file, None);
        result
    }

    /// [`Namespace::complete`] without ending the flight.
    fn complete_work(
        &self,
        file: &OpenFile,
        mut sealed: Sealed,
        sync: Sync,
        patch: Option<&RecordPatch>,
    ) -> FsResult<()> {
        if let Some((start, bytes)) = sealed.stream.take() {
            sealed.plan = self.cut_stream(start, bytes);
        }
        // The stored size stops where a held-back tail starts: a crash must not expose
        // the tail as a hole of zeros.
        let disk_size = sealed
            .plan
            .held
            .as_ref()
            .map(|(s, _)| *s)
            .unwrap_or(sealed.size);
        let compression = self.store.config.compression;
        let chunks: Vec<(u64, &[u8])> = sealed.plan.chunks().collect();
        let slices: Vec<&[u8]> = chunks.iter().map(|(_, d)| *d).collect();
        let prepared = chunking::prepare(&slices, compression, |id| self.chunk_is_stored(id));

        let mut st = file.state.lock();
        let result = self.commit_sealed(
            file.ino, &st, &sealed, disk_size, &chunks, prepared, sync, patch,
        );
        let sealed_bytes = std::mem::take(&mut st.sealed);
        st.sealed_bytes = 0;
        st.sealed_times = None;
        st.sealed_released_bytes = 0;
        let outcome = match result {
            Ok((new_extents, data_bytes)) => {
                for off in &sealed.plan.removed {
                    st.extents.remove(off);
                }
                st.extents.extend(new_extents);
                st.data_bytes = data_bytes;
                st.disk_size = disk_size;
                st.resume_at = None;
                if let Some((s, bytes)) = sealed.plan.held {
                    st.resume_at = Some(s);
                    st.restore_under(BTreeMap::from([(s, bytes)]));
                }
                if !st.dirty.is_empty() {
                    st.dirty_since.get_or_insert_with(Instant::now);
                }
                Ok(())
            }
            Err(e) => {
                st.restore_under(
                    sealed_bytes
                        .into_iter()
                        .map(|(o, b)| (o, Arc::try_unwrap(b).unwrap_or_else(|b| (*b).clone())))
                        .collect(),
                );
                st.released.extend(sealed.released);
                if st.times_dirty.is_none() {
                    st.times_dirty = sealed.times;
                }
                st.dirty_since.get_or_insert_with(Instant::now);
                Err(e)
            }
        };
        outcome
    }

    /// Ends a commit's flight: later commits of the file may start. A background commit's
    /// failure is kept for the next write, flush or fsync to report.
    fn land(file: &OpenFile, error: Option<FsError>) {
        let mut st = file.state.lock();
        if error.is_some() {
            st.error = error;
        }
        st.in_flight = false;
        file.idle.notify_all();
    }

    /// Builds and applies the batch of a sealed commit. Returns the new extents and the
    /// file's new data byte count.
    #[allow(clippy::too_many_arguments)]
    fn commit_sealed(
        &self,
        ino: InodeNo,
        st: &FileState,
        sealed: &Sealed,
        disk_size: u64,
        chunks: &[(u64, &[u8])],
        prepared: Vec<chunking::PreparedChunk>,
        sync: Sync,
        patch: Option<&RecordPatch>,
    ) -> FsResult<(Vec<(u64, Extent)>, u64)> {
        let mut txn = Txn::new(sync);
        let mut logical: i64 = 0;
        // Versions are staged under the commit lock: a snapshot taken in between would
        // change which superseded versions must be kept.
        let mut commit = self.commit.lock();
        let new_offsets: std::collections::HashSet<u64> =
            chunks.iter().map(|(off, _)| *off).collect();
        let removed = sealed
            .plan
            .removed
            .iter()
            .filter_map(|off| st.extents.get(off).map(|e| (*off, *e)));
        let mut retired = std::collections::HashSet::new();
        for (off, e) in removed.chain(sealed.released.iter().copied()) {
            let replaced = new_offsets.contains(&off);
            if self.retire_extent(&mut txn, ino, off, e.birth, st.container, replaced)? {
                txn.release(e.chunk);
            }
            retired.insert(off);
            logical -= e.len as i64;
        }
        let live = self.live_epoch(st.container);
        let mut new_extents = Vec::with_capacity(prepared.len());
        for ((off, _), p) in chunks.iter().zip(prepared) {
            let rec = ExtentRecord {
                chunk: p.id,
                len: p.len,
            };
            self.put_extent(
                &mut txn,
                ino,
                *off,
                st.container,
                &rec,
                retired.contains(off),
            )?;
            logical += p.len as i64;
            new_extents.push((
                *off,
                Extent {
                    chunk: p.id,
                    len: p.len,
                    birth: live,
                },
            ));
            txn.reference(p.id, p.encoded);
        }
        let data_bytes = (st.data_bytes as i64 + logical).max(0) as u64;

        let (mut rec, _) = self.read_inode(ino)?.ok_or(FsError::NotFound)?;
        rec.size = disk_size;
        rec.data_bytes = data_bytes;
        if let Some(t) = sealed.times {
            rec.mtime = t;
            rec.ctime = t;
        }
        if let Some(patch) = patch {
            patch(&mut rec)?;
        }
        self.put_inode(&mut txn, ino, &rec)?;
        txn.count(st.container, |d| d.logical_bytes += logical);
        self.apply(&mut commit, txn, &|id| self.encode_among(chunks, id))?;
        Ok((new_extents, data_bytes))
    }

    /// Whether the store holds a good copy of `id`: its bytes need not be compressed.
    pub(super) fn chunk_is_stored(&self, id: &ChunkId) -> bool {
        !self.chunks.is_suspect(id) && self.chunks.refcount(id).map(|n| n > 0).unwrap_or(false)
    }

    /// The encoded payload of chunk `id` from a commit's chunks: for a chunk prepared as
    /// stored that was reclaimed before the commit (see [`Namespace::apply`]).
    pub(super) fn encode_among(&self, chunks: &[(u64, &[u8])], id: &ChunkId) -> Option<Vec<u8>> {
        chunks
            .iter()
            .find(|(_, d)| ChunkId::of(d) == *id)
            .map(|(_, d)| chunking::encode(d, self.store.config.compression))
    }
}
