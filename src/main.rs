//! The `dedupfs` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

use dedupfs::chunking::{parse_size, ChunkerParams, Compression};
use dedupfs::control::{self, Op};
use dedupfs::daemon::{self, MountConfig};
use dedupfs::namespace::{Namespace, DEFAULT_CACHE_BYTES};
use dedupfs::store::{Store, LOG_FILE};

#[derive(Parser)]
#[command(
    name = "dedupfs",
    version,
    about = "A deduplicating filesystem for backup and secondary storage",
    long_about = "A deduplicating filesystem for backup and secondary storage.\n\n\
        Everything written through the mount is cut into content-defined chunks, each stored \
        once (BLAKE3-addressed, zstd-compressed) in a store directory. The top-level \
        directories of the mount are containers.\n\n\
        Quick start:\n  dedupfs init /srv/dedup\n  mkdir -p /mnt/dedup && dedupfs mount /srv/dedup /mnt/dedup\n  \
        dedupfs container create backups --store /srv/dedup\n  cp -a /etc /mnt/dedup/backups/\n  \
        dedupfs stats --store /srv/dedup\n  dedupfs umount /mnt/dedup"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct StoreArg {
    /// Store directory [env: DEDUPFS_STORE; default: ~/.local/share/dedupfs/store]
    #[arg(long, short = 's')]
    store: Option<PathBuf>,
}

impl StoreArg {
    fn path(&self) -> PathBuf {
        self.store
            .clone()
            .or_else(|| std::env::var_os("DEDUPFS_STORE").map(PathBuf::from))
            .unwrap_or_else(default_store)
    }
}

fn default_store() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".local/share/dedupfs/store")
}

#[derive(Subcommand)]
enum Command {
    /// Create a new store in STORE (a missing or empty directory)
    Init {
        store: PathBuf,
        /// Average chunk size: a power of two from 1K to 4M
        #[arg(long, default_value = "64K")]
        chunk_avg: String,
        /// Chunk compression: none, zstd (level 3) or zstd:LEVEL (1-19). Level 1 keeps
        /// ingest fast; higher levels trade CPU for a few percent of space
        #[arg(long, default_value = "zstd:1")]
        compression: String,
    },
    /// Mount STORE on MOUNTPOINT (in the background unless --foreground)
    Mount {
        store: PathBuf,
        mountpoint: PathBuf,
        /// Mount options, comma separated: allow_other, allow_root, ro, noatime, ...
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Stay attached to the terminal; unmount with Ctrl-C or `dedupfs umount`
        #[arg(long, short = 'f')]
        foreground: bool,
        /// Memory budget of the mount (e.g. 256M, 1G; at least 64M): the database's
        /// write buffers and block cache, the cache of decompressed chunks and the writes
        /// not committed yet all take a share of it
        #[arg(long, default_value = "256M")]
        memory: String,
        /// Mount one snapshot, read-only, as CONTAINER@SNAPSHOT (for file-level restore).
        /// Works also while the store is mounted: the running mount then serves it
        #[arg(long, value_name = "CONTAINER@SNAPSHOT")]
        snapshot: Option<String>,
        /// Internal: pipe on which a background child reports readiness
        #[arg(long, hide = true)]
        ready_fd: Option<i32>,
    },
    /// Flush and unmount a dedupfs mount
    Umount { mountpoint: PathBuf },
    /// Manage containers, the top-level directories of the mount
    Container {
        #[command(subcommand)]
        command: ContainerCommand,
    },
    /// Take, list, delete, prune and roll back to snapshots of a container
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Copy a file or a tree out of a snapshot, with its metadata
    ///
    /// Modes, owners, times, xattrs, symlinks, hard links and holes come back; every chunk
    /// is verified. Run it again to finish an interrupted restore.
    Restore {
        /// What to restore: CONTAINER@SNAPSHOT, or CONTAINER@SNAPSHOT:PATH for one file or
        /// directory inside it
        source: String,
        /// Where to put it: the directory (or file) to create or merge into
        dest: PathBuf,
        /// Replace files in DEST that differ from the snapshot
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Copy a directory tree into a container, without the mount's per-file round trips
    ///
    /// Makes CONTAINER (or CONTAINER/PATH) an exact copy of the contents of SOURCE, as
    /// `rsync -a --delete SOURCE/ MOUNT/CONTAINER/PATH/` would: new and changed files are
    /// written (changed: size or mtime differ; a changed file is replaced in one step), what
    /// SOURCE no longer has is deleted, and modes, owners, times, xattrs, symlinks and
    /// special files are copied. Hard links become separate files (their chunks are stored
    /// once anyway). Several files are chunked at once.
    ///
    /// While the store is mounted, the mount's daemon does the work (as root or the user the
    /// mount runs as) and the mount shows the result; otherwise the store is opened directly.
    /// Entries that cannot be read are reported and skipped; the exit status is then 1 and
    /// no snapshot is taken. The store's own directory and mountpoint, if SOURCE holds them,
    /// are left out.
    Ingest {
        /// The directory whose contents are copied
        source: PathBuf,
        /// CONTAINER, or CONTAINER/PATH (missing directories of PATH are created)
        target: String,
        /// Take this snapshot of the container once the copy is complete
        #[arg(long, value_name = "NAME")]
        snapshot: Option<String>,
        /// Files copied at once
        #[arg(long, default_value_t = dedupfs::ingest::DEFAULT_JOBS)]
        jobs: usize,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Show space savings and throughput, for the store or one container
    Stats {
        container: Option<String>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Verify every stored chunk and quarantine damaged ones
    ///
    /// Works mounted or not. Names the files and offsets that use a damaged chunk; exits
    /// non-zero when any is damaged.
    Scrub {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Check every record, refcount and chunk of a store that is not mounted
    Fsck { store: PathBuf },
}

#[derive(Subcommand)]
enum ContainerCommand {
    /// Create a container
    Create {
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List containers
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Show one container
    Info {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Set a container's snapshot schedule, which the running mount applies
    ///
    /// A snapshot named auto-<UTC time> every --snapshot-every; after each, the auto-
    /// snapshots the --keep-* policy does not keep are deleted (snapshots taken by hand are
    /// left alone).
    Set {
        name: String,
        /// Interval between scheduled snapshots: e.g. 30s, 15m, 1h, 1d, 1w
        #[arg(long, value_name = "DURATION")]
        snapshot_every: Option<String>,
        /// Remove the schedule
        #[arg(long, conflicts_with = "snapshot_every")]
        no_schedule: bool,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        #[arg(long, default_value_t = 0)]
        keep_yearly: u32,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Make a new writable container from a snapshot (SOURCE is CONTAINER@SNAPSHOT)
    ///
    /// The clone shares all data with the snapshot; only metadata is copied.
    Clone {
        source: String,
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Delete a container (--force if it is not empty)
    Delete {
        name: String,
        /// Delete the container and everything in it
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        store: StoreArg,
    },
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("dedupfs: internal error: {info}");
    }));
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedupfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // fuser warns "Failed to umount filesystem" at every clean unmount, after the kernel
        // has already let go of the mount; its errors still show.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser::session=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot of CONTAINER, instantly; NAME defaults to the UTC time
    Create {
        container: String,
        name: Option<String>,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List snapshots with their size and the space only each one holds
    List {
        container: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Delete a snapshot and give back the space only it held
    Delete {
        container: String,
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Undo every change made to CONTAINER since snapshot NAME
    ///
    /// NAME must be the newest snapshot unless --destroy-newer; the space of what was
    /// written since comes back.
    Rollback {
        container: String,
        name: String,
        /// Also when files of the container are open: their pending writes are dropped and
        /// open handles see the rolled-back files
        #[arg(long)]
        force: bool,
        /// Delete the snapshots newer than NAME first
        #[arg(long)]
        destroy_newer: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Delete the snapshots a retention policy does not keep
    ///
    /// Same meaning as restic's and borg's flags, in UTC: each --keep-X N keeps the newest
    /// snapshot of each of the N latest periods that have one.
    Prune {
        container: String,
        /// Keep the N newest snapshots
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        /// Keep the newest snapshot of each of the last N hours that have one
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        /// ... of each of the last N days
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        /// ... of each of the last N ISO weeks
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        /// ... of each of the last N months
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        /// ... of each of the last N years
        #[arg(long, default_value_t = 0)]
        keep_yearly: u32,
        /// Show what would be kept and removed, remove nothing
        #[arg(long, short = 'n')]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
}

fn ingest(
    store: &Path,
    source: &Path,
    target: &str,
    snapshot: Option<String>,
    jobs: usize,
) -> Result<()> {
    use dedupfs::ingest::{IngestReport, IngestStats, MAX_JOBS};
    use std::io::{IsTerminal, Write};
    Store::check(store)?;
    if !(1..=MAX_JOBS).contains(&jobs) {
        bail!("--jobs must be between 1 and {MAX_JOBS}");
    }
    if let Some(name) = &snapshot {
        if dedupfs::namespace::check_snapshot_name(name).is_err() {
            bail!(
                "invalid snapshot name {name:?}: it must be a file name (not '.', '..', no '/', '@' or ':')"
            );
        }
    }
    let source = std::fs::canonicalize(source).map_err(|e| anyhow!("{}: {e}", source.display()))?;
    if !source.is_dir() {
        bail!("{}: not a directory", source.display());
    }
    let container = target
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    // Copying the store, or its own mount, into itself would never end: refuse a source
    // inside either, leave them out of a source that holds them.
    let store_dir = std::fs::canonicalize(store)?;
    let mountpoint = dedupfs::store::mounted_at(store);
    let skip: Vec<PathBuf> = std::iter::once(store_dir).chain(mountpoint).collect();
    for inside in &skip {
        if source.starts_with(inside) {
            bail!(
                "{}: inside {}, which holds this store",
                source.display(),
                inside.display()
            );
        }
    }
    let draw = std::io::stderr().is_terminal();
    let mut show = |p: &IngestStats| {
        if draw {
            let secs = (p.elapsed_ms as f64 / 1000.0).max(0.001);
            eprint!(
                "\ringest: {} files ({} written, {} unchanged), {} ({}/s), {} removed   ",
                p.files,
                p.written,
                p.unchanged,
                human(p.bytes),
                human((p.bytes as f64 / secs) as u64),
                p.removed
            );
            let _ = std::io::stderr().flush();
        }
        true
    };
    let op = Op::Ingest {
        source: source.clone(),
        target: target.to_string(),
        jobs,
        skip: skip.clone(),
    };
    let value = match control::call_with_progress(store, op, &mut |v| {
        if let Ok(p) = serde_json::from_value(v.clone()) {
            show(&p);
        }
    })
    .map_err(|e| anyhow!(e))?
    {
        Some(v) => v,
        None => {
            // The same memory budget as a mount's default.
            let budget = dedupfs::memory::MemoryBudget::default();
            budget.tune_malloc();
            let opened = Store::open_with(store, &budget)?;
            let ns = Namespace::new(opened, budget.chunk_cache())
                .map_err(|e| anyhow!("{}: {e}", store.display()))?;
            ns.set_pending_budget(budget.pending_writes() as usize);
            let result = control::run_ingest(&ns, &source, target, jobs, &skip, &mut show);
            ns.shutdown()
                .map_err(|e| anyhow!("{}: closing: {e}", store.display()))?;
            result.map_err(|e| anyhow!(e))?
        }
    };
    if draw {
        eprintln!();
    }
    let report: IngestReport = serde_json::from_value(value)?;
    let s = &report.stats;
    let secs = (s.elapsed_ms as f64 / 1000.0).max(0.001);
    println!(
        "ingested {} into {target}: {} files ({} written, {} unchanged), {} directories, {} symlinks, {} special, {} removed; {} in {:.1} s ({}/s)",
        source.display(),
        s.files,
        s.written,
        s.unchanged,
        s.dirs,
        s.symlinks,
        s.specials,
        s.removed,
        human(s.bytes),
        secs,
        human((s.bytes as f64 / secs) as u64),
    );
    if s.errors > 0 {
        for e in &report.errors {
            eprintln!("dedupfs: ingest: {e}");
        }
        if s.errors > report.errors.len() as u64 {
            eprintln!(
                "dedupfs: ingest: ... and {} more (see the mount's log)",
                s.errors - report.errors.len() as u64
            );
        }
        bail!(
            "{} source entries could not be copied{}",
            s.errors,
            if snapshot.is_some() {
                "; no snapshot taken"
            } else {
                ""
            }
        );
    }
    if let Some(name) = snapshot {
        let v = request(
            store,
            Op::SnapshotCreate {
                container,
                name: Some(name),
            },
        )?;
        println!(
            "created snapshot {}@{}",
            v["container"].as_str().unwrap_or("?"),
            v["name"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn scrub(store: &Path, json: bool) -> Result<()> {
    use std::io::{IsTerminal, Write};
    Store::check(store)?;
    let draw = std::io::stderr().is_terminal() && !json;
    let mut show = |p: &dedupfs::namespace::ScrubProgress| {
        if !draw {
            return;
        }
        let secs = (p.elapsed_ms as f64 / 1000.0).max(0.001);
        let rate = p.bytes as f64 / secs;
        let eta = if rate > 0.0 {
            (p.total_bytes.saturating_sub(p.bytes)) as f64 / rate
        } else {
            0.0
        };
        eprint!(
            "\rscrub: {}/{} chunks, {} of {} ({}/s), ETA {:.0} s, {} damaged   ",
            p.chunks,
            p.total_chunks,
            human(p.bytes),
            human(p.total_bytes),
            human(rate as u64),
            eta,
            p.bad
        );
        let _ = std::io::stderr().flush();
    };
    let value = match control::call_with_progress(store, Op::Scrub, &mut |v| {
        if let Ok(p) = serde_json::from_value(v.clone()) {
            show(&p);
        }
    })
    .map_err(|e| anyhow!(e))?
    {
        Some(v) => v,
        None => {
            let opened = Store::open(store)?;
            let ns = Namespace::new(opened, DEFAULT_CACHE_BYTES)
                .map_err(|e| anyhow!("{}: {e}", store.display()))?;
            let report = ns.scrub(&mut show);
            ns.shutdown()
                .map_err(|e| anyhow!("{}: closing: {e}", store.display()))?;
            let report = report.map_err(|e| anyhow!("{}: scrub: {e}", store.display()))?;
            serde_json::to_value(report)?
        }
    };
    if draw {
        eprintln!();
    }
    let report: dedupfs::namespace::ScrubReport = serde_json::from_value(value)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for b in &report.bad {
            println!("chunk {}: {}", b.chunk, b.problem);
            for r in &b.references {
                println!("  used by {r}");
            }
        }
        println!(
            "scrubbed {} chunks ({}) in {:.1} s: {} damaged{}",
            report.chunks,
            human(report.bytes),
            report.elapsed_ms as f64 / 1000.0,
            report.bad.len(),
            if report.bad.is_empty() {
                ""
            } else {
                " (quarantined: reads of them fail with EIO; writing the same data again repairs them)"
            }
        );
    }
    if !report.bad.is_empty() {
        bail!("{}: {} damaged chunk(s)", store.display(), report.bad.len());
    }
    Ok(())
}

/// Splits `CONTAINER@SNAPSHOT[:PATH]`.
fn parse_snapshot_path(spec: &str) -> Result<(String, String, PathBuf)> {
    let (container, rest) = spec.split_once('@').ok_or_else(|| {
        anyhow!("{spec:?}: expected CONTAINER@SNAPSHOT or CONTAINER@SNAPSHOT:PATH")
    })?;
    let (name, path) = rest.split_once(':').unwrap_or((rest, ""));
    if container.is_empty() || name.is_empty() {
        bail!("{spec:?}: expected CONTAINER@SNAPSHOT or CONTAINER@SNAPSHOT:PATH");
    }
    let path = PathBuf::from(path.trim_start_matches('/'));
    Ok((container.to_string(), name.to_string(), path))
}

fn restore(store: &Path, spec: &str, dest: &Path, overwrite: bool) -> Result<()> {
    use dedupfs::restore::{self as r, DirSource, RestoreOptions};
    use std::io::IsTerminal;
    let (container, name, path) = parse_snapshot_path(spec)?;
    Store::check(store)?;
    let list = request(
        store,
        Op::SnapshotList {
            container: Some(container.clone()),
        },
    )?;
    let Some(snap) = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"].as_str() == Some(name.as_str()))
        .cloned()
    else {
        bail!("snapshot {container}@{name} does not exist");
    };
    let opts = RestoreOptions {
        overwrite,
        progress: std::io::stderr().is_terminal(),
        total_bytes: path
            .as_os_str()
            .is_empty()
            .then(|| snap["logical_bytes"].as_u64())
            .flatten(),
    };
    let started = std::time::Instant::now();
    let stats = match dedupfs::store::mounted_at(store) {
        // A running mount holds the store: read the snapshot through it.
        Some(mountpoint) => {
            let root = mountpoint
                .join(&container)
                .join(
                    std::str::from_utf8(dedupfs::namespace::SNAPSHOTS_DIR).unwrap_or(".snapshots"),
                )
                .join(&name);
            r::restore(&DirSource::new(root), &path, dest, &opts)?
        }
        None => {
            let opened = Store::open(store)?;
            let ns = Namespace::new(opened, DEFAULT_CACHE_BYTES)
                .map_err(|e| anyhow!("{}: {e}", store.display()))?;
            let source = dedupfs::namespace::SnapshotSource::new(ns.clone(), &container, &name)
                .map_err(|e| anyhow!("snapshot {container}@{name}: {e}"))?;
            let result = r::restore(&source, &path, dest, &opts);
            drop(source);
            ns.shutdown()
                .map_err(|e| anyhow!("{}: closing: {e}", store.display()))?;
            result?
        }
    };
    println!("{}", r::summary(&stats, started.elapsed()));
    Ok(())
}

fn snapshot(command: SnapshotCommand) -> Result<()> {
    match command {
        SnapshotCommand::Create {
            container,
            name,
            store,
        } => {
            let v = request(&store.path(), Op::SnapshotCreate { container, name })?;
            println!(
                "created snapshot {}@{}",
                v["container"].as_str().unwrap_or("?"),
                v["name"].as_str().unwrap_or("?")
            );
        }
        SnapshotCommand::List {
            container,
            json,
            store,
        } => {
            let value = request(&store.path(), Op::SnapshotList { container })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(());
            }
            println!(
                "{:<40} {:<20} {:>12} {:>10} {:>12}",
                "SNAPSHOT", "CREATED (UTC)", "LOGICAL", "FILES", "ONLY HERE"
            );
            for s in value.as_array().into_iter().flatten() {
                println!(
                    "{:<40} {:<20} {:>12} {:>10} {:>12}",
                    format!(
                        "{}@{}",
                        s["container"].as_str().unwrap_or("?"),
                        s["name"].as_str().unwrap_or("?")
                    ),
                    dedupfs::retention::format_utc(s["created_ns"].as_i64().unwrap_or(0)),
                    human(s["logical_bytes"].as_u64().unwrap_or(0)),
                    s["files"].as_u64().unwrap_or(0),
                    human(s["reclaimable_bytes"].as_u64().unwrap_or(0)),
                );
            }
        }
        SnapshotCommand::Rollback {
            container,
            name,
            force,
            destroy_newer,
            store,
        } => {
            let v = request(
                &store.path(),
                Op::SnapshotRollback {
                    container: container.clone(),
                    name: name.clone(),
                    force,
                    destroy_newer,
                },
            )?;
            println!(
                "rolled {container} back to {container}@{name}: {} changes undone, {} newer snapshot(s) deleted",
                v["removed"].as_u64().unwrap_or(0) + v["restored"].as_u64().unwrap_or(0),
                v["snapshots_deleted"].as_u64().unwrap_or(0)
            );
        }
        SnapshotCommand::Delete {
            container,
            name,
            store,
        } => {
            let v = request(
                &store.path(),
                Op::SnapshotDelete {
                    container: container.clone(),
                    name: name.clone(),
                },
            )?;
            println!(
                "deleted snapshot {container}@{name}: {} reclaimed",
                human(v["reclaimed_bytes"].as_u64().unwrap_or(0))
            );
        }
        SnapshotCommand::Prune {
            container,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            dry_run,
            json,
            store,
        } => {
            let policy = dedupfs::retention::KeepPolicy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
            };
            if policy.is_empty() {
                bail!("no --keep-* option given: prune would remove every snapshot; refusing");
            }
            let v = request(
                &store.path(),
                Op::SnapshotPrune {
                    container: container.clone(),
                    policy,
                    dry_run,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let mut removed = 0;
            for d in v["decisions"].as_array().into_iter().flatten() {
                let name = d["name"].as_str().unwrap_or("?");
                let keep = d["keep"].as_bool().unwrap_or(true);
                if keep {
                    let reasons: Vec<&str> = d["reasons"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r.as_str())
                        .collect();
                    println!("keep   {container}@{name}  ({})", reasons.join(", "));
                } else {
                    removed += 1;
                    println!(
                        "{} {container}@{name}",
                        if dry_run { "would remove" } else { "remove" }
                    );
                }
            }
            if dry_run {
                println!("dry run: {removed} snapshot(s) would be removed");
            } else {
                println!(
                    "removed {removed} snapshot(s), {} reclaimed",
                    human(v["reclaimed_bytes"].as_u64().unwrap_or(0))
                );
            }
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            store,
            chunk_avg,
            compression,
        } => {
            let avg = parse_size(&chunk_avg)?;
            let chunker = ChunkerParams::with_average(avg)?;
            let compression = Compression::parse(&compression)?;
            let config = Store::init(&store, chunker, compression)?;
            println!(
                "created store {} (id {}, chunks {} avg, {})",
                store.display(),
                config.store_id,
                human(config.chunker.avg as u64),
                config.compression
            );
            Ok(())
        }
        Command::Mount {
            store,
            mountpoint,
            options,
            foreground,
            memory,
            snapshot,
            ready_fd,
        } => {
            let memory =
                dedupfs::memory::MemoryBudget::new(parse_size(&memory)?).ok_or_else(|| {
                    anyhow!(
                        "--memory {memory}: the budget must be at least {} MiB",
                        dedupfs::memory::MemoryBudget::MIN_BYTES >> 20
                    )
                })?;
            let store = std::fs::canonicalize(&store)
                .map_err(|e| anyhow!("store {}: {e}", store.display()))?;
            if let (Some(spec), None) = (&snapshot, ready_fd) {
                let (container, name) = daemon::parse_snapshot_spec(spec)?;
                Store::check(&store)?;
                if dedupfs::store::is_locked(&store) {
                    // The store's daemon serves the snapshot beside its main mount.
                    let mountpoint = daemon::check_mountpoint(&mountpoint)?;
                    let op = Op::MountSnapshot {
                        container,
                        name,
                        mountpoint,
                        options,
                    };
                    match control::call(&store, op).map_err(|e| anyhow!(e))? {
                        Some(_) => return Ok(()),
                        None => bail!(
                            "{} is in use but its daemon does not answer on its control socket",
                            store.display()
                        ),
                    }
                }
            }
            let cfg = MountConfig {
                store: store.clone(),
                mountpoint,
                options,
                memory,
                snapshot,
            };
            if foreground {
                init_logging();
                daemon::serve(cfg, ready_fd)
            } else {
                Store::check(&store)?;
                let log = store.join(LOG_FILE);
                daemon::spawn_background(&cfg, &log)?;
                Ok(())
            }
        }
        Command::Umount { mountpoint } => daemon::unmount(&mountpoint),
        Command::Container { command } => container(command),
        Command::Snapshot { command } => snapshot(command),
        Command::Restore {
            source,
            dest,
            overwrite,
            store,
        } => restore(&store.path(), &source, &dest, overwrite),
        Command::Stats {
            container,
            json,
            store,
        } => {
            let value = request(&store.path(), Op::Stats { container })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let stats: control::StatsReply = serde_json::from_value(value)?;
                print!("{}", stats.render_text());
            }
            Ok(())
        }
        Command::Scrub { json, store } => scrub(&store.path(), json),
        Command::Ingest {
            source,
            target,
            snapshot,
            jobs,
            store,
        } => ingest(&store.path(), &source, &target, snapshot, jobs),
        Command::Fsck { store } => {
            let store = Store::open(&store)?;
            let report = dedupfs::fsck::fsck(&store.kv, &store.config)?;
            println!("{report}");
            if !report.is_clean() {
                bail!(
                    "{}: {} problem(s) found",
                    store.path.display(),
                    report.problems()
                );
            }
            Ok(())
        }
    }
}

/// Runs `op` through the daemon that holds the store, or on the store directly.
fn request(store: &Path, op: Op) -> Result<Value> {
    if let Some(value) = control::call(store, op.clone()).map_err(|e| anyhow!(e))? {
        return Ok(value);
    }
    let opened = Store::open(store)?;
    let ns = Namespace::new(opened, DEFAULT_CACHE_BYTES)
        .map_err(|e| anyhow!("{}: {e}", store.display()))?;
    let result = control::execute(&ns, &op, false).map_err(|e| anyhow!(e));
    ns.shutdown()
        .map_err(|e| anyhow!("{}: flushing: {e}", store.display()))?;
    result
}

fn container(command: ContainerCommand) -> Result<()> {
    match command {
        ContainerCommand::Create { name, store } => {
            request(&store.path(), Op::ContainerCreate { name: name.clone() })?;
            println!("created container {name}");
        }
        ContainerCommand::List { json, store } => {
            let value = request(&store.path(), Op::ContainerList)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!(
                    "{:<32} {:>12} {:>10} {:>8}",
                    "NAME", "LOGICAL", "FILES", "DIRS"
                );
                for c in value.as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:>12} {:>10} {:>8}",
                        c["name"].as_str().unwrap_or("?"),
                        human(c["logical_bytes"].as_u64().unwrap_or(0)),
                        c["files"].as_u64().unwrap_or(0),
                        c["dirs"].as_u64().unwrap_or(0)
                    );
                }
            }
        }
        ContainerCommand::Info { name, json, store } => {
            let value = request(&store.path(), Op::ContainerInfo { name })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("name:     {}", value["name"].as_str().unwrap_or("?"));
                println!("id:       {}", value["id"]);
                println!(
                    "logical:  {}",
                    human(value["logical_bytes"].as_u64().unwrap_or(0))
                );
                println!("files:    {}", value["files"]);
                println!("dirs:     {}", value["dirs"]);
                println!("entries:  {}", value["entries"]);
                println!("snapshots: {}", value["snapshots"]);
                if let Some(s) = value.get("schedule").filter(|s| !s.is_null()) {
                    println!(
                        "schedule: a snapshot every {} s, keeping {}",
                        s["every_secs"],
                        describe_keep(&s["keep"])
                    );
                }
            }
        }
        ContainerCommand::Set {
            name,
            snapshot_every,
            no_schedule,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            store,
        } => {
            let keep = dedupfs::retention::KeepPolicy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
            };
            let schedule = match (snapshot_every, no_schedule) {
                (_, true) => None,
                (Some(every), false) => Some(dedupfs::namespace::SnapshotSchedule {
                    every_secs: parse_duration(&every)?,
                    keep,
                }),
                (None, false) => {
                    bail!("nothing to set: give --snapshot-every DURATION or --no-schedule")
                }
            };
            request(
                &store.path(),
                Op::ContainerSet {
                    name: name.clone(),
                    schedule: schedule.clone(),
                },
            )?;
            match schedule {
                Some(s) => println!(
                    "{name}: a snapshot every {} s{}",
                    s.every_secs,
                    if s.keep.is_empty() {
                        ", none pruned".to_string()
                    } else {
                        format!(
                            ", keeping {}",
                            describe_keep(&serde_json::to_value(s.keep)?)
                        )
                    }
                ),
                None => println!("{name}: no snapshot schedule"),
            }
        }
        ContainerCommand::Clone {
            source,
            name,
            store,
        } => {
            let (container, snapshot) = daemon::parse_snapshot_spec(&source)?;
            let v = request(
                &store.path(),
                Op::ContainerClone {
                    source: container,
                    snapshot,
                    name: name.clone(),
                },
            )?;
            println!(
                "created container {name} from {source}: {} files, {}",
                v["files"].as_u64().unwrap_or(0),
                human(v["logical_bytes"].as_u64().unwrap_or(0))
            );
        }
        ContainerCommand::Delete { name, force, store } => {
            request(
                &store.path(),
                Op::ContainerDelete {
                    name: name.clone(),
                    force,
                },
            )
            .context("delete")?;
            println!("deleted container {name}");
        }
    }
    Ok(())
}

/// "last 2, daily 7" for a keep policy in JSON; "nothing pruned" when it is empty.
fn describe_keep(keep: &Value) -> String {
    let parts: Vec<String> = ["last", "hourly", "daily", "weekly", "monthly", "yearly"]
        .iter()
        .filter_map(|k| {
            let n = keep[*k].as_u64().unwrap_or(0);
            (n > 0).then(|| format!("{k} {n}"))
        })
        .collect();
    if parts.is_empty() {
        "everything".into()
    } else {
        parts.join(", ")
    }
}

/// Seconds in a duration like `90s`, `15m`, `1h`, `1d`, `1w` (a bare number is seconds).
fn parse_duration(text: &str) -> Result<u64> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| anyhow!("{text:?}: expected a duration like 30s, 15m, 1h, 1d or 1w"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => bail!("{text:?}: expected a duration like 30s, 15m, 1h, 1d or 1w"),
    };
    if n == 0 {
        bail!("{text:?}: the interval must be at least one second");
    }
    n.checked_mul(scale)
        .ok_or_else(|| anyhow!("{text:?}: too long"))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
