#!/usr/bin/env bash
# Data integrity under random operations: the fsx file-system exerciser (crate `fsx`) on a
# file in a container of a fresh dedupfs mount, with mmap reads and writes, in two passes
# with a remount between them:
#
#   1. fsx runs OPS/2 operations on MNT/c/fsx.file; every read is checked against its model.
#   2. The page cache is dropped and the file copied out; umount; mount again; the file must
#      read back identical to the copy (fsx cannot resume a run: it truncates at start).
#   3. fsx runs OPS/2 more operations (another seed) on the same file; umount; fsck clean.
#
#   scripts/fsx.sh [OPS]   total operations, default 1000000
#
# Environment: DEDUPFS_BIN (a built dedupfs; default: cargo build --release, then
# target/release/dedupfs), FSX (the exerciser; default: fsx 0.3.2 built by this script
# with one fix, see below), FSX_SEED (seed of pass 1, default 1; pass 2 uses +1),
# FSX_CHUNK_AVG (the store's average chunk size, `init --chunk-avg`: 4K puts over a
# hundred chunks in the 1 MiB file instead of about ten, so nearly every write re-chunks
# across several chunk boundaries), FSX_KEEP=1 (keep the work directory: store, logs, artifacts).
# Needs root and /dev/fuse. Takes about 20 minutes for the default 1,000,000 operations.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

say() { echo "fsx.sh: $(date +%T) $*"; }

# The fsx release this script was checked against.
FSX_VERSION=0.3.2

ops=${1:-1000000}
if ! [[ $ops =~ ^[0-9]+$ ]] || ((ops < 2)); then
    echo "usage: scripts/fsx.sh [OPS]" >&2
    exit 2
fi
pass1=$((ops / 2))
pass2=$((ops - pass1))
seed=${FSX_SEED:-1}

[[ $(id -u) -eq 0 ]] || { say "needs root (mount, drop_caches)" >&2; exit 1; }
[[ -e /dev/fuse ]] || { say "/dev/fuse is missing" >&2; exit 1; }

# --- tools -------------------------------------------------------------------------------
if [[ -z ${DEDUPFS_BIN:-} ]]; then
    scripts/setup.sh >/dev/null
    cargo build --release --quiet
    DEDUPFS_BIN=$repo/target/release/dedupfs
fi
dedupfs=$DEDUPFS_BIN

# fsx 0.3.2 never unmaps what a mapread mapped: the mappings pile up (one per mapread),
# every truncate of the file then walks all of them in the kernel, the run slows down
# quadratically, and mmap fails with ENOMEM once they reach vm.max_map_count (65530). So the script builds fsx from the crate's source with the one
# missing munmap added (docs/CONFORMANCE.md, "fsx"), in /var/tmp, apart from any fsx on PATH.
fsx_root=/var/tmp/fsx-$FSX_VERSION-munmap
fsx=${FSX:-$fsx_root/bin/fsx}
if [[ ! -x $fsx ]]; then
    say "building fsx $FSX_VERSION with the mapread munmap fix in $fsx_root"
    src=$(mktemp -d /var/tmp/fsx-src.XXXXXX)
    mkdir -p "$src/fetch/src"
    printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nfsx = "=%s"\n' \
        "$FSX_VERSION" >"$src/fetch/Cargo.toml"
    echo 'fn main() {}' >"$src/fetch/src/main.rs"
    (cd "$src/fetch" && cargo fetch --quiet)
    crate=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "fsx-$FSX_VERSION.crate" |
        head -n 1)
    tar -xzf "$crate" -C "$src"
    perl -0pi -e 's/(            self\.check_eofpage\(offset, p\.as_ptr\(\), size\);\n)(        \}\n    \}\n\n    fn domapwrite)/$1            munmap(p, map_size).unwrap();\n$2/' \
        "$src/fsx-$FSX_VERSION/src/main.rs"
    [[ $(grep -c 'munmap(p, map_size)' "$src/fsx-$FSX_VERSION/src/main.rs") -eq 2 ]] ||
        { say "could not patch fsx $FSX_VERSION's domapread" >&2; exit 1; }
    CARGO_TARGET_DIR=$src/target cargo install --quiet --locked --path "$src/fsx-$FSX_VERSION" \
        --root "$fsx_root"
    rm -rf "$src"
fi

# --- store and mount ---------------------------------------------------------------------
work=$(mktemp -d /var/tmp/dedupfs-fsx.XXXXXX)
store=$work/store
mnt=$work/mnt
mkdir -p "$mnt" "$work/artifacts"
file=$mnt/c/fsx.file

cleanup() {
    if grep -qF " $mnt " /proc/mounts; then
        "$dedupfs" umount "$mnt" >/dev/null 2>&1 || fusermount3 -u -z "$mnt" || true
    fi
    if [[ ${FSX_KEEP:-0} == 1 ]]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# Every operation fsx has. punch_hole is fallocate(2) PUNCH_HOLE|KEEP_SIZE, which dedupfs
# implements; posix_fallocate goes through glibc's emulation (writes: dedupfs answers the
# reserving modes EOPNOTSUPP), sendfile and copy_file_range through the kernel's generic paths.
# A 1 MiB file spans about ten chunks at the default 64 KiB average, so writes land inside,
# across and at the ends of chunks and re-chunking is exercised.
cat >"$work/fsx.toml" <<'EOF'
flen = 1048576
[weights]
close_open = 1
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 5
fsync = 1
fdatasync = 1
posix_fallocate = 1
punch_hole = 1
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
EOF

mount_store() {
    "$dedupfs" mount "$store" "$mnt" -o allow_other,default_permissions
}

# Runs one fsx pass; prints every 50,000th operation as progress, and everything that is
# not an operation line (fsx's failure report: the failing read, the last operations).
run_pass() { # NAME SEED OPS
    local name=$1 s=$2 n=$3 start=$SECONDS rc
    say "$name: fsx -N $n -S $s on $file"
    set +e
    "$fsx" -v -N "$n" -S "$s" -f "$work/fsx.toml" -P "$work/artifacts" "$file" 2>&1 |
        awk -v name="$name" '
            /^\[INFO/ { if ($3 % 50000 == 0) { print name ": op " $3; fflush() } ; next }
            { print; fflush() }' | tee -a "$work/fsx.log"
    rc=${PIPESTATUS[0]}
    set -e
    local t=$((SECONDS - start))
    if ((rc == 0)); then
        say "$name: $n ops in ${t}s ($((n / (t > 0 ? t : 1))) ops/s)"
    else
        say "$name: fsx exited $rc after ${t}s"
    fi
    return "$rc"
}

"$dedupfs" init "$store" ${FSX_CHUNK_AVG:+--chunk-avg "$FSX_CHUNK_AVG"} >/dev/null
mount_store
"$dedupfs" container create c --store "$store" >/dev/null
total_start=$SECONDS

run_pass "pass 1" "$seed" "$pass1" || { say "FAILED in pass 1" >&2; exit 1; }

# What the daemon serves, not the kernel's page cache, is what must survive the remount.
sync
echo 3 >/proc/sys/vm/drop_caches
cp "$file" "$work/before-remount"
before=$(sha256sum <"$work/before-remount" | cut -d' ' -f1)
size=$(stat -c %s "$work/before-remount")
"$dedupfs" umount "$mnt"
mount_store
after=$(sha256sum <"$file" | cut -d' ' -f1)
if [[ $before != "$after" ]] || ! cmp "$work/before-remount" "$file"; then
    say "FAILED: $file differs after the remount ($size bytes, sha256 $before before, $after after)" >&2
    exit 1
fi
say "remount: $size bytes read back identical (sha256 ${before:0:16}…)"

run_pass "pass 2" "$((seed + 1))" "$pass2" || { say "FAILED in pass 2" >&2; exit 1; }

"$dedupfs" umount "$mnt"
fsck_out=$("$dedupfs" fsck "$store" 2>&1) && fsck_rc=0 || fsck_rc=$?
echo "$fsck_out" | tail -n 3
((fsck_rc == 0)) || { say "FAILED: fsck" >&2; exit 1; }
errors=$(grep -ciE '\b(error|panic)' "$store/dedupfs.log" || true)
say "daemon log: $errors error lines"
say "pass: $ops operations with mmap, remount after $pass1, fsck clean, $((SECONDS - total_start))s"
