#!/usr/bin/env bash
# dedupfs against bindfs (a pass-through FUSE filesystem over the same disk: what FUSE itself
# costs) and the bare disk that holds the store (issue 5).
#
#   scripts/bench-fuse.sh [--record] [--runs N] [--seq MIB] [--rand MIB] [--rand-seconds S]
#                         [--files N] [--entries N]
#
#   --record           append the table, machine and command to docs/BENCHMARKS.md
#   --runs N           runs of the cheap measurements, the median is reported (default 3)
#   --seq MIB          sequential file size (default 2048)
#   --rand MIB         random-I/O file size (default 256)
#   --rand-seconds S   length of each random-I/O test, run once (default 30)
#   --files N          small files for create/stat/unlink (default 20000)
#   --entries N        entries of the directory that is listed (default 100000)
#
# Measures on each target (a fresh dedupfs store and container for each run):
#   - sequential write of new, incompressible data: fio, 1 MiB blocks, refill_buffers, psync,
#     end_fsync; and sequential read of it after a remount and dropped page caches
#   - 4 KiB random write and read of a file laid out first (incompressible): fio, time_based,
#     at queue depth 1 (psync, buffered) and 16 (libaio, O_DIRECT), a remount and dropped
#     caches before each; IOPS count the final fsync of writes
#   - create (514 bytes each), stat and unlink of N small files in one directory
#   - listing a directory of M empty files, cold (remount, dropped caches) and warm: readdir
#     alone (ls -f) and readdir plus stat of every entry
#   - the dedupfs daemon's peak RSS (VmHWM) over a run
# Rates come from the wall time around each command, so setup and the final fsync count.
#
# Environment: DEDUPFS_BIN (default: `cargo build --release` now, then target/release/dedupfs;
# copied, so a rebuild during the run changes nothing), BENCH_DIR (parent of the work dir, default
# /var/tmp), PIPELINE2_MIBS (the 2-thread fastcdc+blake3+zstd1 rate of scripts/bench-pipeline.sh
# on this machine: when given, the new-data write rate is also shown as a fraction of it).
# Needs root, /dev/fuse, fio and bindfs (scripts/setup.sh --bench).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
command_line="scripts/bench-fuse.sh${*:+ $*}"
[[ -n ${PIPELINE2_MIBS:-} ]] && command_line="PIPELINE2_MIBS=$PIPELINE2_MIBS $command_line"

usage() { sed -n '2,34s/^# \{0,1\}//p' "$0"; }

record=0
runs=3
seq_mib=2048
rand_mib=256
rand_s=30
nfiles=20000
nentries=100000
while (($#)); do
    case "$1" in
        --record) record=1 ;;
        --runs) runs=$2; shift ;;
        --seq) seq_mib=$2; shift ;;
        --rand) rand_mib=$2; shift ;;
        --rand-seconds) rand_s=$2; shift ;;
        --files) nfiles=$2; shift ;;
        --entries) nentries=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench-fuse.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { echo "bench-fuse: $(date -u +%H:%M:%S) $*" >&2; }
die() { say "$*"; exit 1; }

((EUID == 0)) || die "needs root (drop_caches, FUSE mounts)"
[[ -c /dev/fuse ]] || die "/dev/fuse is missing"
for tool in fio bindfs fusermount3 python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh --bench)"
done

# The binary measured is the work tree's, built now, as it stands at this commit.
commit=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)
src_bin=${DEDUPFS_BIN:-}
if [[ -z $src_bin ]]; then
    say "building the release binary"
    cargo build --release --quiet >&2
    src_bin=$repo/target/release/dedupfs
fi
binary_note=${DEDUPFS_BIN:-"built from the work tree when the run started"}

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/dedupfs-bench-fuse.XXXXXX")
bin="$work/dedupfs"
cp "$src_bin" "$bin"
store="$work/store"
mnt="$work/mnt"
disk="$work/disk"
bind_src="$work/bind-src"
bind_mnt="$work/bind-mnt"
mkdir -p "$mnt" "$disk" "$bind_src" "$bind_mnt"

is_mounted() { grep -q " $1 " /proc/mounts; }
cleanup() {
    if is_mounted "$mnt"; then
        "$bin" umount "$mnt" >/dev/null 2>&1 || fusermount3 -u -z "$mnt" 2>/dev/null || true
    fi
    if is_mounted "$bind_mnt"; then
        fusermount3 -u "$bind_mnt" 2>/dev/null || fusermount3 -u -z "$bind_mnt" 2>/dev/null || umount -l "$bind_mnt" 2>/dev/null || true
    fi
    # --one-file-system: never delete through a mount that could not be removed.
    rm -rf --one-file-system "$work" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { echo "$EPOCHREALTIME"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
median() {
    (($#)) || { echo "-"; return; }
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

declare -A res # "metric:target" -> space-separated values of each run
add() { res[$1:$2]="${res[$1:$2]:-} $3"; }

# ---- targets: start, restart (cold caches), stop; $dir is where the tests write ----------

dir=""
daemon_pid() { awk '{ print $2 }' "$store/lock"; }
start() { # target
    case $1 in
        dedupfs)
            rm -rf --one-file-system "$store"
            "$bin" init "$store" >/dev/null
            "$bin" mount "$store" "$mnt" >/dev/null
            "$bin" container create c --store "$store" >/dev/null
            dir="$mnt/c" ;;
        bindfs)
            find "$bind_src" -mindepth 1 -delete
            bindfs "$bind_src" "$bind_mnt"
            dir="$bind_mnt" ;;
        disk)
            find "$disk" -mindepth 1 -delete
            dir="$disk" ;;
    esac
}
stop() { # target
    case $1 in
        dedupfs) "$bin" umount "$mnt" >/dev/null ;;
        bindfs) fusermount3 -u "$bind_mnt" ;;
        disk) ;;
    esac
}
restart() { # target: every cache cold, the daemon's included (its peak RSS is kept)
    case $1 in
        dedupfs)
            local h
            h=$(awk '/^VmHWM/ { print $2 }' "/proc/$(daemon_pid)/status")
            hwm_carry=$((h > hwm_carry ? h : hwm_carry))
            "$bin" umount "$mnt" >/dev/null
            "$bin" mount "$store" "$mnt" >/dev/null ;;
        bindfs)
            fusermount3 -u "$bind_mnt"
            bindfs "$bind_src" "$bind_mnt" ;;
        disk) ;;
    esac
    drop_caches
}
hwm_carry=0

# ---- measurements ------------------------------------------------------------------------

# fio JOB-ARGS... -> prints "wall_seconds ios bytes" of the job (reads or writes, whichever
# it did); fails if fio reports an error.
fio_run() {
    local out="$work/fio.json" t0 t1
    t0=$(now)
    fio --output-format=json --output="$out" --fallocate=none "$@" >/dev/null 2>&1 || { echo "- - -"; return; }
    t1=$(now)
    python3 - "$out" "$t0" "$t1" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
if job["error"]:
    print("- - -")
else:
    d = job["write"] if job["write"]["io_bytes"] else job["read"]
    print("%.3f %d %d" % (float(sys.argv[3]) - float(sys.argv[2]), d["total_ios"], d["io_bytes"]))
PY
}
mibs() { read -r s _ b <<<"$1"; awk -v s="$s" -v b="$b" 'BEGIN { if (s == "-") print "-"; else printf "%.1f", b / 1048576 / s }'; }
iops() { read -r s n _ <<<"$1"; awk -v s="$s" -v n="$n" 'BEGIN { if (s == "-") print "-"; else printf "%.0f", n / s }'; }

seq_write() { fio_run --name=seq --filename="$dir/seq" --rw=write --bs=1M --size="${seq_mib}M" --ioengine=psync --refill_buffers --end_fsync=1; }
seq_read() { fio_run --name=seq --filename="$dir/seq" --rw=read --bs=1M --size="${seq_mib}M" --ioengine=psync; }
rand_layout() { fio_run --name=rand --filename="$dir/rand" --rw=write --bs=1M --size="${rand_mib}M" --ioengine=psync --refill_buffers --end_fsync=1 >/dev/null; }
rand_io() { # rw qd
    local engine=(--ioengine=psync --iodepth=1)
    (($2 > 1)) && engine=(--ioengine=libaio --iodepth="$2" --direct=1)
    local sync=()
    [[ $1 == randwrite ]] && sync=(--end_fsync=1 --refill_buffers)
    fio_run --name=rand --filename="$dir/rand" --rw="$1" --bs=4k --size="${rand_mib}M" "${engine[@]}" \
        --time_based --runtime="$rand_s" --randrepeat=0 "${sync[@]}"
}

small_py="$work/smallfiles.py"
cat >"$small_py" <<'PY'
import os, sys, time

root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(root, exist_ok=True)
names = [os.path.join(root, "f%06d" % i) for i in range(n)]
t = time.perf_counter()
for i, p in enumerate(names):
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.write(fd, (b"%08d " % i) * 57 + b"\n")  # 514 bytes, distinct per file
    os.close(fd)
create = n / (time.perf_counter() - t)
t = time.perf_counter()
for p in names:
    os.stat(p)
stat = n / (time.perf_counter() - t)
t = time.perf_counter()
for p in names:
    os.unlink(p)
unlink = n / (time.perf_counter() - t)
os.rmdir(root)
print("%.0f %.0f %.0f" % (create, stat, unlink))
PY

list_py="$work/list.py"
cat >"$list_py" <<'PY'
import os, sys, time

mode, root = sys.argv[1], sys.argv[2]
if mode == "make":
    n = int(sys.argv[3])
    os.makedirs(root)
    t = time.perf_counter()
    for i in range(n):
        os.close(os.open(os.path.join(root, "e%07d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
    print("%.0f" % (n / (time.perf_counter() - t)))
else:
    t = time.perf_counter()
    n = 0
    with os.scandir(root) as it:
        for e in it:
            if mode == "stat":
                e.stat(follow_symlinks=False)
            n += 1
    print("%.1f %d" % ((time.perf_counter() - t) * 1000, n))
PY
list_ms() { # mode -> ms; checks the entry count
    local ms n
    read -r ms n < <(python3 "$list_py" "$1" "$dir/big")
    ((n == nentries)) || say "WARNING: listed $n entries of $nentries"
    echo "$ms"
}

# ---- runs --------------------------------------------------------------------------------

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(now)
targets=(dedupfs bindfs disk)
for ((run = 1; run <= runs; run++)); do
    for t in "${targets[@]}"; do
        say "run $run of $runs: $t"
        start "$t"
        hwm_carry=0

        drop_caches
        r=$(seq_write); add seq_write "$t" "$(mibs "$r")"
        restart "$t"
        r=$(seq_read); add seq_read "$t" "$(mibs "$r")"
        rm -f "$dir/seq"

        read -r c s u < <(python3 "$small_py" "$dir/small" "$nfiles")
        add create "$t" "$c"; add stat "$t" "$s"; add unlink "$t" "$u"

        if ((run == 1)); then
            add make_big "$t" "$(python3 "$list_py" make "$dir/big" "$nentries")"
            for _ in 1 2 3; do
                restart "$t"
                add ls_cold "$t" "$(list_ms plain)"
                add ls_warm "$t" "$(list_ms plain)"
                restart "$t"
                add lsstat_cold "$t" "$(list_ms stat)"
            done
            rm -rf "$dir/big"

            rand_layout
            for qd in 1 16; do
                for rw in randwrite randread; do
                    restart "$t"
                    say "$t: $rw, queue depth $qd, ${rand_s} s"
                    add "${rw}_$qd" "$t" "$(iops "$(rand_io "$rw" "$qd")")"
                done
            done
            rm -f "$dir/rand"
        fi
        if [[ $t == dedupfs ]]; then
            h=$(awk '/^VmHWM/ { print $2 }' "/proc/$(daemon_pid)/status")
            hwm_carry=$((h > hwm_carry ? h : hwm_carry))
            add rss_run dedupfs "$(awk -v k="$hwm_carry" 'BEGIN { printf "%.0f", k / 1024 }')"
        fi
        stop "$t"
    done
done
total_s=$(awk -v a="$started" -v z="$(now)" 'BEGIN { printf "%.0f", z - a }')
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report ------------------------------------------------------------------------------

med() { # shellcheck disable=SC2086 # word splitting of the values is intended
    median ${res[$1:$2]:-}
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
rows=(
    "seq_write|sequential write 1 MiB, new incompressible data, ${seq_mib} MiB (MiB/s)"
    "seq_read|sequential read 1 MiB, cold (MiB/s)"
    "randwrite_1|4 KiB random write, QD1 psync (IOPS)"
    "randread_1|4 KiB random read, QD1 psync, cold start (IOPS)"
    "randwrite_16|4 KiB random write, QD16 libaio O_DIRECT (IOPS)"
    "randread_16|4 KiB random read, QD16 libaio O_DIRECT (IOPS)"
    "create|create $nfiles small files (files/s)"
    "stat|stat (files/s)"
    "unlink|unlink (files/s)"
    "make_big|create $nentries empty files in one directory (files/s)"
    "ls_cold|readdir of $nentries entries, cold (ms)"
    "ls_warm|readdir again, warm (ms)"
    "lsstat_cold|readdir + stat of $nentries entries, cold (ms)"
)
table=$(
    echo "| measurement | dedupfs | bindfs | disk | dedupfs / bindfs | dedupfs / disk |"
    echo "|---|---:|---:|---:|---:|---:|"
    for row in "${rows[@]}"; do
        key=${row%%|*}
        d=$(med "$key" dedupfs) b=$(med "$key" bindfs) k=$(med "$key" disk)
        echo "| ${row#*|} | $d | $b | $k | $(ratio "$d" "$b") | $(ratio "$d" "$k") |"
    done
    echo "| dedupfs daemon peak RSS over a run (MiB) | $(med rss_run dedupfs) | | | | |"
    if [[ -n ${PIPELINE2_MIBS:-} ]]; then
        echo "| sequential write of new data ÷ 2-thread pipeline ($PIPELINE2_MIBS MiB/s) | $(ratio "$(med seq_write dedupfs)" "$PIPELINE2_MIBS") | | | | |"
    fi
)
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
notes=$(
    cat <<EOF
- medians of $runs runs for sequential I/O and create/stat/unlink; the listing, medians of 3 in the first run; random I/O once, ${rand_s} s each on a ${rand_mib} MiB file, in the first run.
- disk: $(findmnt -n -o FSTYPE,SOURCE --target "$work" | tr -s ' ' | sed 's/ / on /'); bindfs $(bindfs --version 2>/dev/null | head -n1 | awk '{ print $2 }') with default options; $(fio --version).
- ratios are dedupfs ÷ the other: above 1 is better for MiB/s, IOPS and files/s, below 1 for ms.
- whole run: ${total_s} s; load average before: $load_before, after: $load_after.
EOF
)

echo
echo "$table"
echo
echo "$notes"

if ((record)); then
    out="$repo/docs/BENCHMARKS.md"
    {
        echo
        echo "### scripts/bench-fuse.sh, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "- command: \`$command_line\`"
        echo "- commit: \`$commit\` (\`git describe --dirty\` when the run started); binary: $binary_note"
        echo "- machine: $machine"
        echo "- \`uname -a\`: \`$(uname -a)\`"
        echo "$notes"
        echo
        echo "$table"
    } >>"$out"
    say "appended to $out"
fi
