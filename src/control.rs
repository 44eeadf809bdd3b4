//! Control socket of a running mount: one JSON request and one JSON reply per line.
//!
//! The socket lives in the store directory with mode 0600 and accepts only root or the
//! owner of the store. The same [`execute`] serves requests from the socket and from the
//! CLI when no daemon holds the store, so both paths behave alike.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::namespace::{Caller, FsError, Namespace};

/// Version of the request format; a request with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line accepted: requests are small; anything longer is an error.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    Ping,
    ContainerCreate {
        name: String,
    },
    ContainerList,
    ContainerInfo {
        name: String,
    },
    ContainerDelete {
        name: String,
        force: bool,
    },
    Stats {
        container: Option<String>,
    },
    SnapshotCreate {
        container: String,
        name: Option<String>,
    },
    SnapshotList {
        container: Option<String>,
    },
    SnapshotDelete {
        container: String,
        name: String,
    },
    /// Verify every chunk; progress lines precede the reply.
    Scrub,
    SnapshotRollback {
        container: String,
        name: String,
        force: bool,
        destroy_newer: bool,
    },
    ContainerSet {
        name: String,
        schedule: Option<crate::namespace::SnapshotSchedule>,
    },
    ContainerClone {
        source: String,
        snapshot: String,
        name: String,
    },
    /// Serve a snapshot read-only on another mountpoint, from the running daemon.
    MountSnapshot {
        container: String,
        name: String,
        mountpoint: PathBuf,
        options: Vec<String>,
    },
    SnapshotPrune {
        container: String,
        policy: crate::retention::KeepPolicy,
        dry_run: bool,
    },
    /// Make CONTAINER[/PATH] an exact copy of the directory SOURCE (see `crate::ingest`);
    /// progress lines precede the reply. SOURCE is read with the daemon's privileges, so
    /// only root or the daemon's own user may ask.
    Ingest {
        source: PathBuf,
        target: String,
        jobs: usize,
        /// Directories left out (the store's own directory and mountpoint).
        #[serde(default)]
        skip: Vec<PathBuf>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn container_error(name: &str, e: FsError) -> String {
    match e {
        FsError::NotFound => format!("container {name:?} does not exist"),
        FsError::Exists => format!("container {name:?} already exists"),
        FsError::NotEmpty => format!(
            "container {name:?} is not empty; use --force to delete it and everything in it"
        ),
        FsError::Busy => format!("container {name:?} has open files"),
        FsError::Invalid => format!(
            "invalid container name {name:?}: it must not be empty, '.', '..' or contain '/'"
        ),
        FsError::NameTooLong => format!(
            "container name is longer than {} bytes",
            crate::format::NAME_MAX
        ),
        other => format!("container {name:?}: {other}"),
    }
}

/// What `dedupfs stats` shows: the store's figures and, from a running mount, its rates.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsReply {
    #[serde(flatten)]
    pub store: crate::stats::StoreStats,
    pub mount: Option<MountRates>,
}

/// Data moved through a running mount since it started.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountRates {
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub seconds: f64,
    pub write_bytes_per_second: f64,
    pub read_bytes_per_second: f64,
    /// Chunk reads that failed verification (EIO); each also has a line in the log.
    #[serde(default)]
    pub corrupt_reads: u64,
}

impl MountRates {
    fn of(ns: &Namespace) -> MountRates {
        let (written, read, started_ns) = ns.io_counters();
        let seconds = ((crate::store::now_ns() - started_ns) as f64 / 1e9).max(1e-3);
        MountRates {
            bytes_written: written,
            bytes_read: read,
            seconds,
            write_bytes_per_second: written as f64 / seconds,
            read_bytes_per_second: read as f64 / seconds,
            corrupt_reads: ns
                .chunks
                .corrupt_reads
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl StatsReply {
    pub fn render_text(&self) -> String {
        let mut out = self.store.render_text();
        if let Some(m) = &self.mount {
            let human = crate::stats::human_bytes;
            out.push_str(&format!(
                "\nmount, over {:.0} s: written {} ({}/s average), read {} ({}/s average)\n",
                m.seconds,
                human(m.bytes_written),
                human(m.write_bytes_per_second as u64),
                human(m.bytes_read),
                human(m.read_bytes_per_second as u64)
            ));
            if m.corrupt_reads > 0 {
                out.push_str(&format!(
                    "corrupt chunk reads: {} (answered EIO; see dedupfs.log, run fsck)\n",
                    m.corrupt_reads
                ));
            }
        }
        out
    }
}

fn snapshot_error(container: &str, name: &str, e: FsError) -> String {
    match e {
        FsError::NotFound => format!("snapshot {container}@{name} does not exist"),
        FsError::Exists => format!("snapshot {container}@{name} already exists"),
        FsError::Busy => format!(
            "snapshot {container}@{name} is in use (mounted, or files open in it); unmount it or close them first"
        ),
        FsError::Invalid | FsError::NameTooLong => format!(
            "invalid snapshot name {name:?}: it must be a file name (not '.', '..', no '/', '@' or ':', at most {} bytes)",
            crate::format::NAME_MAX
        ),
        other => format!("snapshot {container}@{name}: {other}"),
    }
}

fn snapshot_op_error(ns: &Namespace, container: &str, name: &str, e: FsError) -> String {
    if e == FsError::NotFound && ns.container_by_name(container).is_none() {
        return format!("container {container:?} does not exist");
    }
    snapshot_error(container, name, e)
}

fn snapshot_infos(ns: &Namespace, container: &str) -> Result<Vec<Value>, String> {
    let list = ns
        .list_snapshots(container)
        .map_err(|e| snapshot_op_error(ns, container, "", e))?;
    Ok(list
        .into_iter()
        .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
        .collect())
}

fn prune(
    ns: &Namespace,
    container: &str,
    policy: &crate::retention::KeepPolicy,
    dry_run: bool,
) -> Result<Value, String> {
    let c = ns
        .container_by_name(container)
        .ok_or_else(|| format!("container {container:?} does not exist"))?;
    let candidates: Vec<crate::retention::Candidate> = ns
        .snapshots_of(c.id)
        .into_iter()
        .map(|s| crate::retention::Candidate {
            name: s.name,
            created_ns: s.created_ns,
        })
        .collect();
    let plan = crate::retention::plan_prune(&candidates, policy).map_err(|e| e.to_string())?;
    let mut decisions = Vec::new();
    let mut reclaimed = 0u64;
    for d in &plan.decisions {
        let mut entry = json!({ "name": d.name, "created_ns": d.created_ns, "keep": d.keep,
                                "reasons": d.reasons });
        if !d.keep && !dry_run {
            let deleted = ns
                .delete_snapshot(container, &d.name)
                .map_err(|e| snapshot_op_error(ns, container, &d.name, e))?;
            reclaimed += deleted.reclaimed_bytes;
            entry["reclaimed_bytes"] = json!(deleted.reclaimed_bytes);
        }
        decisions.push(entry);
    }
    Ok(
        json!({ "container": container, "dry_run": dry_run, "decisions": decisions,
               "reclaimed_bytes": reclaimed }),
    )
}

/// What a running daemon does for [`Op::MountSnapshot`]: (container, snapshot,
/// mountpoint, options) to a reply.
pub type SnapshotMounter =
    Arc<dyn Fn(&str, &str, &Path, &[String]) -> Result<Value, String> + Send + Sync>;

/// Runs one operation against an open namespace; `served_by_mount` when a running mount
/// answers (its throughput figures then mean something).
pub fn execute(ns: &Namespace, op: &Op, served_by_mount: bool) -> Result<Value, String> {
    match op {
        Op::Scrub => ns
            .scrub(&mut |_| {})
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
            .map_err(|e| format!("scrub: {e}")),
        Op::MountSnapshot { .. } => {
            Err("only a running mount serves snapshot mounts; none holds this store".into())
        }
        Op::Ingest {
            source,
            target,
            jobs,
            skip,
        } => run_ingest(ns, source, target, *jobs, skip, &mut |_| true),
        Op::SnapshotCreate { container, name } => ns
            .create_snapshot(container, name.as_deref())
            .map(|s| {
                json!({ "container": container, "name": s.name, "id": s.id.0,
                              "created_ns": s.created_ns })
            })
            .map_err(|e| snapshot_op_error(ns, container, name.as_deref().unwrap_or(""), e)),
        Op::SnapshotRollback {
            container,
            name,
            force,
            destroy_newer,
        } => match ns.rollback(container, name, *force, *destroy_newer) {
            Ok(r) => Ok(json!({ "container": container, "name": name, "removed": r.removed,
                                "restored": r.restored, "snapshots_deleted": r.snapshots_deleted })),
            Err(FsError::NotEmpty) => Err(format!(
                "{container}@{name} is not the newest snapshot; --destroy-newer deletes the newer ones first"
            )),
            Err(FsError::Busy) => Err(format!(
                "container {container:?} has open files (or a newer snapshot is in use); --force drops their pending writes"
            )),
            Err(e) => Err(snapshot_op_error(ns, container, name, e)),
        },
        Op::ContainerSet { name, schedule } => ns
            .set_schedule(name, schedule.clone())
            .map(|()| json!({ "name": name, "schedule": schedule }))
            .map_err(|e| container_error(name, e)),
        Op::ContainerClone {
            source,
            snapshot,
            name,
        } => match ns.clone_container(source, snapshot, name) {
            Ok(c) => Ok(json!({ "name": c.name, "id": c.id.0, "files": c.files,
                                "logical_bytes": c.logical_bytes })),
            Err(FsError::Exists) => Err(format!("container {name:?} already exists")),
            Err(e @ (FsError::Invalid | FsError::NameTooLong)) => Err(container_error(name, e)),
            Err(e) => Err(snapshot_op_error(ns, source, snapshot, e)),
        },
        Op::SnapshotList { container } => {
            let names: Vec<String> = match container {
                Some(c) => vec![c.clone()],
                None => ns.containers().into_iter().map(|c| c.name).collect(),
            };
            let mut all = Vec::new();
            for c in names {
                all.extend(snapshot_infos(ns, &c)?);
            }
            Ok(Value::Array(all))
        }
        Op::SnapshotDelete { container, name } => ns
            .delete_snapshot(container, name)
            .map(|d| {
                json!({ "container": container, "name": name,
                              "versions": d.versions, "reclaimed_bytes": d.reclaimed_bytes })
            })
            .map_err(|e| snapshot_op_error(ns, container, name, e)),
        Op::SnapshotPrune {
            container,
            policy,
            dry_run,
        } => prune(ns, container, policy, *dry_run),
        Op::Ping => Ok(json!({ "pid": std::process::id() })),
        Op::ContainerCreate { name } => ns
            .create_container(name, Caller::ROOT, 0o755)
            .map(|r| json!({ "name": r.name, "id": r.id.0 }))
            .map_err(|e| container_error(name, e)),
        Op::ContainerList => {
            let list: Vec<Value> = ns
                .containers()
                .into_iter()
                .map(|c| {
                    json!({ "name": c.name, "id": c.id.0, "created_ns": c.created_ns,
                            "logical_bytes": c.logical_bytes, "files": c.files, "dirs": c.dirs })
                })
                .collect();
            Ok(Value::Array(list))
        }
        Op::ContainerInfo { name } => ns
            .commit_closed_files()
            .and_then(|()| ns.container_info(name))
            .map(|i| serde_json::to_value(i).unwrap_or(Value::Null))
            .map_err(|e| container_error(name, e)),
        Op::ContainerDelete { name, force } => ns
            .delete_container(name, *force)
            .map(|()| json!({ "deleted": name }))
            .map_err(|e| container_error(name, e)),
        Op::Stats { container } => {
            ns.commit_closed_files().map_err(|e| e.to_string())?;
            let mut store = crate::stats::stats(&ns.kv).map_err(|e| e.to_string())?;
            if let Some(name) = container {
                store.containers.retain(|c| &c.name == name);
                if store.containers.is_empty() {
                    return Err(format!("container {name:?} does not exist"));
                }
            }
            let mount = served_by_mount.then(|| MountRates::of(ns));
            serde_json::to_value(StatsReply { store, mount }).map_err(|e| e.to_string())
        }
    }
}

/// Sends `op` to the daemon holding the store at `store`. `Ok(None)` when no daemon
/// listens (the caller then opens the store itself).
pub fn call(store: &Path, op: Op) -> Result<Option<Value>, String> {
    call_with_progress(store, op, &mut |_| {})
}

/// [`call`], passing each progress line the daemon sends before its reply to `progress`.
pub fn call_with_progress(
    store: &Path,
    op: Op,
    progress: &mut dyn FnMut(&Value),
) -> Result<Option<Value>, String> {
    let path = store.join(crate::store::CONTROL_SOCKET);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
    let request = Request {
        v: PROTOCOL_VERSION,
        op,
    };
    let mut line = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("control socket: {e}"))?;
    let mut reader = BufReader::new(&stream);
    let mut reply = String::new();
    loop {
        reply.clear();
        reader
            .read_line(&mut reply)
            .map_err(|e| format!("control socket: {e}"))?;
        match serde_json::from_str::<Value>(&reply) {
            Ok(v) if v.get("progress").is_some() => progress(&v["progress"]),
            _ => break,
        }
    }
    let reply: Reply =
        serde_json::from_str(&reply).map_err(|e| format!("control socket: bad reply: {e}"))?;
    if reply.ok {
        Ok(Some(reply.data.unwrap_or(Value::Null)))
    } else {
        Err(reply.error.unwrap_or_else(|| "unknown error".into()))
    }
}

/// Runs an ingest (see [`Op::Ingest`]); the reply is the [`crate::ingest::IngestReport`].
pub fn run_ingest(
    ns: &Namespace,
    source: &Path,
    target: &str,
    jobs: usize,
    skip: &[PathBuf],
    progress: &mut dyn FnMut(&crate::ingest::IngestStats) -> bool,
) -> Result<Value, String> {
    let target = crate::ingest::resolve_target(ns, target).map_err(|e| e.to_string())?;
    let report = crate::ingest::ingest(ns, source, target, jobs, skip, progress)
        .map_err(|e| format!("ingest stopped: {e}"))?;
    serde_json::to_value(report).map_err(|e| e.to_string())
}

/// Answers one request line.
pub fn handle_line(
    ns: &Namespace,
    line: &str,
    mounter: Option<&SnapshotMounter>,
    peer_has_daemon_privileges: bool,
    progress: &mut dyn FnMut(&Value) -> bool,
) -> Reply {
    let fail = |error: String| Reply {
        ok: false,
        data: None,
        error: Some(error),
    };
    let request: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return fail(format!("malformed request: {e}")),
    };
    if request.v != PROTOCOL_VERSION {
        return fail(format!(
            "unsupported protocol version {} (this daemon speaks {PROTOCOL_VERSION})",
            request.v
        ));
    }
    let result = match (&request.op, mounter) {
        (
            Op::MountSnapshot {
                container,
                name,
                mountpoint,
                options,
            },
            Some(mount),
        ) => mount(container, name, mountpoint, options),
        (Op::Ingest { .. }, _) if !peer_has_daemon_privileges => Err(
            "ingest reads SOURCE with the mount's privileges: run it as root or as the user the mount runs as"
                .into(),
        ),
        (
            Op::Ingest {
                source,
                target,
                jobs,
                skip,
            },
            _,
        ) => run_ingest(ns, source, target, *jobs, skip, &mut |p| {
            progress(&serde_json::to_value(p).unwrap_or(Value::Null))
        }),
        (Op::Scrub, _) => ns
            .scrub(&mut |p| {
                progress(&serde_json::to_value(p).unwrap_or(Value::Null));
            })
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
            .map_err(|e| format!("scrub: {e}")),
        (op, _) => execute(ns, op, true),
    };
    match result {
        Ok(data) => Reply {
            ok: true,
            data: Some(data),
            error: None,
        },
        Err(e) => fail(e),
    }
}

/// Listens on the store's control socket until the process ends.
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    pub fn start(
        ns: Arc<Namespace>,
        store: &Path,
        mounter: Option<SnapshotMounter>,
    ) -> std::io::Result<ControlServer> {
        let path = store.join(crate::store::CONTROL_SOCKET);
        // We hold the store lock, so a socket file left here is stale.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let owner = std::fs::metadata(store)?.uid();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let ns = ns.clone();
                    let mounter = mounter.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || serve(&ns, stream, owner, mounter.as_ref()));
                }
            })?;
        Ok(ControlServer { path })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn peer_uid(stream: &UnixStream) -> Option<u32> {
    use std::os::unix::io::AsRawFd;
    let mut cred: libc::ucred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

fn serve(ns: &Namespace, stream: UnixStream, owner: u32, mounter: Option<&SnapshotMounter>) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let respond = |writer: &mut UnixStream, reply: &Reply| {
        let mut out = serde_json::to_vec(reply).unwrap_or_default();
        out.push(b'\n');
        writer.write_all(&out)
    };
    let peer = peer_uid(&stream);
    // SAFETY: geteuid has no preconditions.
    let daemon_uid = unsafe { libc::geteuid() };
    let peer_has_daemon_privileges = peer.is_some_and(|uid| uid == 0 || uid == daemon_uid);
    match peer {
        Some(uid) if uid == 0 || uid == owner => {}
        _ => {
            let _ = respond(
                &mut writer,
                &Reply {
                    ok: false,
                    data: None,
                    error: Some("permission denied: only root or the store owner may use the control socket".into()),
                },
            );
            return;
        }
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST {
            let _ = respond(
                &mut writer,
                &Reply {
                    ok: false,
                    data: None,
                    error: Some(format!("request longer than {MAX_REQUEST} bytes")),
                },
            );
            return;
        }
        let mut progress = |p: &Value| {
            let mut out = serde_json::to_vec(&json!({ "progress": p })).unwrap_or_default();
            out.push(b'\n');
            // A client that is gone stops a long operation that asks.
            writer.write_all(&out).is_ok()
        };
        let reply = handle_line(
            ns,
            String::from_utf8_lossy(&line).trim_end(),
            mounter,
            peer_has_daemon_privileges,
            &mut progress,
        );
        if respond(&mut writer, &reply).is_err() {
            return;
        }
    }
}
