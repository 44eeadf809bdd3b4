#!/usr/bin/env bash
# End-to-end benchmark through a real dedupfs mount, with medians of several runs.
#
#   scripts/bench-mount.sh [--record] [--runs N] [--size MIB] [--files N]
#
#   --record     append the results, with date, machine and command, to docs/BENCHMARKS.md
#   --runs N     runs per measurement, the median is reported (default 3)
#   --size MIB   size of the data set (default 1024)
#   --files N    small files for the create/stat/unlink rates (default 20000)
#
# Measures, each run on a fresh store:
#   - sequential write of unique data:  dd if=DATASET of=MNT/c/a bs=1M conv=fsync
#   - sequential write of the same data again (every chunk already stored) to MNT/c/b
#   - sequential read of MNT/c/a again right after (warm: page cache and chunk cache)
#   - sequential read of MNT/c/a after a remount (no page-cache pages of the file, store
#     files warm in the page cache): cat MNT/c/a > /dev/null
#   - create, stat and unlink rates of N small files (one directory, 512 bytes each)
# and the same on the plain disk that holds the store and, if bindfs is installed, through
# bindfs on that disk (a FUSE pass-through: what any FUSE filesystem pays).
# With fio installed, also fio's sequential 1 MiB write and read through the mount.
#
# The data set is mixed real data: half a tar of /usr/share, half a tar of /usr/lib,
# truncated; built once and cached in $BENCH_DATA (default /tmp/dedupfs-bench-dataset).
#
# Environment: DEDUPFS_BIN (default target/release/dedupfs, built if missing), BENCH_DIR
# (parent of the temp dir, default /tmp), PIPELINE_MIBS and PIPELINE2_MIBS (the
# fastcdc+blake3+zstd1 rates of `cargo bench --bench pipeline` on 1 and 2 threads, MiB/s:
# when given, write rates are also shown as a fraction of them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
command_line="scripts/bench-mount.sh${*:+ $*}"

usage() { sed -n '2,27s/^# \{0,1\}//p' "$0"; }

record=0
runs=3
size_mib=1024
nfiles=20000
while (($#)); do
    case "$1" in
        --record) record=1 ;;
        --runs) runs=$2; shift ;;
        --size) size_mib=$2; shift ;;
        --files) nfiles=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench-mount.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { echo "bench: $*" >&2; }
die() { say "$*"; exit 1; }

bin=${DEDUPFS_BIN:-$repo/target/release/dedupfs}
if [[ ! -x $bin ]]; then
    say "building the release binary"
    cargo build --release >&2
fi
[[ -c /dev/fuse ]] || die "/dev/fuse is missing"
have_bindfs=0
command -v bindfs >/dev/null && have_bindfs=1
have_fio=0
command -v fio >/dev/null && have_fio=1

work=$(mktemp -d "${BENCH_DIR:-/tmp}/dedupfs-bench.XXXXXX")
store="$work/store"
mnt="$work/mnt"
disk="$work/disk"
bind_src="$work/bind-src"
bind_mnt="$work/bind-mnt"
mkdir -p "$mnt" "$disk" "$bind_src" "$bind_mnt"

is_mounted() { mountpoint -q "$1" 2>/dev/null; }

cleanup() {
    if is_mounted "$mnt"; then
        "$bin" umount "$mnt" 2>/dev/null || fusermount3 -u -z "$mnt" 2>/dev/null || true
    fi
    if is_mounted "$bind_mnt"; then
        fusermount3 -u -z "$bind_mnt" 2>/dev/null || umount -l "$bind_mnt" 2>/dev/null || true
    fi
    # --one-file-system: never delete through a mount that could not be removed.
    rm -rf --one-file-system "$work" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- data set --------------------------------------------------------------------------

data=${BENCH_DATA:-/tmp/dedupfs-bench-dataset}
want=$((size_mib << 20))
if [[ ! -f $data || $(stat -c %s "$data") -ne $want ]]; then
    say "building a ${size_mib} MiB data set in $data (cached for later runs)"
    half=$((want / 2))
    {
        tar --sort=name -cf - -C / usr/share 2>/dev/null | head -c "$half" || true
        tar --sort=name -cf - -C / usr/lib 2>/dev/null | head -c "$((want - half))" || true
    } >"$data.tmp"
    mv "$data.tmp" "$data"
fi
data_bytes=$(stat -c %s "$data")
((data_bytes > 0)) || die "data set $data is empty"
data_mib=$(awk -v b="$data_bytes" 'BEGIN { printf "%.0f", b / 1048576 }')
cat "$data" >/dev/null # into the page cache: the source side of every write is memory

# ---- helpers -----------------------------------------------------------------------------

now() { echo "$EPOCHREALTIME"; }

# Runs COMMAND... (which moves the whole data set) and records its MiB/s as METRIC.
measure() {
    local metric=$1 t0 t1
    shift
    t0=$(now)
    "$@"
    t1=$(now)
    add "$metric" "$(awk -v b="$data_bytes" -v a="$t0" -v z="$t1" 'BEGIN { printf "%.1f", b / 1048576 / (z - a) }')"
}

write_file() { dd if="$data" of="$1" bs=1M conv=fsync status=none; }
read_file() { cat "$1" >/dev/null; }

median() {
    (($#)) || { echo "-"; return; }
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

smallfiles_py="$work/smallfiles.py"
cat >"$smallfiles_py" <<'PY'
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

# create/s stat/s unlink/s in directory $1.
small_files() { python3 "$smallfiles_py" "$1" "$nfiles"; }

mount_dedupfs() { "$bin" mount "$store" "$mnt" >/dev/null; }
umount_dedupfs() { "$bin" umount "$mnt" >/dev/null; }

declare -A res # "metric:target" -> space-separated values of each run
add() { res[$1]="${res[$1]:-} $2"; }

fio_rates() { # dir -> "write_MiBs read_MiBs"
    local dir=$1 w r
    w=$(fio --name=seqwrite --directory="$dir" --rw=write --bs=1M --size="${size_mib}M" \
        --end_fsync=1 --buffer_compress_percentage=50 --refill_buffers --output-format=terse \
        --terse-version=3 2>/dev/null | awk -F';' '{ printf "%.1f", $48 / 1024 }')
    r=$(fio --name=seqwrite --directory="$dir" --rw=read --bs=1M --size="${size_mib}M" \
        --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{ printf "%.1f", $7 / 1024 }')
    rm -f "$dir"/seqwrite.*
    echo "$w $r"
}

# ---- runs --------------------------------------------------------------------------------

for ((run = 1; run <= runs; run++)); do
    say "run $run of $runs"

    # dedupfs: a fresh store each run, so the first write is all new chunks.
    rm -rf --one-file-system "$store"
    "$bin" init "$store" >/dev/null
    mount_dedupfs
    "$bin" container create c --store "$store" >/dev/null
    measure write_unique:dedupfs write_file "$mnt/c/a"
    measure write_dup:dedupfs write_file "$mnt/c/b"
    umount_dedupfs
    mount_dedupfs
    measure read:dedupfs read_file "$mnt/c/a"
    measure read_warm:dedupfs read_file "$mnt/c/a"
    if ((run == 1)); then
        cmp -s "$data" "$mnt/c/a" || die "read-back of $mnt/c/a differs from the data set"
        stats_text=$("$bin" stats --store "$store" 2>&1 || true)
    fi
    read -r c s u < <(small_files "$mnt/c/small")
    add create:dedupfs "$c"; add stat:dedupfs "$s"; add unlink:dedupfs "$u"
    if ((have_fio)); then
        read -r w r < <(fio_rates "$mnt/c")
        add fio_write:dedupfs "$w"; add fio_read:dedupfs "$r"
    fi
    umount_dedupfs

    # The plain disk under the store.
    measure write_unique:disk write_file "$disk/a"
    measure write_dup:disk write_file "$disk/b"
    measure read:disk read_file "$disk/a"
    measure read_warm:disk read_file "$disk/a"
    rm -f "$disk/a" "$disk/b"
    read -r c s u < <(small_files "$disk/small")
    add create:disk "$c"; add stat:disk "$s"; add unlink:disk "$u"
    if ((have_fio)); then
        read -r w r < <(fio_rates "$disk")
        add fio_write:disk "$w"; add fio_read:disk "$r"
    fi

    # bindfs over the same disk: the cost of FUSE itself.
    if ((have_bindfs)); then
        bindfs "$bind_src" "$bind_mnt"
        measure write_unique:bindfs write_file "$bind_mnt/a"
        measure write_dup:bindfs write_file "$bind_mnt/b"
        fusermount3 -u "$bind_mnt"
        bindfs "$bind_src" "$bind_mnt"
        measure read:bindfs read_file "$bind_mnt/a"
        measure read_warm:bindfs read_file "$bind_mnt/a"
        rm -f "$bind_mnt/a" "$bind_mnt/b"
        read -r c s u < <(small_files "$bind_mnt/small")
        add create:bindfs "$c"; add stat:bindfs "$s"; add unlink:bindfs "$u"
        if ((have_fio)); then
            read -r w r < <(fio_rates "$bind_mnt")
            add fio_write:bindfs "$w"; add fio_read:bindfs "$r"
        fi
        fusermount3 -u "$bind_mnt"
    fi
done

# ---- report ------------------------------------------------------------------------------

med() { # metric target
    # shellcheck disable=SC2086 # word splitting of the values is intended
    median ${res[$1:$2]:-}
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }

rows=(
    "write_unique|sequential write, new data (MiB/s)"
    "write_dup|sequential write, same data again (MiB/s)"
    "read|sequential read after remount (MiB/s)"
    "read_warm|sequential read again, warm (MiB/s)"
    "create|create $nfiles small files (files/s)"
    "stat|stat (files/s)"
    "unlink|unlink (files/s)"
)
if ((have_fio)); then
    rows+=("fio_write|fio seq write 1M, 50% compressible (MiB/s)" "fio_read|fio seq read 1M (MiB/s)")
fi

table=$(
    echo "| measurement | dedupfs | bindfs | disk | dedupfs / bindfs | dedupfs / disk |"
    echo "|---|---:|---:|---:|---:|---:|"
    for row in "${rows[@]}"; do
        key=${row%%|*}
        label=${row#*|}
        d=$(med "$key" dedupfs)
        b=$(med "$key" bindfs)
        k=$(med "$key" disk)
        echo "| $label | $d | $b | $k | $(ratio "$d" "$b") | $(ratio "$d" "$k") |"
    done
    for var in PIPELINE_MIBS PIPELINE2_MIBS; do
        p=${!var:-}
        [[ -n $p ]] || continue
        threads=1
        [[ $var == PIPELINE2_MIBS ]] && threads=2
        echo "| new-data write as a fraction of the in-memory pipeline on $threads thread(s) ($p MiB/s) | $(ratio "$(med write_unique dedupfs)" "$p") | | | | |"
    done
)

machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
notes="Medians of $runs runs; data set: ${data_mib} MiB (tar of /usr/share and /usr/lib); $nfiles small files of 514 bytes in one directory."
((have_bindfs)) || notes+=" bindfs not installed (scripts/setup.sh --bench installs it)."
((have_fio)) || notes+=" fio not installed."

echo
echo "$table"
echo
echo "$notes"
echo
echo "dedupfs stats after writing the data set twice (run 1):"
# shellcheck disable=SC2001 # indent every line
sed 's/^/    /' <<<"${stats_text:-}"

if ((record)); then
    out="$repo/docs/BENCHMARKS.md"
    {
        echo
        echo "### scripts/bench-mount.sh, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "- command: \`$command_line\`"
        echo "- commit: \`$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)\`"
        echo "- machine: $machine"
        echo "- \`uname -a\`: \`$(uname -a)\`"
        echo "- \`nproc\`: $(nproc)"
        echo "- $notes"
        echo
        echo "$table"
        echo
        echo "\`dedupfs stats\` after writing the data set twice:"
        echo
        echo '```'
        echo "${stats_text:-}"
        echo '```'
    } >>"$out"
    say "appended to $out"
fi
