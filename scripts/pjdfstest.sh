#!/usr/bin/env bash
# POSIX conformance: runs the pjdfstest suite (the Rust rewrite, crate `pjdfstest`) inside a
# container of a fresh dedupfs mount (-o allow_other,default_permissions), unmounts, runs
# fsck, and prints passed/failed/skipped. Failures explained in docs/CONFORMANCE.md are
# listed in EXPECTED below and count as "expected failures"; any other failure, an expected
# one that passes, or an fsck problem makes the script exit 1. Needs root and /dev/fuse.
#
#   scripts/pjdfstest.sh [PATTERN...]   only tests whose name contains a PATTERN (e.g. chmod)
#
# Environment: DEDUPFS_BIN (a built dedupfs; default: cargo build --release, then
# target/release/dedupfs), PJDFSTEST (the runner; default: pjdfstest on PATH, else
# `cargo install pjdfstest` with its build in /var/tmp), PJDFSTEST_KEEP=1 keeps the
# work directory (store, log, config) for a look afterwards.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

say() { echo "pjdfstest.sh: $*"; }

# The pjdfstest release this script and docs/CONFORMANCE.md were checked against.
PJDFSTEST_VERSION=0.2.2

# Test cases that fail on dedupfs for a reason docs/CONFORMANCE.md gives, one per line.
EXPECTED=(
)

[[ $(id -u) -eq 0 ]] || { say "needs root (the suite switches users and uses mknod)" >&2; exit 1; }
[[ -e /dev/fuse ]] || { say "/dev/fuse is missing" >&2; exit 1; }

# --- tools -------------------------------------------------------------------------------
if [[ -z ${DEDUPFS_BIN:-} ]]; then
    scripts/setup.sh >/dev/null
    cargo build --release --quiet
    DEDUPFS_BIN=$repo/target/release/dedupfs
fi
dedupfs=$DEDUPFS_BIN

pjdfstest=${PJDFSTEST:-$(command -v pjdfstest || true)}
if [[ -z $pjdfstest ]]; then
    # exacl (POSIX ACLs) links libacl.
    if ! dpkg-query -W -f='${Status}' libacl1-dev 2>/dev/null | grep -q 'install ok installed'; then
        say "installing libacl1-dev"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libacl1-dev acl
    fi
    say "installing pjdfstest $PJDFSTEST_VERSION (cargo install, build in /var/tmp)"
    CARGO_TARGET_DIR=/var/tmp/pjdfstest-build cargo install --quiet --locked \
        --version "$PJDFSTEST_VERSION" pjdfstest
    pjdfstest=$(command -v pjdfstest || echo "$HOME/.cargo/bin/pjdfstest")
fi

# The suite switches to two unprivileged users, each with its own group: nobody (whose
# group is nogroup on Debian) and tests, created here if missing.
if ! getent passwd tests >/dev/null; then
    say "creating the system user 'tests' for the suite"
    useradd --system --user-group --no-create-home --home-dir / \
        --shell /usr/sbin/nologin tests
fi

# --- store and mount ---------------------------------------------------------------------
work=$(mktemp -d /var/tmp/dedupfs-pjdfstest.XXXXXX)
store=$work/store
mnt=$work/mnt
secondary=$work/secondary # another filesystem (/var/tmp), for the EXDEV cases
mkdir -p "$mnt" "$secondary"
chmod 755 "$work" "$mnt" "$secondary"

cleanup() {
    if grep -qF " $mnt " /proc/mounts; then
        "$dedupfs" umount "$mnt" >/dev/null 2>&1 || fusermount3 -u -z "$mnt" || true
    fi
    if [[ ${PJDFSTEST_KEEP:-0} == 1 ]]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

"$dedupfs" init "$store" >/dev/null
"$dedupfs" mount "$store" "$mnt" -o allow_other,default_permissions
"$dedupfs" container create c --store "$store" >/dev/null
chmod 755 "$mnt/c"

# The EROFS cases remount the filesystem read-only with `mount -o remount,ro MNT`. util-linux
# hands a remount of a "fuse" mount to /sbin/mount.fuse, which takes the source
# ("dedupfs:STORE") for a program to run and fails; `mount -i` (no helper) makes the
# kernel do it (see docs/CONFORMANCE.md), so the suite finds that `mount` first on PATH.
mkdir -p "$work/bin"
printf '#!/bin/sh\nexec %s -i "$@"\n' "$(command -v mount)" >"$work/bin/mount"
chmod 755 "$work/bin/mount"

# naptime: the suite sleeps this long between changes it compares timestamps across;
# dedupfs keeps nanoseconds, so a short nap suffices. posix_fallocate: glibc emulates it
# (dedupfs implements no fallocate(2)), which is what applications get.
nobody_group=$(id -gn nobody)
write_config() { # FILE ALLOW_REMOUNT
    {
        echo '[features]'
        echo 'posix_fallocate = {}'
        echo 'rename_ctime = {}'
        echo 'utime_now = {}'
        echo 'utimensat = {}'
        echo '[settings]'
        echo 'naptime = 0.01'
        echo "allow_remount = $2"
        printf 'expected_failures = ['
        for t in "${EXPECTED[@]}"; do printf '"%s", ' "$t"; done
        echo ']'
        echo '[dummy_auth]'
        echo "entries = [[\"nobody\", \"$nobody_group\"], [\"tests\", \"tests\"]]"
    } >"$1"
}

# --- run ---------------------------------------------------------------------------------
# Without patterns: pass 1 runs every case but the EROFS ones, pass 2 only those. A remount
# read-only fails with EBUSY while any file of the mount is open for writing, and
# posix_fallocate::affected_only_create_flags leaks a descriptor it opened O_RDWR (pjdfstest
# 0.2.2), so the EROFS cases after it in the same process could not remount.
passes=()
if (($#)); then
    write_config "$work/all.toml" true
    passes+=("all:$work/all.toml")
else
    write_config "$work/main.toml" false
    write_config "$work/erofs.toml" true
    passes+=("main:$work/main.toml" "erofs:$work/erofs.toml")
fi

say "running $("$pjdfstest" --version) in $mnt/c"
start=$SECONDS
suite_rc=0
passed=0 failed=0 skipped=0 expected=0 remount_skips=0
for p in "${passes[@]}"; do
    name=${p%%:*} conf=${p#*:}
    log=$work/pjdfstest-$name.log
    patterns=("$@")
    [[ $name == erofs ]] && patterns=(erofs)
    set +e
    PATH=$work/bin:$PATH "$pjdfstest" -c "$conf" -p "$mnt/c" -s "$secondary" "${patterns[@]}" \
        >"$log" 2>&1
    rc=$?
    set -e
    ((rc == 0)) || suite_rc=$rc
    # The runner colours its output even into a file.
    sed -i 's/\x1b\[[0-9;]*m//g' "$log"
    grep -E 'FAILED|PASSED UNEXPECTEDLY|failed as expected' -A3 "$log" || true
    summary=$(grep -E '^Summary:' "$log" || true)
    [[ -n $summary ]] || { tail -n 20 "$log"; say "pass $name: the runner printed no summary" >&2; exit 1; }
    say "pass $name: $summary"
    num() { sed -nE "s/.* ([0-9]+) $1.*/\\1/p" <<<"$summary"; }
    passed=$((passed + $(num passed))) failed=$((failed + $(num failed)))
    skipped=$((skipped + $(num skipped))) expected=$((expected + $(num 'expected failures')))
    if [[ $name == main ]]; then
        remount_skips=$(grep -c 'allow_remount' "$log" || true)
    fi
done
# The EROFS cases skipped in pass 1 ran in pass 2.
skipped=$((skipped - remount_skips))
elapsed=$((SECONDS - start))

"$dedupfs" umount "$mnt"
fsck_out=$("$dedupfs" fsck "$store" 2>&1) && fsck_rc=0 || fsck_rc=$?
echo "$fsck_out" | tail -n 3

say "${elapsed}s; expected failures (docs/CONFORMANCE.md): $expected"
echo "pjdfstest: $passed passed, $failed failed, $skipped skipped"

if ((fsck_rc != 0)); then
    say "fsck FAILED" >&2
    exit 1
fi
if ((suite_rc != 0)); then
    say "FAILED: a failure not explained in docs/CONFORMANCE.md, or an expected one now passes" >&2
    exit 1
fi
say "pass"
