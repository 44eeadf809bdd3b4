//! A running mount: open the store, mount, serve the control socket, commit idle writes,
//! unmount cleanly on SIGTERM/SIGINT/SIGHUP or `fusermount3 -u`.
//!
//! `dedupfs mount` without `--foreground` re-executes itself in the foreground in a new
//! session before anything opens the store (RocksDB's threads would not survive a fork),
//! and returns only when the child reports over a pipe that the mount is usable.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::control::ControlServer;
use crate::fuse::{FuseSession, MountOptions};
use crate::namespace::Namespace;
use crate::store::Store;

/// Pending writes older than this are committed by the idle timer.
const IDLE_COMMIT_AGE: Duration = Duration::from_secs(5);

pub struct MountConfig {
    pub store: PathBuf,
    pub mountpoint: PathBuf,
    pub options: Vec<String>,
    /// Shared out between the database's buffers, the chunk cache and pending writes.
    pub memory: crate::memory::MemoryBudget,
    /// `CONTAINER@SNAPSHOT`: mount that snapshot, read-only, instead of the whole store.
    pub snapshot: Option<String>,
}

fn snapshot_error(container: &str, name: &str, e: crate::namespace::FsError) -> anyhow::Error {
    match e {
        crate::namespace::FsError::NotFound => {
            anyhow!("snapshot {container}@{name} does not exist")
        }
        other => anyhow!("snapshot {container}@{name}: {other}"),
    }
}

/// Splits `CONTAINER@SNAPSHOT`.
pub fn parse_snapshot_spec(spec: &str) -> Result<(String, String)> {
    match spec.split_once('@') {
        Some((c, s)) if !c.is_empty() && !s.is_empty() && !s.contains(':') => {
            Ok((c.to_string(), s.to_string()))
        }
        _ => bail!("{spec:?}: expected CONTAINER@SNAPSHOT"),
    }
}

/// Snapshot mounts a running daemon serves beside its main mount (`dedupfs mount
/// --snapshot` while the store is mounted), each on its own FUSE session thread.
struct SnapshotMounts {
    ns: Arc<Namespace>,
    store: PathBuf,
    sessions:
        parking_lot::Mutex<Vec<(PathBuf, crate::fuse::Unmounter, std::thread::JoinHandle<()>)>>,
}

impl SnapshotMounts {
    fn mount(
        &self,
        container: &str,
        name: &str,
        mountpoint: &Path,
        options: &[String],
    ) -> Result<PathBuf> {
        let mountpoint = check_mountpoint(mountpoint)?;
        let fuse_options =
            MountOptions::parse_snapshot(&self.store, options).map_err(|e| anyhow!(e))?;
        let (root, id) = self
            .ns
            .hold_snapshot(container, name)
            .map_err(|e| snapshot_error(container, name, e))?;
        let mut session =
            match FuseSession::mount(self.ns.clone(), &mountpoint, &fuse_options, root) {
                Ok(s) => s,
                Err(e) => {
                    self.ns.release_snapshot(id);
                    bail!("mounting on {}: {e}", mountpoint.display());
                }
            };
        let unmounter = session.unmounter();
        let ns = self.ns.clone();
        let at = mountpoint.clone();
        let thread = std::thread::Builder::new()
            .name("snapshot-mount".into())
            .spawn(move || {
                if let Err(e) = session.run() {
                    tracing::error!("snapshot mount on {}: {e}", at.display());
                }
                ns.release_snapshot(id);
                tracing::info!("unmounted snapshot from {}", at.display());
            })?;
        tracing::info!(
            "mounted snapshot {container}@{name} on {}",
            mountpoint.display()
        );
        self.sessions
            .lock()
            .push((mountpoint.clone(), unmounter, thread));
        Ok(mountpoint)
    }

    /// Unmounts every snapshot mount still up and waits for their sessions.
    fn unmount_all(&self) {
        let sessions = std::mem::take(&mut *self.sessions.lock());
        for (at, mut unmounter, thread) in sessions {
            if !thread.is_finished() && unmounter.unmount().is_err() {
                let _ = std::process::Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&at)
                    .status();
            }
            let _ = thread.join();
        }
    }
}

/// Checks that `mountpoint` is an existing directory that nothing is mounted on.
pub fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf> {
    let path = std::fs::canonicalize(mountpoint)
        .map_err(|e| anyhow!("mountpoint {}: {e}", mountpoint.display()))?;
    if !path.is_dir() {
        bail!("mountpoint {} is not a directory", path.display());
    }
    if is_mountpoint(&path) {
        bail!(
            "mountpoint {} is busy: something is already mounted there",
            path.display()
        );
    }
    Ok(path)
}

/// True when `path` (canonical) is a mount point.
pub fn is_mountpoint(path: &Path) -> bool {
    mounts().iter().any(|(_, target)| target == path)
}

/// (source, target) of every mount, with /proc/mounts' octal escapes decoded.
pub fn mounts() -> Vec<(String, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let source = unescape(fields.next()?);
            let target = unescape(fields.next()?);
            Some((source, PathBuf::from(target)))
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Tells the waiting parent how the start went.
struct Ready(Option<File>);

impl Ready {
    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// Mounts and serves until unmounted. `ready_fd` is the pipe of a parent waiting for the
/// outcome (background mounts).
pub fn serve(cfg: MountConfig, ready_fd: Option<RawFd>) -> Result<()> {
    // SAFETY: the fd was handed to us by our parent for this purpose and is used once.
    let mut ready = Ready(ready_fd.map(|fd| unsafe { File::from_raw_fd(fd) }));
    match start(&cfg, &mut ready) {
        Ok(()) => Ok(()),
        Err(e) => {
            ready.send(&format!("error: {e:#}\n"));
            Err(e)
        }
    }
}

fn start(cfg: &MountConfig, ready: &mut Ready) -> Result<()> {
    cfg.memory.tune_malloc();
    let mountpoint = check_mountpoint(&cfg.mountpoint)?;
    let fuse_options = MountOptions::parse(&cfg.store, &cfg.options).map_err(|e| anyhow!(e))?;
    let mut store = Store::open_with(&cfg.store, &cfg.memory)?;
    store.set_holder(&format!("mounted at {}", mountpoint.display()));
    let store_path = store.path.clone();
    let ns = Namespace::new(store, cfg.memory.chunk_cache())
        .map_err(|e| anyhow!("{}: cannot open namespace: {e}", cfg.store.display()))?;
    ns.set_pending_budget(cfg.memory.pending_writes() as usize);
    let (root, fuse_options, held) = match &cfg.snapshot {
        None => (crate::ids::InodeNo::ROOT, fuse_options, None),
        Some(spec) => {
            let (container, name) = parse_snapshot_spec(spec)?;
            let (root, id) = ns
                .hold_snapshot(&container, &name)
                .map_err(|e| snapshot_error(&container, &name, e))?;
            (root, fuse_options.read_only(), Some(id))
        }
    };
    let mut session = FuseSession::mount(ns.clone(), &mountpoint, &fuse_options, root)
        .with_context(|| format!("mounting on {}", mountpoint.display()))?;
    let snapshot_mounts = Arc::new(SnapshotMounts {
        ns: ns.clone(),
        store: store_path.clone(),
        sessions: parking_lot::Mutex::new(Vec::new()),
    });
    let mounter: crate::control::SnapshotMounter = {
        let mounts = snapshot_mounts.clone();
        Arc::new(move |container, name, mountpoint, options| {
            mounts
                .mount(container, name, mountpoint, options)
                .map(|at| serde_json::json!({ "mountpoint": at }))
                .map_err(|e| format!("{e:#}"))
        })
    };
    let control = ControlServer::start(ns.clone(), &store_path, Some(mounter))
        .with_context(|| format!("control socket in {}", store_path.display()))?;

    let stop = Arc::new(AtomicBool::new(false));
    let committer = {
        let ns = ns.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("idle-commit".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(500));
                    if let Err(e) = ns.commit_idle(IDLE_COMMIT_AGE) {
                        tracing::error!("idle commit failed: {e}");
                    }
                    ns.maintain_space();
                    for (container, name) in ns.run_schedules(crate::store::now_ns()) {
                        tracing::info!("scheduled snapshot {container}@{name} taken");
                    }
                }
            })?
    };
    let mut unmounter = session.unmounter();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])?;
    let signal_handle = signals.handle();
    let signal_mountpoint = mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!("signal {sig}: unmounting {}", signal_mountpoint.display());
                if let Err(e) = unmounter.unmount() {
                    // Busy (open files): detach now; the session ends at the last close.
                    tracing::warn!("unmount failed ({e}); detaching lazily");
                    let _ = std::process::Command::new("fusermount3")
                        .arg("-u")
                        .arg("-z")
                        .arg(&signal_mountpoint)
                        .status();
                }
            }
        })?;

    tracing::info!(
        "mounted {} on {}",
        cfg.store.display(),
        mountpoint.display()
    );
    ready.send("ok\n");
    let result = session.run();
    snapshot_mounts.unmount_all();
    if let Some(id) = held {
        ns.release_snapshot(id);
    }
    signal_handle.close();
    stop.store(true, Ordering::Release);
    let _ = committer.join();
    drop(control);
    let shutdown = ns.shutdown();
    tracing::info!("unmounted {}", mountpoint.display());
    result.context("FUSE session")?;
    shutdown.map_err(|e| anyhow!("flushing the store at unmount: {e}"))?;
    Ok(())
}

/// Starts `serve` in a detached child and waits until it reports.
pub fn spawn_background(cfg: &MountConfig, log: &Path) -> Result<()> {
    // Check what we can before forking, for a clear message in the terminal.
    check_mountpoint(&cfg.mountpoint)?;
    Store::check(&cfg.store)?;
    MountOptions::parse(&cfg.store, &cfg.options).map_err(|e| anyhow!(e))?;
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    // SAFETY: we own both fds; clear CLOEXEC on the write end so the child inherits it.
    unsafe { libc::fcntl(write_fd, libc::F_SETFD, 0) };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("log file {}", log.display()))?;
    let exe = std::env::current_exe().context("finding the dedupfs executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("mount")
        .arg(&cfg.store)
        .arg(&cfg.mountpoint)
        .arg("--foreground")
        .arg("--ready-fd")
        .arg(write_fd.to_string())
        .arg("--memory")
        .arg(cfg.memory.total().to_string());
    if let Some(spec) = &cfg.snapshot {
        cmd.arg("--snapshot").arg(spec);
    }
    for o in &cfg.options {
        cmd.arg("-o").arg(o);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the mount daemon")?;
    // SAFETY: closing our copy of the write end so EOF arrives if the child dies.
    unsafe { libc::close(write_fd) };
    // SAFETY: read_fd is ours and used once here.
    let mut pipe = unsafe { File::from_raw_fd(read_fd) };
    let mut answer = String::new();
    let _ = pipe.read_to_string(&mut answer);
    let answer = answer.trim();
    if answer == "ok" {
        return Ok(());
    }
    if let Some(msg) = answer.strip_prefix("error: ") {
        bail!("{msg}");
    }
    bail!(
        "mount daemon (pid {}) exited before the mount was ready; see {}",
        child.id(),
        log.display()
    )
}

/// Unmounts `mountpoint` and waits until the daemon has flushed and released its store.
pub fn unmount(mountpoint: &Path) -> Result<()> {
    let path =
        std::fs::canonicalize(mountpoint).map_err(|e| anyhow!("{}: {e}", mountpoint.display()))?;
    let source = mounts()
        .into_iter()
        .find(|(_, target)| *target == path)
        .map(|(source, _)| source)
        .ok_or_else(|| anyhow!("{} is not mounted", path.display()))?;
    let store = source.strip_prefix("dedupfs:").map(PathBuf::from);
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .output()
        .context("running fusermount3 (install the fuse3 package)")?;
    if !status.status.success() {
        let err = String::from_utf8_lossy(&status.stderr);
        bail!(
            "cannot unmount {}: {} (close files open under it and retry)",
            path.display(),
            err.trim().rsplit(": ").next().unwrap_or("busy")
        );
    }
    if let Some(store) = store {
        // The daemon releases the store lock only after its final flush.
        for _ in 0..600 {
            if Store::check(&store).is_err() || !crate::store::is_locked(&store) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{} unmounted, but the daemon still holds {} after 60 s",
            path.display(),
            store.display()
        );
    }
    Ok(())
}
