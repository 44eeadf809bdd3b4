#!/usr/bin/env bash
# Concurrency (faults issue, item 8): 16 fio jobs write and read overlapping files through a
# dedupfs mount for several minutes, every block checked with crc32c, then fsck.
#
#   scripts/fio-verify.sh
#
# Layout: FIO_FILES shared files (default 4) in a container of a fresh store; the 16 jobs are
# spread over them (16/FIO_FILES jobs per file), and each job owns a disjoint FIO_REGION slice of
# its file (size + offset_increment), so every file is written and read by several jobs at once
# while each job's own slice stays verifiable. Three fio runs:
#
#   1. prefill: each job writes its slice sequentially (1 MiB blocks), with crc32c headers,
#      so the final pass can check every byte.
#   2. main: time_based for FIO_RUNTIME seconds, rw=randrw with percentage_random=70 (mixed
#      random and sequential), bsrange 4k-1m, psync, buffered (direct=0), an fdatasync every
#      64 writes, verify=crc32c with verify_backlog (written blocks are read back and checked
#      during the run) and verify_fatal.
#   3. remount (what the daemon stored, not the page cache, is checked), then a final
#      read-only pass: rw=read over every slice, verify=crc32c; verify_interval=4k in all runs
#      puts a header in every 4 KiB, so the pass checks the whole of each slice whatever block
#      sizes last wrote it.
#
# Then umount and `dedupfs fsck` (must report 0 problems), and one summary line. Exits non-zero
# on any fio error (verify failures included) or fsck problem; the trap unmounts on failure.
#
# Environment: DEDUPFS_BIN (a built dedupfs; default: cargo build --release, then
# target/release/dedupfs, copied so a rebuild during the run changes nothing), FIO_RUNTIME
# (seconds of the main run, default 180), FIO_JOBS (default 16), FIO_FILES (default 4, must
# divide FIO_JOBS), FIO_REGION (each job's slice, default 16m), FIO_KEEP=1 (keep the work
# directory under /var/tmp: store, daemon log, fio output).
# Needs root, /dev/fuse and fio (apt-get install fio).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

say() { echo "fio-verify.sh: $(date +%T) $*"; }

runtime=${FIO_RUNTIME:-180}
jobs=${FIO_JOBS:-16}
nfiles=${FIO_FILES:-4}
region=${FIO_REGION:-16m}
[[ $runtime =~ ^[0-9]+$ && $jobs =~ ^[0-9]+$ && $nfiles =~ ^[0-9]+$ ]] && ((nfiles > 0)) &&
    ((jobs % nfiles == 0)) || { echo "fio-verify.sh: bad FIO_RUNTIME/FIO_JOBS/FIO_FILES" >&2; exit 2; }
per_file=$((jobs / nfiles))

[[ $(id -u) -eq 0 ]] || { say "needs root (mount, drop_caches)" >&2; exit 1; }
[[ -e /dev/fuse ]] || { say "/dev/fuse is missing" >&2; exit 1; }
command -v fio >/dev/null || { say "fio is missing (apt-get install fio)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/dedupfs-fio.XXXXXX)
store=$work/store
mnt=$work/mnt
mkdir -p "$mnt"

if [[ -z ${DEDUPFS_BIN:-} ]]; then
    cargo build --release --quiet
    DEDUPFS_BIN=$repo/target/release/dedupfs
fi
cp "$DEDUPFS_BIN" "$work/dedupfs"
dedupfs=$work/dedupfs

cleanup() {
    local rc=$?
    if grep -qF " $mnt " /proc/mounts; then
        "$dedupfs" umount "$mnt" >/dev/null 2>&1 || fusermount3 -u -z "$mnt" || umount -l "$mnt" || true
    fi
    if [[ ${FIO_KEEP:-0} == 1 ]] || ((rc != 0)); then
        say "kept $work (store, dedupfs.log, fio-*.json)"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# One job file per phase: the global section given, one section per shared file.
jobfile() { # NAME GLOBAL-OPTIONS...
    local name=$1 f
    shift
    {
        echo "[global]"
        echo "directory=$mnt/c"
        echo "ioengine=psync"
        echo "direct=0"
        echo "fallocate=none"
        echo "size=$region"
        echo "offset_increment=$region"
        echo "numjobs=$per_file"
        echo "verify=crc32c"
        echo "verify_interval=4k"
        echo "verify_fatal=1"
        echo "group_reporting=0"
        printf '%s\n' "$@"
        for ((f = 0; f < nfiles; f++)); do
            printf '[file%d]\nfilename=shared%d\n' "$f" "$f"
        done
    } >"$work/$name.fio"
}
jobfile prefill rw=write bs=1m
jobfile main rw=randrw percentage_random=70 rwmixread=50 bsrange=4k-1m fdatasync=64 \
    verify_backlog=64 time_based "runtime=$runtime"
jobfile final rw=read bs=1m

# Runs one phase; fio's JSON goes to fio-NAME.json, its messages to fio-NAME.err. fio warns
# that "multiple writers may overwrite blocks that belong to other jobs" for any shared file;
# here the slices are disjoint (offset_increment = size), so the warning is dropped.
run_fio() { # NAME
    local name=$1 rc=0
    # From the work directory: fio saves its verify state (*-verify.state) in the cwd.
    (cd "$work" && fio --output-format=json --output="$work/fio-$name.json" "$work/$name.fio") \
        2>"$work/fio-$name.err" || rc=$?
    grep -v 'multiple writers may overwrite' "$work/fio-$name.err" >&2 || true
    # fio writes the same warning at the top of the JSON file; keep only the JSON.
    sed -i -n '/^{/,$p' "$work/fio-$name.json"
    local errs
    errs=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(sum(1 for j in d["jobs"] if j["error"] != 0))' "$work/fio-$name.json" 2>/dev/null || echo unparsable)
    if ((rc != 0)) || [[ $errs != 0 ]]; then
        say "FAILED: fio $name exited $rc, jobs with errors: $errs (see $work/fio-$name.*)" >&2
        return 1
    fi
}

# MiB read and written by all jobs of a phase: "READ WRITE".
mib() { # NAME
    python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
r = sum(j["read"]["io_bytes"] for j in d["jobs"]) / 2**20
w = sum(j["write"]["io_bytes"] for j in d["jobs"]) / 2**20
print(f"{r:.0f} {w:.0f}")' "$work/fio-$1.json"
}

"$dedupfs" init "$store" >/dev/null
"$dedupfs" mount "$store" "$mnt"
"$dedupfs" container create c --store "$store" >/dev/null
say "store $store, mount $mnt: $jobs jobs on $nfiles shared files, $per_file per file, $region each"

start=$SECONDS
say "prefill: sequential write of every slice"
run_fio prefill
read -r _ pre_w < <(mib prefill)
say "prefill: $pre_w MiB written in $((SECONDS - start))s"

t=$SECONDS
say "main: randrw (70% random), bs 4k-1m, verify=crc32c with verify_backlog=64, ${runtime}s"
run_fio main
read -r main_r main_w < <(mib main)
say "main: $main_w MiB written, $main_r MiB read (verify reads included) in $((SECONDS - t))s"

"$dedupfs" umount "$mnt"
sync
echo 3 >/proc/sys/vm/drop_caches
"$dedupfs" mount "$store" "$mnt"
t=$SECONDS
say "final: remounted, read-only crc32c verify of every slice"
run_fio final
read -r fin_r _ < <(mib final)
say "final: $fin_r MiB read and verified in $((SECONDS - t))s"

"$dedupfs" umount "$mnt"
fsck_out=$("$dedupfs" fsck "$store" 2>&1) && fsck_rc=0 || fsck_rc=$?
echo "$fsck_out" | tail -n 3
if ((fsck_rc != 0)) || ! grep -qE '(^|[^0-9])0 problems' <<<"$fsck_out"; then
    say "FAILED: fsck exited $fsck_rc" >&2
    exit 1
fi
log_errors=$(grep -ciE '\b(error|panic)' "$store/dedupfs.log" 2>/dev/null || true)
say "daemon log: ${log_errors:-0} error lines"
echo "fio-verify: pass: $jobs jobs on $nfiles shared files, ${runtime}s randrw + prefill + final verify," \
    "$((pre_w + main_w)) MiB written, $((main_r + fin_r)) MiB read, verify errors 0, fsck clean" \
    "(0 problems), $((SECONDS - start))s"
