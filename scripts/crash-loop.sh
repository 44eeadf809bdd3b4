#!/usr/bin/env bash
# The long crash loop: SIGKILL the mount daemon at random points during concurrent writes,
# ROUNDS times in all (default 100), checking after each restart that every fsync'ed file
# reads back byte for byte and that fsck is clean. Runs the CI crash test (20 rounds on one
# store) again and again on fresh stores: on one store the checks after each kill grow
# with everything the earlier rounds wrote.
#
#   scripts/crash-loop.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-100}
per_store=20
done_rounds=0
cargo build --release --tests >/dev/null
while ((done_rounds < rounds)); do
    batch=$((rounds - done_rounds < per_store ? rounds - done_rounds : per_store))
    echo "crash-loop: rounds $((done_rounds + 1))-$((done_rounds + batch)) of $rounds"
    DEDUPFS_CRASH_ROUNDS=$batch cargo test --release --test mount_crash \
        sigkill_during_concurrent_writes -- --nocapture 2>&1 |
        grep -E "rounds,|test result|panicked|FAILED" || true
    test "${PIPESTATUS[0]}" -eq 0 || { echo "crash-loop: FAILED"; exit 1; }
    done_rounds=$((done_rounds + batch))
done
echo "crash-loop: $rounds rounds passed"
