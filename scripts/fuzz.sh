#!/usr/bin/env bash
# Fuzzes every decoder of on-disk records and control-socket messages (issue 4, item 10):
# cargo-fuzz (libFuzzer) on the nightly toolchain, SECONDS per target (default 150: four
# targets, ten minutes in all). Targets (fuzz/fuzz_targets/):
#   decode_records     record and key decoders, JSON records: no panic, round trips
#   control_request    any control-socket line gets a reply
#   fsck_garbage       a garbage key or value in any family: fsck reports, never panics
#   namespace_garbage  a garbage value in place of a real record: operations fail, no panic
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${1:-150}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(decode_records control_request fsck_garbage namespace_garbage)
FUZZ_ROOT=${FUZZ_ROOT:-/var/tmp/cargo-fuzz-root}
export PATH="$FUZZ_ROOT/bin:$PATH"
rustup toolchain list | grep -q nightly || { echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --root "$FUZZ_ROOT"
cd fuzz
cargo +nightly fuzz build -O
for t in "${TARGETS[@]}"; do
    echo "== $t: ${SECONDS_PER} s"
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$SECONDS_PER" -rss_limit_mb=4096 2>&1 |
        grep -E "^#[0-9]+.*(DONE|pulse)|Done|ERROR|panicked|SUMMARY" | tail -3
done
echo "fuzz.sh: all targets ran clean"
