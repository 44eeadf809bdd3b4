#!/usr/bin/env bash
# dedupfs against the backup tools users would pick instead (issue 5): restic and borg, on
# the same data, the way a user runs each of them.
#
#   scripts/bench-peers.sh [--record] [--size MIB] [--generations N] [--seed N]
#
#   --record          append the table, machine, tool versions and command to docs/BENCHMARKS.md
#   --size MIB        size of the data set (default 2048, times $SCALE if set)
#   --generations N   nightly generations after the first ingest (default 5)
#   --seed N          seed of the data set sample and of every generation's changes (default 1)
#
# Data set: a deterministic sample of the real files under $DATASET_DIRS (default /usr/lib,
# /usr/share and every ~/.rustup/toolchains/* directory), copied into a work tree. When the
# directories hold more than MIB, each file is taken or not by a hash of its path relative
# to its directory, so the same files of two toolchains are taken together. Then a nightly
# series: generation N+1 is N with ~5% of the files changed (a 1-16 KiB region rewritten or
# 1-16 KiB appended, random bytes), 0.2% new files (half a copy of another file behind a new
# header, half random) and 0.2% deleted; each generation is backed up by every tool before
# the next is made.
#
# Per tool (restic, local repository; borg, --encryption none; dedupfs, one container):
#   - first ingest: restic backup / borg create / cp -a into the container + snapshot create;
#     and `dedupfs ingest TREE c --snapshot g0` into a second store (its mount's daemon does it)
#   - each generation: restic backup / borg create (both skip unchanged files by their cache) /
#     rsync -a --delete into the container + snapshot create
#   - restore of the last generation into a directory: restic restore / borg extract /
#     dedupfs restore (store not mounted)
#   - read-back of the last generation through a mount: restic mount / borg mount / the
#     .snapshots view of a fresh dedupfs mount, and a restore mount of the snapshot alone
#     (`dedupfs mount --snapshot`, as borg mounts one archive); every file read with cat
#   - peak RSS: /usr/bin/time -f %M of restic and borg, VmHWM of the dedupfs daemon (and of
#     the `dedupfs restore` process)
# Every timed step starts with dropped page caches and ends with `sync -f` of the disk.
# Stored size: restic's and borg's repository directory (du); for dedupfs `stored_bytes` of
# `dedupfs stats --json` (compressed chunk payloads), and the store directory's du.
#
# Environment: DATASET_DIRS (space-separated), SCALE (multiplies --size, e.g. 0.05 for a
# smoke run), BENCH_DIR (parent of the work dir, default /var/tmp), DEDUPFS_BIN (default:
# `cargo build --release` now, then target/release/dedupfs; copied, so a rebuild during
# the run changes nothing), PERF=1 (profile the dedupfs daemon with perf during the first ingest and the
# mount read-back, and `dedupfs restore`; the top symbols go to stderr and the record).
# Floors: the same read of the last generation from the work tree on the bare disk (cold and
# warm) and through bindfs, if installed: what no read through FUSE can beat here.
# Needs root (drop_caches), /dev/fuse, restic, borg, rsync and GNU time (apt-get install
# restic borgbackup rsync time; bindfs for the FUSE floor).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
command_line="scripts/bench-peers.sh${*:+ $*}"
[[ -n ${SCALE:-} ]] && command_line="SCALE=$SCALE $command_line"
[[ -n ${DATASET_DIRS:-} ]] && command_line="DATASET_DIRS=\"$DATASET_DIRS\" $command_line"
[[ -n ${PERF:-} ]] && command_line="PERF=$PERF $command_line"

usage() { sed -n '2,46s/^# \{0,1\}//p' "$0"; }

record=0
size_mib=2048
generations=5
seed=1
while (($#)); do
    case "$1" in
        --record) record=1 ;;
        --size) size_mib=$2; shift ;;
        --generations) generations=$2; shift ;;
        --seed) seed=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench-peers.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
size_mib=$(awk -v s="$size_mib" -v f="${SCALE:-1}" 'BEGIN { printf "%d", s * f }')
((size_mib > 0 && generations >= 1)) || { echo "bench-peers.sh: --size and --generations must be positive" >&2; exit 2; }

say() { echo "bench-peers: $(date -u +%H:%M:%S) $*" >&2; }
die() { say "$*"; exit 1; }

((EUID == 0)) || die "needs root (drop_caches, FUSE mounts)"
[[ -c /dev/fuse ]] || die "/dev/fuse is missing"
for tool in restic borg rsync fusermount3; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install restic borgbackup rsync fuse3 time)"
done
[[ -x /usr/bin/time ]] || die "GNU time is missing (apt-get install time)"

# The binary measured is the work tree's, built now, as it stands at this commit.
commit=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)
src_bin=${DEDUPFS_BIN:-}
if [[ -z $src_bin ]]; then
    say "building the release binary"
    cargo build --release --quiet >&2
    src_bin=$repo/target/release/dedupfs
fi
binary_note=${DEDUPFS_BIN:-"built from the work tree when the run started"}

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/dedupfs-bench-peers.XXXXXX")
bin="$work/dedupfs"
cp "$src_bin" "$bin"
tree="$work/tree"          # the data set, changed in place from generation to generation
store="$work/dedupfs-store"
mnt="$work/dedupfs-mnt"
store2="$work/dedupfs-ingest-store" # the `dedupfs ingest` path, a store of its own
mnt2="$work/dedupfs-ingest-mnt"
rmnt="$work/restic-mnt"
bmnt="$work/borg-mnt"
fmnt="$work/bindfs-mnt"  # the floor of a FUSE read: bindfs over the work tree
dest="$work/restore"
mkdir -p "$tree" "$mnt" "$mnt2" "$rmnt" "$bmnt" "$fmnt"

export RESTIC_REPOSITORY="$work/restic-repo" RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$work/restic-cache"
export BORG_REPO="$work/borg-repo" BORG_BASE_DIR="$work/borg-base"
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export DEDUPFS_STORE="$store"

bg_pids=()
is_mounted() { grep -q " $1 " /proc/mounts; }
cleanup() {
    local m p
    for m in "$mnt" "$mnt2" "$rmnt" "$bmnt" "$fmnt"; do
        if is_mounted "$m"; then
            if [[ $m == "$mnt" || $m == "$mnt2" ]]; then "$bin" umount "$m" >/dev/null 2>&1 || true; fi
            is_mounted "$m" && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }
        fi
    done
    for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    # --one-file-system: never delete through a mount that could not be removed.
    rm -rf --one-file-system "$work" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v z="$2" 'BEGIN { printf "%.1f", z - a }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { if (s + 0 == 0) print "-"; else printf "%.1f", b / 1048576 / s }'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
du_bytes() { du -sb "$1" | cut -f1; }
file_bytes() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f", s }'; }
read_all() { find "$1" -type f -print0 | xargs -0 -r cat | wc -c; }
rss_file="$work/rss"
rss_kib() { tail -n1 "$rss_file"; }
max() { if (($1 > $2)); then echo "$1"; else echo "$2"; fi; }
kib_mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
daemon_pid() { awk '{ print $2 }' "$store/lock"; }
hwm_kib() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status"; }
reset_hwm() { echo 5 >"/proc/$1/clear_refs"; }
stored_bytes() { "$bin" stats --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["stored_bytes"])'; }
wait_mounted() { # mountpoint pid
    local i
    for ((i = 0; i < 600; i++)); do
        is_mounted "$1" && return 0
        kill -0 "$2" 2>/dev/null || die "the mount of $1 exited before it was ready"
        sleep 0.1
    done
    die "$1 was not mounted after 60 s"
}
mount_dedupfs() { "$bin" mount "$store" "$mnt" >/dev/null; }
umount_dedupfs() { "$bin" umount "$mnt" >/dev/null; }

perf_pid=""
perf_report=""
perf_start() { # pid label
    [[ ${PERF:-} == 1 ]] && command -v perf >/dev/null || return 0
    perf record -F 499 -g -p "$1" -o "$work/perf-$2.data" >/dev/null 2>&1 &
    perf_pid=$!
    bg_pids+=("$perf_pid")
}
perf_stop() { # label
    [[ -n $perf_pid ]] || return 0
    if [[ $perf_pid != none ]]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
    fi
    perf_pid=""
    local top
    top=$(perf report -i "$work/perf-$1.data" --no-children --sort dso,sym --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -n 25 || true)
    perf_report+=$'\n'"dedupfs, $1 (perf record -F 499 -g, self time, top 25):"$'\n'"$top"$'\n'
    say "perf, $1:"$'\n'"$top"
}
# Runs COMMAND... under `perf record` when PERF=1 (for processes other than the daemon).
perf_wrap() { # label command...
    local label=$1
    shift
    if [[ ${PERF:-} == 1 ]] && command -v perf >/dev/null; then
        perf record -F 499 -g -o "$work/perf-$label.data" -- "$@" 2>/dev/null
        perf_pid=none
        perf_stop "$label"
    else
        "$@"
    fi
}

# ---- data set ----------------------------------------------------------------------------

if [[ -n ${DATASET_DIRS:-} ]]; then
    read -r -a roots <<<"$DATASET_DIRS"
else
    roots=(/usr/lib /usr/share)
    for d in "$HOME"/.rustup/toolchains/*; do [[ -d $d ]] && roots+=("$d"); done
fi
say "sampling ${size_mib} MiB of files from ${roots[*]}"
python3 - "$work/lists" "$((size_mib << 20))" "$seed" "${roots[@]}" >"$work/roots" <<'PY'
import hashlib, os, stat, sys

out, budget, seed, roots = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
os.makedirs(out)
seen, entries = set(), []
for root in roots:
    real = os.path.realpath(root)
    if real in seen or not os.path.isdir(real):
        continue
    seen.add(real)
    files = []
    for d, dirs, names in os.walk(real):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(d, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                files.append((os.path.relpath(p, real), st.st_size if stat.S_ISREG(st.st_mode) else 0))
    entries.append((real, files))
total = sum(s for _, files in entries for _, s in files)
fraction = min(1.0, budget / total) if total else 1.0
for i, (real, files) in enumerate(entries):
    label = "%d%s" % (i, real.replace("/", "-"))
    with open(os.path.join(out, label), "w") as f:
        for rel, _ in files:
            h = int(hashlib.sha256((seed + rel).encode()).hexdigest()[:8], 16) / 2**32
            if h < fraction:
                f.write(rel + "\n")
    print(label, real)
PY
while read -r label real; do
    rsync -a --files-from="$work/lists/$label" "$real/" "$tree/$label/"
done <"$work/roots"
data_bytes=$(file_bytes "$tree")
data_files=$(find "$tree" -type f | wc -l)
data_mib=$(mib "$data_bytes")
say "data set: $data_mib MiB in $data_files files"

# Changes one generation in place: see the header.
mutate_py="$work/mutate.py"
cat >"$mutate_py" <<'PY'
import os, random, sys

tree, seed, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed * 1000003 + gen)
files = []
for d, dirs, names in os.walk(tree):
    dirs.sort()
    for n in sorted(names):
        p = os.path.join(d, n)
        if os.path.isfile(p) and not os.path.islink(p):
            files.append(p)
n = len(files)
picked = rng.sample(files, max(1, n * 5 // 100) + 2 * max(1, n // 500))
changed, deleted = picked[: max(1, n * 5 // 100)], picked[max(1, n * 5 // 100):][: max(1, n // 500)]
written = 0
for p in changed:
    size = os.path.getsize(p)
    data = rng.randbytes(rng.randint(1024, 16384))
    with open(p, "r+b") as f:
        if size > 0 and rng.random() < 0.6:
            f.seek(rng.randrange(size))
        else:
            f.seek(0, os.SEEK_END)
        f.write(data)
    written += len(data)
for p in deleted:
    os.unlink(p)
dirs = sorted({os.path.dirname(p) for p in files})
for i in range(max(1, n // 500)):
    p = os.path.join(rng.choice(dirs), "new-g%d-%d" % (gen, i))
    if i % 2 == 0:
        with open(rng.choice(changed), "rb") as f:
            data = rng.randbytes(512) + f.read(4 << 20)
    else:
        data = rng.randbytes(rng.randint(4096, 1 << 20))
    with open(p, "wb") as f:
        f.write(data)
    written += len(data)
print("%d changed, %d deleted, %d new, %.1f MiB written" % (len(changed), len(deleted), max(1, n // 500), written / 1048576))
PY

# ---- results -----------------------------------------------------------------------------

declare -A res # "metric:tool" -> value
put() { res[$1:$2]=$3; }
get() { echo "${res[$1:$2]:--}"; }
rss_max() { # tool kib: keep the largest peak of a tool
    local cur=${res[rss_all:$1]:-0}
    ((${2:-0} > cur)) && res[rss_all:$1]=$2
    return 0
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(now)

# ---- first ingest -------------------------------------------------------------------------

"$bin" init "$store" >/dev/null
mount_dedupfs
"$bin" container create c >/dev/null
restic init -q >/dev/null
borg init --encryption none >/dev/null

say "first ingest: restic"
drop_caches
t0=$(now)
/usr/bin/time -f %M -o "$rss_file" restic backup -q --host bench --tag g0 "$tree"
sync -f "$RESTIC_REPOSITORY"
t1=$(now)
put ingest_s restic "$(elapsed "$t0" "$t1")"
put ingest_rss restic "$(rss_kib)"; rss_max restic "$(rss_kib)"
put stored_0 restic "$(du_bytes "$RESTIC_REPOSITORY")"

say "first ingest: borg"
drop_caches
t0=$(now)
/usr/bin/time -f %M -o "$rss_file" borg create "::g0" "$tree"
sync -f "$BORG_REPO"
t1=$(now)
put ingest_s borg "$(elapsed "$t0" "$t1")"
put ingest_rss borg "$(rss_kib)"; rss_max borg "$(rss_kib)"
put stored_0 borg "$(du_bytes "$BORG_REPO")"

say "first ingest: dedupfs"
pid=$(daemon_pid)
drop_caches
reset_hwm "$pid"
perf_start "$pid" ingest
t0=$(now)
cp -a "$tree/." "$mnt/c/"
"$bin" snapshot create c g0 >/dev/null
sync -f "$store"
t1=$(now)
perf_stop ingest
put ingest_s dedupfs "$(elapsed "$t0" "$t1")"
put ingest_rss dedupfs "$(hwm_kib "$pid")"; rss_max dedupfs "$(hwm_kib "$pid")"
put stored_0 dedupfs "$(stored_bytes)"
put disk_0 dedupfs "$(du_bytes "$store")"
say "first ingest: dedupfs ingest (daemon-side, a second store)"
"$bin" init "$store2" >/dev/null
"$bin" mount "$store2" "$mnt2" >/dev/null
DEDUPFS_STORE=$store2 "$bin" container create c >/dev/null
pid2=$(awk '{ print $2 }' "$store2/lock")
ingest_rss=0
drop_caches
reset_hwm "$pid2"
t0=$(now)
DEDUPFS_STORE=$store2 "$bin" ingest "$tree" c --snapshot g0 >/dev/null
sync -f "$store2"
t1=$(now)
put ingest_s ingest "$(elapsed "$t0" "$t1")"
ingest_rss=$(max "$ingest_rss" "$(hwm_kib "$pid2")")
put stored_0 ingest "$(DEDUPFS_STORE=$store2 stored_bytes)"
for tool in restic borg dedupfs ingest; do
    put ingest_mibs "$tool" "$(rate "$data_bytes" "$(get ingest_s "$tool")")"
done

# ---- nightly generations -----------------------------------------------------------------

gen_rss_restic=0 gen_rss_borg=0 gen_rss_dedupfs=0 changes=""
for ((g = 1; g <= generations; g++)); do
    summary=$(python3 "$mutate_py" "$tree" "$seed" "$g")
    changes+="g$g: $summary; "
    say "generation $g ($summary)"

    before=$(du_bytes "$RESTIC_REPOSITORY")
    drop_caches
    t0=$(now)
    /usr/bin/time -f %M -o "$rss_file" restic backup -q --host bench --tag "g$g" "$tree"
    sync -f "$RESTIC_REPOSITORY"
    t1=$(now)
    put "gen${g}_s" restic "$(elapsed "$t0" "$t1")"
    put "gen${g}_added" restic "$(($(du_bytes "$RESTIC_REPOSITORY") - before))"
    gen_rss_restic=$(max "$gen_rss_restic" "$(rss_kib)")

    before=$(du_bytes "$BORG_REPO")
    drop_caches
    t0=$(now)
    /usr/bin/time -f %M -o "$rss_file" borg create "::g$g" "$tree"
    sync -f "$BORG_REPO"
    t1=$(now)
    put "gen${g}_s" borg "$(elapsed "$t0" "$t1")"
    put "gen${g}_added" borg "$(($(du_bytes "$BORG_REPO") - before))"
    gen_rss_borg=$(max "$gen_rss_borg" "$(rss_kib)")

    before=$(stored_bytes)
    drop_caches
    reset_hwm "$pid"
    t0=$(now)
    rsync -a --delete "$tree/" "$mnt/c/"
    "$bin" snapshot create c "g$g" >/dev/null
    sync -f "$store"
    t1=$(now)
    put "gen${g}_s" dedupfs "$(elapsed "$t0" "$t1")"
    put "gen${g}_added" dedupfs "$(($(stored_bytes) - before))"
    gen_rss_dedupfs=$(max "$gen_rss_dedupfs" "$(hwm_kib "$pid")")

    before=$(DEDUPFS_STORE=$store2 stored_bytes)
    drop_caches
    reset_hwm "$pid2"
    t0=$(now)
    DEDUPFS_STORE=$store2 "$bin" ingest "$tree" c --snapshot "g$g" >/dev/null
    sync -f "$store2"
    t1=$(now)
    put "gen${g}_s" ingest "$(elapsed "$t0" "$t1")"
    put "gen${g}_added" ingest "$(($(DEDUPFS_STORE=$store2 stored_bytes) - before))"
    ingest_rss=$(max "$ingest_rss" "$(hwm_kib "$pid2")")
done
put rss_all ingest "$ingest_rss"
put stored_n ingest "$(DEDUPFS_STORE=$store2 stored_bytes)"
got=$(file_bytes "$mnt2/c")
[[ $got == "$(file_bytes "$tree")" ]] || say "WARNING: dedupfs ingest holds $got bytes, the tree $(file_bytes "$tree")"
"$bin" umount "$mnt2" >/dev/null
for tool in restic borg dedupfs; do
    v=gen_rss_$tool
    put gen_rss "$tool" "${!v}"; rss_max "$tool" "${!v}"
done
last=g$generations
put stored_n restic "$(du_bytes "$RESTIC_REPOSITORY")"
put stored_n borg "$(du_bytes "$BORG_REPO")"
put stored_n dedupfs "$(stored_bytes)"
last_bytes=$(file_bytes "$tree")
last_files=$(find "$tree" -type f | wc -l)
umount_dedupfs
put disk_n dedupfs "$(du_bytes "$store")"
put disk_n restic "$(get stored_n restic)"
put disk_n borg "$(get stored_n borg)"

# ---- restore of the last generation into a directory ------------------------------------

check_bytes() { # got label
    [[ $1 == "$last_bytes" ]] || say "WARNING: $2 gave $1 bytes, expected $last_bytes"
}
restic_id=$(restic snapshots --json --tag "$last" | python3 -c 'import json, sys; print(json.load(sys.stdin)[-1]["short_id"])')

say "restore: restic restore"
rm -rf "$dest"; mkdir -p "$dest"
drop_caches
t0=$(now)
/usr/bin/time -f %M -o "$rss_file" restic restore -q "$restic_id" --target "$dest"
sync -f "$dest"
t1=$(now)
put restore_s restic "$(elapsed "$t0" "$t1")"
put restore_rss restic "$(rss_kib)"; rss_max restic "$(rss_kib)"
check_bytes "$(file_bytes "$dest")" "restic restore"

say "restore: borg extract"
rm -rf "$dest"; mkdir -p "$dest"
drop_caches
t0=$(now)
(cd "$dest" && /usr/bin/time -f %M -o "$rss_file" borg extract "::$last")
sync -f "$dest"
t1=$(now)
put restore_s borg "$(elapsed "$t0" "$t1")"
put restore_rss borg "$(rss_kib)"; rss_max borg "$(rss_kib)"
check_bytes "$(file_bytes "$dest")" "borg extract"

say "restore: dedupfs restore"
rm -rf "$dest"
drop_caches
t0=$(now)
perf_wrap restore /usr/bin/time -f %M -o "$rss_file" "$bin" restore "c@$last" "$dest" >/dev/null
sync -f "$dest"
t1=$(now)
put restore_s dedupfs "$(elapsed "$t0" "$t1")"
put restore_rss dedupfs "$(rss_kib)"; rss_max dedupfs "$(rss_kib)"
check_bytes "$(file_bytes "$dest")" "dedupfs restore"
rm -rf "$dest"

# ---- read-back of the last generation through each tool's mount --------------------------

say "mount read: restic mount"
drop_caches
/usr/bin/time -f %M -o "$rss_file" restic mount "$rmnt" >/dev/null 2>&1 &
mpid=$!
bg_pids+=("$mpid")
wait_mounted "$rmnt" "$mpid"
t0=$(now)
got=$(read_all "$rmnt/ids/$restic_id$tree")
t1=$(now)
fusermount3 -u "$rmnt"
wait "$mpid" || true
put mount_s restic "$(elapsed "$t0" "$t1")"
put mount_rss restic "$(rss_kib)"; rss_max restic "$(rss_kib)"
check_bytes "$got" "restic mount"

say "mount read: borg mount"
drop_caches
/usr/bin/time -f %M -o "$rss_file" borg mount -f "::$last" "$bmnt" >/dev/null 2>&1 &
mpid=$!
bg_pids+=("$mpid")
wait_mounted "$bmnt" "$mpid"
t0=$(now)
got=$(read_all "$bmnt$tree")
t1=$(now)
fusermount3 -u "$bmnt"
wait "$mpid" || true
put mount_s borg "$(elapsed "$t0" "$t1")"
put mount_rss borg "$(rss_kib)"; rss_max borg "$(rss_kib)"
check_bytes "$got" "borg mount"

say "mount read: dedupfs .snapshots view"
mount_dedupfs
pid=$(daemon_pid)
drop_caches
reset_hwm "$pid"
perf_start "$pid" mount-read
t0=$(now)
got=$(read_all "$mnt/c/.snapshots/$last")
t1=$(now)
perf_stop mount-read
put mount_s dedupfs "$(elapsed "$t0" "$t1")"
put mount_rss dedupfs "$(hwm_kib "$pid")"; rss_max dedupfs "$(hwm_kib "$pid")"
umount_dedupfs
check_bytes "$got" "dedupfs .snapshots view"

# The same snapshot as its own read-only mount, as `borg mount ::ARCHIVE` mounts one
# archive (the store not mounted otherwise: the restore mount's daemon holds it).
say "mount read: dedupfs mount --snapshot"
"$bin" mount "$store" "$mnt" --snapshot "c@$last" >/dev/null
pid=$(daemon_pid)
drop_caches
reset_hwm "$pid"
t0=$(now)
got=$(read_all "$mnt")
t1=$(now)
put mount_s rmount "$(elapsed "$t0" "$t1")"
put mount_rss rmount "$(hwm_kib "$pid")"; rss_max dedupfs "$(hwm_kib "$pid")"
umount_dedupfs
check_bytes "$got" "dedupfs mount --snapshot"

# ---- floors: the same read of the same files without a store ----------------------------
# What no filesystem read through FUSE can beat on this machine: the work tree (the last
# generation's files as plain files) read with the same command from the disk cold, from
# the page cache (no filesystem work at all), and through bindfs with its source warm (FUSE
# round trips alone).
say "floor: the work tree read from the disk, cold"
drop_caches
t0=$(now)
got=$(read_all "$tree")
t1=$(now)
floor_disk_s=$(elapsed "$t0" "$t1")
check_bytes "$got" "work tree, cold"
say "floor: the work tree read again, page cache warm"
t0=$(now)
got=$(read_all "$tree")
t1=$(now)
floor_cache_s=$(elapsed "$t0" "$t1")
check_bytes "$got" "work tree, warm"
floor_bindfs_s=-
if command -v bindfs >/dev/null; then
    say "floor: the work tree through bindfs, source warm"
    bindfs "$tree" "$fmnt"
    t0=$(now)
    got=$(read_all "$fmnt")
    t1=$(now)
    fusermount3 -u "$fmnt"
    floor_bindfs_s=$(elapsed "$t0" "$t1")
    check_bytes "$got" "bindfs"
else
    say "bindfs is not installed (apt-get install bindfs): no FUSE floor"
fi

for tool in restic borg dedupfs; do
    put restore_mibs "$tool" "$(rate "$last_bytes" "$(get restore_s "$tool")")"
    put mount_mibs "$tool" "$(rate "$last_bytes" "$(get mount_s "$tool")")"
done
put mount_mibs rmount "$(rate "$last_bytes" "$(get mount_s rmount)")"
total_s=$(elapsed "$started" "$(now)")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report ------------------------------------------------------------------------------

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
row() { # label metric format(raw|mib|kib) [the dedupfs column's tool: dedupfs or ingest]
    local a b c
    a=$(get "$2" restic) b=$(get "$2" borg) c=$(get "$2" "${4:-dedupfs}")
    local ra rb
    ra=$(ratio "$c" "$a") rb=$(ratio "$c" "$b")
    case $3 in
        mib) for v in a b c; do [[ ${!v} == - ]] || printf -v "$v" '%s' "$(mib "${!v}")"; done ;;
        kib) for v in a b c; do [[ ${!v} == - ]] || printf -v "$v" '%s' "$(kib_mib "${!v}")"; done ;;
    esac
    echo "| $1 | $a | $b | $c | $ra | $rb |"
}
table=$(
    echo "| measurement | restic | borg | dedupfs | dedupfs / restic | dedupfs / borg |"
    echo "|---|---:|---:|---:|---:|---:|"
    row "first ingest, wall (s)" ingest_s raw
    row "first ingest (MiB/s)" ingest_mibs raw
    row "stored after first ingest (MiB)" stored_0 mib
    for ((g = 1; g <= generations; g++)); do
        row "generation $g, wall (s)" "gen${g}_s" raw
        row "generation $g, added (MiB)" "gen${g}_added" mib
    done
    row "stored after $generations generations (MiB)" stored_n mib
    row "repository on disk after $generations generations, du (MiB)" disk_n mib
    row "restore of $last into a directory, wall (s)" restore_s raw
    row "restore of $last into a directory (MiB/s)" restore_mibs raw
    row "read of $last through a mount, cold, wall (s)" mount_s raw
    row "read of $last through a mount, cold (MiB/s)" mount_mibs raw
    row "read of $last through a mount, cold, wall (s); dedupfs: a restore mount (\`mount --snapshot\`)" mount_s raw rmount
    row "read of $last through a mount, cold (MiB/s); dedupfs: a restore mount" mount_mibs raw rmount
    row "peak RSS, first ingest (MiB)" ingest_rss kib
    row "peak RSS, generations (MiB)" gen_rss kib
    row "peak RSS, restore into a directory (MiB)" restore_rss kib
    row "peak RSS, mount read (MiB)" mount_rss kib
    row "peak RSS, all steps (MiB)" rss_all kib
    row "first ingest with \`dedupfs ingest\`, wall (s)" ingest_s raw ingest
    row "first ingest with \`dedupfs ingest\` (MiB/s)" ingest_mibs raw ingest
    row "stored after first ingest with \`dedupfs ingest\` (MiB)" stored_0 mib ingest
    for ((g = 1; g <= generations; g++)); do
        row "generation $g with \`dedupfs ingest\`, wall (s)" "gen${g}_s" raw ingest
        row "generation $g with \`dedupfs ingest\`, added (MiB)" "gen${g}_added" mib ingest
    done
    row "stored after $generations generations with \`dedupfs ingest\` (MiB)" stored_n mib ingest
    row "peak RSS of the daemon over the \`dedupfs ingest\` steps (MiB)" rss_all kib ingest
)

floor_row() { # label seconds
    local r
    r=$(rate "$last_bytes" "$2")
    echo "| $1 | $2 | $r | $(ratio "$(get mount_mibs dedupfs)" "$r") |"
}
best_peer=$(awk -v a="$(get mount_mibs restic)" -v b="$(get mount_mibs borg)" 'BEGIN { print (a + 0 > b + 0 ? a : b) }')
floors=$(
    echo "| the same read of $last's files (\`find | xargs cat\`) | wall (s) | MiB/s | dedupfs \`.snapshots\` read, MiB/s ÷ this |"
    echo "|---|---:|---:|---:|"
    floor_row "dedupfs, the \`.snapshots\` view (above)" "$(get mount_s dedupfs)"
    floor_row "dedupfs, a restore mount (\`dedupfs mount --snapshot\`, above)" "$(get mount_s rmount)"
    floor_row "the work tree on the bare disk, cold" "$floor_disk_s"
    floor_row "the work tree from the page cache (no filesystem work)" "$floor_cache_s"
    floor_row "bindfs over the work tree, source in the page cache (FUSE alone)" "$floor_bindfs_s"
    echo "| 5x the faster peer mount read (issue 5's target) | - | $(awk -v b="$best_peer" 'BEGIN { printf "%.1f", 5 * b }') | $(ratio "$(get mount_mibs dedupfs)" "$(awk -v b="$best_peer" 'BEGIN { print 5 * b }')") |"
)

machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
versions="$(restic version | cut -d' ' -f1-2), $(borg --version), dedupfs $("$bin" --version 2>/dev/null | awk '{ print $2 }')"
roots_text=$(awk '{ printf "%s%s", (NR > 1 ? ", " : ""), $2 }' "$work/roots")
notes=$(
    cat <<EOF
- data set: $data_mib MiB in $data_files files, a sample (seed $seed) of $roots_text; after $generations generations $(mib "$last_bytes") MiB in $last_files files.
- generations: $changes
- tools: $versions. Defaults of each: restic repository v2 with zstd (auto), borg lz4 with 2 MiB average chunks, dedupfs zstd:1 with 64 KiB average chunks.
- how: restic \`backup\` and borg \`create\` of the tree; dedupfs \`cp -a\` (first) or \`rsync -a --delete\` (later) into a container, then \`dedupfs snapshot create\`; the \`dedupfs ingest\` rows: \`dedupfs ingest TREE c --snapshot gN\` into a second store, mounted (its daemon does the work). Restore: \`restic restore\`, \`borg extract\`, \`dedupfs restore\` (store not mounted). Mount read: \`restic mount\`, \`borg mount\`, the \`.snapshots\` view of a fresh dedupfs mount and a restore mount of the snapshot alone (\`dedupfs mount --snapshot\`), every file read with \`cat\`. Page caches dropped before each step; each write step ends with \`sync -f\`.
- stored: restic and borg, \`du -sb\` of the repository; dedupfs, \`stored_bytes\` of \`dedupfs stats --json\` (the store directory, RocksDB included, is in the du row, measured after unmount). Peak RSS: GNU time's %M for restic, borg and \`dedupfs restore\`; VmHWM of the dedupfs daemon (reset before each step).
- ratios are dedupfs ÷ peer: above 1 is better for MiB/s, below 1 is better for seconds, MiB stored and RSS.
- whole run: ${total_s} s; load average before: $load_before, after: $load_after.
EOF
)

echo
echo "$table"
echo
echo "$floors"
echo
echo "$notes"
[[ -n $perf_report ]] && echo "$perf_report"

if ((record)); then
    out="$repo/docs/BENCHMARKS.md"
    {
        echo
        echo "### scripts/bench-peers.sh, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "- command: \`$command_line\`"
        echo "- commit: \`$commit\` (\`git describe --dirty\` when the run started); binary: $binary_note"
        echo "- machine: $machine"
        echo "- \`uname -a\`: \`$(uname -a)\`"
        echo "$notes"
        echo
        echo "$table"
        echo
        echo "$floors"
        if [[ -n $perf_report ]]; then
            echo
            echo '```'
            echo "$perf_report"
            echo '```'
        fi
    } >>"$out"
    say "appended to $out"
fi
