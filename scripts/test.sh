#!/usr/bin/env bash
# Runs the whole suite: setup, every test of the workspace in release mode (FUSE mount tests
# included: they need root and /dev/fuse), then rustfmt and clippy. Runs every step even
# after a failure, prints a summary, and exits non-zero if any step failed.
#
# Tests make their temp dirs under a run directory in /tmp (TMPDIR). On exit every dedupfs
# mount under it is unmounted, so a crashed or failed test leaves no mount behind. Under CI
# (CI set, the machine is ours alone) every dedupfs mount under /tmp goes too; elsewhere
# mounts outside the run directory may belong to someone else's run and are only listed.
#
#   scripts/test.sh [extra arguments for cargo test, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "test.sh: $*"; }

# Mount points of dedupfs FUSE mounts under /tmp, one a line (octal escapes of
# /proc/mounts decoded).
dedupfs_mounts() {
    local src mnt fstype _
    grep dedupfs /proc/mounts 2>/dev/null | while read -r src mnt fstype _; do
        [[ $fstype == fuse* && $src == dedupfs* ]] || continue
        mnt=$(printf '%b' "$mnt")
        [[ $mnt == /tmp/* ]] && printf '%s\n' "$mnt"
    done || true
}

rundir=$(mktemp -d /tmp/dedupfs-test-run.XXXXXX)
# Tests run commands as an unprivileged user (uid 65534) inside the mount: the path to it
# must be traversable.
chmod 755 "$rundir"

cleanup() {
    local m left=()
    while IFS= read -r m; do
        [[ -n $m ]] || continue
        if [[ $m == "$rundir"/* || -n ${CI:-} ]]; then
            left+=("$m")
        else
            say "note: dedupfs mount $m is outside this run's directory; left alone"
        fi
    done < <(dedupfs_mounts)
    # Deepest first, so nested mounts go before their parents.
    if ((${#left[@]})); then
        printf '%s\n' "${left[@]}" | sort -r | while IFS= read -r m; do
            say "unmounting leftover mount $m"
            fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "could not unmount $m"
        done
    fi
    # --one-file-system: never reach through a mount that could not be removed.
    rm -rf --one-file-system "$rundir" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bash scripts/setup.sh

if [[ $(id -u) -ne 0 ]]; then
    say "warning: not root; FUSE mount tests may fail (they need root and /dev/fuse)"
fi

failed=()
log="$rundir/cargo-test.log"

say "cargo test --release --workspace --no-fail-fast $*"
if ! TMPDIR="$rundir" cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$log"; then
    failed+=("cargo test")
fi

say "cargo fmt --all --check"
if ! cargo fmt --all --check; then
    failed+=("cargo fmt")
fi

say "cargo clippy --all-targets -- -D warnings"
if ! cargo clippy --all-targets -- -D warnings; then
    failed+=("cargo clippy")
fi

# Totals over every test binary ("test result: ok. 12 passed; 0 failed; 1 ignored; ...").
read -r passed nfailed ignored < <(
    awk '/^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i+1) ~ /^passed/) p += $i
                if ($(i+1) ~ /^failed/) f += $i
                if ($(i+1) ~ /^ignored/) g += $i
            }
         }
         END { print p + 0, f + 0, g + 0 }' "$log"
)

echo
if ((${#failed[@]})); then
    say "FAILED: ${failed[*]}"
else
    say "all steps passed (cargo test, cargo fmt, cargo clippy)"
fi
echo "tests: $passed passed, $nfailed failed, $ignored skipped"
if ((${#failed[@]})); then
    exit 1
fi
if ((passed == 0)); then
    say "no test ran" >&2
    exit 1
fi
