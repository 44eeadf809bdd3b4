//! SIGKILL of the mount daemon during concurrent writes: fsck must be clean afterwards,
//! every file whose fsync returned must read back exactly, and nothing that was written
//! may read back corrupted (DESIGN.md, invariants 1-3).

mod common;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{dedupfs, Mounted};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// SIGKILL rounds in CI; `DEDUPFS_CRASH_ROUNDS` asks for more (scripts/crash-loop.sh).
const ROUNDS: usize = 20;

fn rounds() -> usize {
    std::env::var("DEDUPFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS)
}
const WRITERS: usize = 3;
const MIB: usize = 1 << 20;
/// Shared source of file content, so that files share chunks and refcounts exceed one.
const POOL_BYTES: usize = 8 * MIB;

/// What a file must read back as.
#[derive(Clone)]
struct Expect {
    len: usize,
    hash: blake3::Hash,
    /// The bytes, kept for the round that wrote them (to name the first differing offset).
    bytes: Option<Arc<Vec<u8>>>,
}

impl Expect {
    fn of(bytes: &[u8]) -> Expect {
        Expect {
            len: bytes.len(),
            hash: blake3::hash(bytes),
            bytes: Some(Arc::new(bytes.to_vec())),
        }
    }
}

/// State shared by the writers of one store.
struct Shared {
    dir: PathBuf,
    pool: Vec<u8>,
    /// Files whose fsync returned and that were not modified since.
    synced: Mutex<HashMap<PathBuf, Expect>>,
    /// Files written only by sequential appends, with everything written: whatever state
    /// a crash leaves must be a prefix of these bytes.
    appended: Mutex<HashMap<PathBuf, Arc<Vec<u8>>>>,
    /// Set before the daemon is killed: errors after it are expected.
    killed: AtomicBool,
}

fn fsck_clean(store: &Path, context: &str) {
    let out = dedupfs(["fsck".as_ref(), store.as_os_str()]);
    assert!(
        out.status.success(),
        "{context}: fsck is not clean:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_unlocked(store: &Path) {
    let start = Instant::now();
    while dedupfs::store::is_locked(store) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "store {} still locked 20 s after the daemon was killed",
            store.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn sigkill(pid: i32) {
    // SAFETY: plain syscall on a pid we read from the store's lock file.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

fn daemon_pid(m: &Mounted) -> i32 {
    let pid = m
        .daemon_pid()
        .expect("the store's lock file names the daemon's pid");
    assert!(pid > 1, "implausible daemon pid {pid}");
    pid
}

/// Content for a file of `size` bytes: slices of the pool mixed with fresh random bytes.
fn content(rng: &mut StdRng, pool: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let n = rng.gen_range(4096..=512 * 1024).min(size - out.len());
        if rng.gen_bool(0.6) {
            let at = rng.gen_range(0..=pool.len() - n);
            out.extend_from_slice(&pool[at..at + n]);
        } else {
            let start = out.len();
            out.resize(start + n, 0);
            rng.fill_bytes(&mut out[start..]);
        }
    }
    out
}

fn file_size(rng: &mut StdRng) -> usize {
    match rng.gen_range(0..10) {
        0..=1 => rng.gen_range(0..64 * 1024),
        2..=6 => rng.gen_range(64 * 1024..MIB),
        _ => rng.gen_range(MIB..=3 * MIB),
    }
}

/// Writes, modifies, syncs and deletes files until the mount goes away.
fn writer(shared: &Shared, round: usize, tid: usize, seed: u64) -> Result<usize, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mine: Vec<PathBuf> = Vec::new();
    for n in 0.. {
        let path = shared.dir.join(format!("r{round:02}-t{tid}-{n:03}"));
        if let Err(e) = one_file(shared, &mut rng, &path, &mut mine) {
            if shared.killed.load(Ordering::SeqCst) {
                return Ok(n);
            }
            return Err(format!(
                "{}: {e} before the daemon was killed",
                path.display()
            ));
        }
    }
    unreachable!()
}

fn forget(shared: &Shared, path: &Path) {
    shared.synced.lock().unwrap().remove(path);
    shared.appended.lock().unwrap().remove(path);
}

fn one_file(
    shared: &Shared,
    rng: &mut StdRng,
    path: &Path,
    mine: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let size = file_size(rng);
    let data = content(rng, &shared.pool, size);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    mine.push(path.to_path_buf());
    let data = Arc::new(data);
    shared
        .appended
        .lock()
        .unwrap()
        .insert(path.to_path_buf(), data.clone());
    let mut off = 0;
    while off < data.len() {
        let n = rng.gen_range(4096..=256 * 1024).min(data.len() - off);
        f.write_all(&data[off..off + n])?;
        off += n;
    }
    let mut expected = data.to_vec();
    // Changes that are not appends: the file leaves the prefix check.
    let modify = |f: &mut File, rng: &mut StdRng, expected: &mut Vec<u8>| -> std::io::Result<()> {
        forget(shared, path);
        let kind: f64 = rng.gen();
        if kind < 0.6 || expected.is_empty() {
            let at = rng.gen_range(0..=expected.len());
            let n = rng.gen_range(1..=192 * 1024);
            let bytes = content(rng, &shared.pool, n);
            f.write_all_at(&bytes, at as u64)?;
            if expected.len() < at + bytes.len() {
                expected.resize(at + bytes.len(), 0);
            }
            expected[at..at + bytes.len()].copy_from_slice(&bytes);
        } else if kind < 0.8 {
            let len = rng.gen_range(0..=expected.len() + 128 * 1024);
            f.set_len(len as u64)?;
            expected.resize(len, 0);
        } else {
            // A punched hole: one batch like the rest.
            let at = rng.gen_range(0..expected.len());
            let n = rng.gen_range(1..=256 * 1024).min(expected.len() - at);
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: a plain fallocate on an open descriptor.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, at as i64, n as i64) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            expected[at..at + n].fill(0);
        }
        Ok(())
    };
    for _ in 0..rng.gen_range(0..=2) {
        modify(&mut f, rng, &mut expected)?;
    }
    if rng.gen_bool(0.6) {
        f.sync_all()?;
        shared
            .synced
            .lock()
            .unwrap()
            .insert(path.to_path_buf(), Expect::of(&expected));
        if rng.gen_bool(0.2) {
            // A copy by reference (copy_file_range, as cp makes it), synced: it must read
            // back whole after the kill, and its chunk references must add up.
            let copy = path.with_extension("copy");
            let dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&copy)?;
            mine.push(copy.clone());
            let (mut off_in, mut off_out) = (0i64, 0i64);
            while (off_in as usize) < expected.len() {
                let left = expected.len() - off_in as usize;
                // SAFETY: copy_file_range between open descriptors, offsets owned here.
                let n = unsafe {
                    libc::copy_file_range(
                        f.as_raw_fd(),
                        &mut off_in,
                        dst.as_raw_fd(),
                        &mut off_out,
                        left,
                        0,
                    )
                };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if n == 0 {
                    break;
                }
            }
            dst.sync_all()?;
            shared
                .synced
                .lock()
                .unwrap()
                .insert(copy, Expect::of(&expected));
        }
        if rng.gen_bool(0.25) {
            modify(&mut f, rng, &mut expected)?;
            if rng.gen_bool(0.5) {
                f.sync_all()?;
                shared
                    .synced
                    .lock()
                    .unwrap()
                    .insert(path.to_path_buf(), Expect::of(&expected));
            }
        }
    }
    if rng.gen_bool(0.1) {
        // Unlinked while open: an orphan that a kill leaves for the next mount to reclaim.
        forget(shared, path);
        mine.retain(|p| p != path);
        std::fs::remove_file(path)?;
        modify(&mut f, rng, &mut expected)?;
        f.sync_all()?;
        let mut back = vec![0u8; expected.len()];
        f.read_exact_at(&mut back, 0)?;
        assert!(
            back == expected,
            "{}: unlinked open file reads back wrong: {}",
            path.display(),
            first_difference(&back, &expected)
        );
    }
    drop(f);
    // Now and then delete one of this writer's earlier files.
    if mine.len() > 3 && rng.gen_bool(0.15) {
        let victim = mine.swap_remove(rng.gen_range(0..mine.len() - 1));
        forget(shared, &victim);
        std::fs::remove_file(&victim)?;
    }
    Ok(())
}

fn first_difference(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!("first difference at offset {i}"),
        None => format!("length {} instead of {}", got.len(), want.len()),
    }
}

/// After a remount: every synced file reads back exactly, every appended-only file is a
/// prefix of what was written, and every file of the container whose name starts with
/// `prefix` reads without error.
fn verify(shared: &Shared, prefix: &str, context: &str) {
    let synced = shared.synced.lock().unwrap().clone();
    for (path, want) in &synced {
        let got = std::fs::read(path).unwrap_or_else(|e| {
            panic!(
                "{context}: fsync'ed file {} unreadable: {e}",
                path.display()
            )
        });
        if got.len() != want.len || blake3::hash(&got) != want.hash {
            let detail = match &want.bytes {
                Some(bytes) => first_difference(&got, bytes),
                None => format!("{} bytes, expected {}", got.len(), want.len),
            };
            panic!(
                "{context}: fsync'ed file {} reads back wrong: {detail}",
                path.display()
            );
        }
    }
    let appended = shared.appended.lock().unwrap().clone();
    for (path, data) in &appended {
        match std::fs::read(path) {
            Ok(got) => assert!(
                got.len() <= data.len() && got[..] == data[..got.len()],
                "{context}: {} is not a prefix of what was appended ({} bytes read, {} written; {})",
                path.display(),
                got.len(),
                data.len(),
                first_difference(&got, data)
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("{context}: {}: {e}", path.display()),
        }
    }
    let mut buf = vec![0u8; MIB];
    for entry in std::fs::read_dir(&shared.dir).expect("list the container") {
        let entry = entry.expect("directory entry");
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let mut f = File::open(entry.path())
            .unwrap_or_else(|e| panic!("{context}: open {}: {e}", entry.path().display()));
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => panic!("{context}: read {}: {e}", entry.path().display()),
            }
        }
    }
}

/// `dedupfs snapshot ARGS --store STORE`, which must succeed.
fn snapshot_cli(m: &Mounted, args: &[&str]) {
    let mut all: Vec<std::ffi::OsString> = vec!["snapshot".into()];
    all.extend(args.iter().map(|a| a.into()));
    all.push("--store".into());
    all.push(m.store.clone().into());
    common::ok(dedupfs(all));
}

/// Reads every file under `dir` (a snapshot survived the crash whole: nothing fails).
fn read_tree(dir: &Path, context: &str) {
    for entry in
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{context}: list {}: {e}", dir.display()))
    {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            read_tree(&path, context);
        } else {
            std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{context}: read {}: {e}", path.display()));
        }
    }
}

/// Clears the dead mount of a killed daemon (with `dedupfs umount`, as an admin would, when
/// `cli` is set), checks the store and remounts.
fn crash_and_recover(m: &mut Mounted, pid: i32, cli: bool, context: &str) {
    if cli {
        let out = dedupfs(["umount".as_ref(), m.mnt.as_os_str()]);
        assert!(
            out.status.success(),
            "{context}: dedupfs umount of a dead mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !common::is_mounted(&m.mnt),
            "{context}: dead mount still listed"
        );
    }
    m.forget_killed_mount();
    wait_unlocked(&m.store);
    assert!(
        !common::is_mounted(&m.mnt),
        "{context}: dead mount still listed"
    );
    fsck_clean(&m.store, context);
    if cli {
        // The dead daemon's control socket is still there; the CLI must see through it.
        let out = common::ok(dedupfs([
            "container".as_ref(),
            "list".as_ref(),
            "--store".as_ref(),
            m.store.as_os_str(),
        ]));
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some("c")),
            "{context}: container list after the crash: {out}"
        );
    }
    m.mount();
    let new_pid = daemon_pid(m);
    assert_ne!(
        new_pid, pid,
        "{context}: remount reports the killed daemon's pid"
    );
}

#[test]
fn sigkill_during_concurrent_writes() {
    let started = Instant::now();
    let mut m = Mounted::new();
    let mut rng = StdRng::seed_from_u64(0x5eed_c4a5);
    let mut pool = vec![0u8; POOL_BYTES];
    rng.fill_bytes(&mut pool);
    let shared = Arc::new(Shared {
        dir: m.c(),
        pool,
        synced: Mutex::new(HashMap::new()),
        appended: Mutex::new(HashMap::new()),
        killed: AtomicBool::new(false),
    });
    let mut files_written = 0;
    let rounds = rounds();
    for round in 0..rounds {
        let context = format!("round {round}");
        shared.killed.store(false, Ordering::SeqCst);
        // Only the last round's appended files are checked as prefixes; their bytes are big.
        shared.appended.lock().unwrap().clear();
        let pid = daemon_pid(&m);
        let writers: Vec<_> = (0..WRITERS)
            .map(|tid| {
                let shared = shared.clone();
                let seed = rng.gen();
                thread::spawn(move || writer(&shared, round, tid, seed))
            })
            .collect();
        thread::sleep(Duration::from_millis(rng.gen_range(100..=600)));
        // Snapshots are taken and deleted while the writers run; a kill lands after them.
        if round % 2 == 0 {
            snapshot_cli(&m, &["create", "c", &format!("snap{round:02}")]);
            if round >= 4 {
                snapshot_cli(&m, &["delete", "c", &format!("snap{:02}", round - 4)]);
            }
        }
        thread::sleep(Duration::from_millis(rng.gen_range(50..=600)));
        shared.killed.store(true, Ordering::SeqCst);
        sigkill(pid);
        for w in writers {
            match w.join().expect("writer thread panicked") {
                Ok(n) => files_written += n,
                Err(e) => panic!("{context}: {e}"),
            }
        }
        crash_and_recover(&mut m, pid, round % 4 == 3, &context);
        verify(&shared, &format!("r{round:02}-"), &context);
        if round % 2 == 0 {
            read_tree(&m.c().join(format!(".snapshots/snap{round:02}")), &context);
        }
        // Older rounds are checked by hash only from now on.
        for e in shared.synced.lock().unwrap().values_mut() {
            e.bytes = None;
        }
    }
    let synced = shared.synced.lock().unwrap().len();
    eprintln!(
        "{rounds} rounds, {files_written} files started, {synced} fsync'ed files verified, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        synced >= rounds,
        "too few fsync'ed files ({synced}) to mean anything"
    );
    m.remount();
    verify(&shared, "", "after a clean remount");
    m.finish();
}

/// Kill during one large sequential write: while the size bound's background commit of the
/// first part runs, then later, once it has committed and the tail is held back. The second
/// stream repeats the first one's bytes, so its chunks are shared with what survived.
#[test]
fn sigkill_during_streaming_write() {
    const TOTAL: usize = 160 * MIB;
    const BLOCK: usize = MIB;
    let mut m = Mounted::new();
    let mut rng = StdRng::seed_from_u64(0x57_4ea4);
    let mut data = vec![0u8; TOTAL];
    rng.fill_bytes(&mut data);
    let data = Arc::new(data);
    let mut survivors: Vec<(PathBuf, usize)> = Vec::new();
    for (round, (from_mib, spread_mib)) in [(34, 6), (60, 12)].into_iter().enumerate() {
        let context = format!("streaming write {round}");
        let path = m.c().join(format!("stream-{round}"));
        let written = Arc::new(AtomicU64::new(0));
        let killed = Arc::new(AtomicBool::new(false));
        let pid = daemon_pid(&m);
        let streamer = {
            let (path, data, written, killed) =
                (path.clone(), data.clone(), written.clone(), killed.clone());
            thread::spawn(move || -> Result<(), String> {
                let mut f = File::create(&path).map_err(|e| format!("create: {e}"))?;
                for block in data.chunks(BLOCK) {
                    if let Err(e) = f.write_all(block) {
                        if killed.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        return Err(format!("write: {e} before the kill"));
                    }
                    written.fetch_add(block.len() as u64, Ordering::SeqCst);
                }
                Err("the whole stream was written before the kill".into())
            })
        };
        let kill_at = (from_mib + rng.gen_range(0..spread_mib)) as u64 * MIB as u64;
        let start = Instant::now();
        while written.load(Ordering::SeqCst) < kill_at {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "{context}: too slow: {} bytes in 90 s",
                written.load(Ordering::SeqCst)
            );
            thread::sleep(Duration::from_millis(2));
        }
        killed.store(true, Ordering::SeqCst);
        sigkill(pid);
        streamer
            .join()
            .expect("streaming thread panicked")
            .unwrap_or_else(|e| panic!("{context}: {e}"));
        let acknowledged = written.load(Ordering::SeqCst) as usize;
        crash_and_recover(&mut m, pid, round == 0, &context);
        let got = std::fs::read(&path).expect("the streamed file exists and reads");
        assert!(
            got.len() <= acknowledged + BLOCK && got[..] == data[..got.len()],
            "{context}: the file is not a prefix of what was written ({} bytes; {})",
            got.len(),
            first_difference(&got, &data)
        );
        eprintln!(
            "{context}: killed at {} MiB acknowledged; {} bytes survived",
            acknowledged / MIB,
            got.len()
        );
        survivors.push((path, got.len()));
        for (path, len) in &survivors {
            let again = std::fs::read(path).expect("an earlier stream reads");
            assert!(
                again.len() == *len && again[..] == data[..*len],
                "{context}: {} changed after a later crash",
                path.display()
            );
        }
    }
    m.finish();
}

/// Copies a directory tree of regular files (a store: no links, no special files but the
/// control socket, which is skipped).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Power loss: an image of the store taken at a random instant (the daemon frozen with
/// SIGSTOP, so the copy is what the disk would hold if the machine stopped there, page cache
/// included) opens to a consistent store that holds every file whose fsync had returned.
#[test]
fn store_images_taken_at_random_instants_are_consistent() {
    const IMAGES: usize = 3;
    let mut m = Mounted::new();
    let mut rng = StdRng::seed_from_u64(0x1_3a6e);
    let mut pool = vec![0u8; POOL_BYTES];
    rng.fill_bytes(&mut pool);
    let shared = Arc::new(Shared {
        dir: m.c(),
        pool,
        synced: Mutex::new(HashMap::new()),
        appended: Mutex::new(HashMap::new()),
        killed: AtomicBool::new(false),
    });
    let pid = daemon_pid(&m);
    let writers: Vec<_> = (0..WRITERS)
        .map(|tid| {
            let shared = shared.clone();
            let seed = rng.gen();
            thread::spawn(move || writer(&shared, 0, tid, seed))
        })
        .collect();
    let mut images = Vec::new();
    for i in 0..IMAGES {
        thread::sleep(Duration::from_millis(rng.gen_range(200..=900)));
        // SAFETY: plain syscalls on the daemon's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        // Frozen: no fsync can return from now on, so these files are all on "disk".
        let synced = shared.synced.lock().unwrap().clone();
        let image = m.dir.path().join(format!("image{i}"));
        // Copied in this process: a child would close its inherited descriptors of files
        // in the mount at exec, which waits for the frozen daemon.
        let copied = copy_tree(&m.store, &image);
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        copied.expect("copying the store");
        images.push((image, synced));
    }
    shared.killed.store(true, Ordering::SeqCst);
    sigkill(pid);
    for w in writers {
        w.join().expect("writer thread panicked").expect("writer");
    }
    crash_and_recover(&mut m, pid, false, "after the images");
    let live_c = m.c();
    m.fsck_clean();
    for (i, (image, synced)) in images.iter().enumerate() {
        let context = format!("image {i}");
        // The copied lock file is not held by anyone: the image opens like a store after a
        // power cut.
        fsck_clean(image, &context);
        let mnt = m.dir.path().join(format!("image{i}-mnt"));
        std::fs::create_dir(&mnt).unwrap();
        common::ok(dedupfs([
            "mount".as_ref(),
            image.as_os_str(),
            mnt.as_os_str(),
        ]));
        for (path, want) in synced {
            let rel = path.strip_prefix(&live_c).unwrap();
            let got = std::fs::read(mnt.join("c").join(rel))
                .unwrap_or_else(|e| panic!("{context}: {}: {e}", rel.display()));
            assert!(
                got.len() == want.len && blake3::hash(&got) == want.hash,
                "{context}: fsync'ed file {} reads back wrong",
                rel.display()
            );
        }
        common::ok(dedupfs(["umount".as_ref(), mnt.as_os_str()]));
        fsck_clean(image, &context);
        eprintln!("{context}: {} fsync'ed files verified", synced.len());
    }
    assert!(
        images.iter().any(|(_, s)| !s.is_empty()),
        "no fsync had returned before any image: the test checked nothing"
    );
}
