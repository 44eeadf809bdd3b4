#!/usr/bin/env bash
# Snapshot costs through a real mount (issue 3):
#  1. snapshot creation time for containers of N files (default 1000 100000; add 1000000
#     for the full issue list: FILES="1000 100000 1000000"), median of 5 creations each;
#  2. snapshot deletion after changing 1% and 50% of a container's files: time and space
#     given back (stored bytes, from `dedupfs stats --json`);
#  3. listing a 100,000-entry directory in the live view and inside .snapshots.
# Usage: scripts/bench-snapshots.sh [--record]   (--record appends to docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
RECORD=${1:-}
FILES=${FILES:-"1000 100000"}
cargo build --release --quiet
BIN=$PWD/target/release/dedupfs
WORK=$(mktemp -d /var/tmp/dedupfs-bench-snap.XXXXXX)
STORE=$WORK/store
MNT=$WORK/mnt
mkdir -p "$MNT"
cleanup() {
    if grep -q " $MNT " /proc/mounts; then "$BIN" umount "$MNT" || fusermount3 -uz "$MNT"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN" init "$STORE" >/dev/null
"$BIN" mount "$STORE" "$MNT"
export DEDUPFS_STORE=$STORE

ms() { echo $(( $(date +%s%N) / 1000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
stored() { "$BIN" stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored_bytes"])'; }

# Many small files quickly: one python process writes them through the mount.
make_files() { # dir count
    python3 - "$1" "$2" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
per = 1000
for i in range(n):
    sub = os.path.join(d, "d%04d" % (i // per))
    if i % per == 0:
        os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, "f%07d" % i), "wb") as f:
        f.write(("file %d\n" % i).encode() * 8)
EOF
}

out=$(mktemp)
{
    echo "### Snapshots, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
    echo
    echo "\`scripts/bench-snapshots.sh\` (FILES=\"$FILES\"); machine: $(nproc) cores, $(uname -r)."
    echo
    echo "| files in container | snapshot create, median of 5 (ms, CLI round trip) |"
    echo "|---:|---:|"
} >"$out"
for n in $FILES; do
    c=files$n
    "$BIN" container create "$c" >/dev/null
    make_files "$MNT/$c" "$n"
    times=()
    for i in 1 2 3 4 5; do
        t0=$(ms); "$BIN" snapshot create "$c" "s$i" >/dev/null; t1=$(ms)
        times+=($(( (t1 - t0) / 1000 )))
    done
    med=$(printf '%s\n' "${times[@]}" | median)
    echo "| $n | $med (all: ${times[*]}) |" >>"$out"
done

# Deletion cost scales with what changed: 1,000 files of 256 KiB random data, snapshot,
# rewrite 1% or 50% of them, then delete the snapshot.
{
    echo
    echo "| changed after the snapshot | snapshot delete (ms) | stored bytes given back |"
    echo "|---:|---:|---:|"
} >>"$out"
for pct in 1 50; do
    c=churn$pct
    "$BIN" container create "$c" >/dev/null
    python3 - "$MNT/$c" <<'EOF'
import os, sys
for i in range(1000):
    with open(os.path.join(sys.argv[1], "f%04d" % i), "wb") as f:
        f.write(os.urandom(256 * 1024))
EOF
    "$BIN" snapshot create "$c" base >/dev/null
    python3 - "$MNT/$c" "$pct" <<'EOF'
import os, sys
n = 1000 * int(sys.argv[2]) // 100
for i in range(n):
    with open(os.path.join(sys.argv[1], "f%04d" % i), "wb") as f:
        f.write(os.urandom(256 * 1024))
EOF
    sync
    before=$(stored)
    t0=$(ms); "$BIN" snapshot delete "$c" base >/dev/null; t1=$(ms)
    after=$(stored)
    echo "| ${pct}% | $(( (t1 - t0) / 1000 )) | $(( (before - after) / 1048576 )) MiB |" >>"$out"
done

# Listing 100,000 entries: live view against the snapshot view (cold kernel cache each).
"$BIN" container create big >/dev/null
python3 - "$MNT/big" <<'EOF'
import os, sys
for i in range(100000):
    open(os.path.join(sys.argv[1], "e%06d" % i), "wb").close()
EOF
"$BIN" snapshot create big s >/dev/null
list_ms() {
    echo 3 >/proc/sys/vm/drop_caches
    local t0 t1; t0=$(ms); ls -f "$1" | wc -l >/dev/null; t1=$(ms); echo $(( (t1 - t0) / 1000 ))
}
live=() snap=()
for i in 1 2 3; do live+=($(list_ms "$MNT/big")); snap+=($(list_ms "$MNT/big/.snapshots/s")); done
{
    echo
    echo "| listing 100,000 entries (ls -f, cold) | median ms |"
    echo "|---|---:|"
    echo "| live view | $(printf '%s\n' "${live[@]}" | median) |"
    echo "| .snapshots view | $(printf '%s\n' "${snap[@]}" | median) |"
    echo
} >>"$out"
cat "$out"
if [ "$RECORD" = "--record" ]; then cat "$out" >>docs/BENCHMARKS.md; fi
rm -f "$out"
