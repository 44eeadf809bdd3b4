#!/usr/bin/env bash
# The long crash loop: SIGKILL the mount daemon at random points during concurrent writes,
# N times (default 100), checking after each restart that every fsync'ed file reads back
# byte for byte and that fsck is clean. CI runs the same test with 20 rounds.
#
#   scripts/crash-loop.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-100}
DEDUPFS_CRASH_ROUNDS=$rounds exec cargo test --release --test mount_crash \
    sigkill_during_concurrent_writes -- --nocapture
