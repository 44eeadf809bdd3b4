#!/usr/bin/env bash
# Runs `cargo bench --bench pipeline` and prints the medians as MiB/s: a row for the pipeline
# table of docs/BENCHMARKS.md, and the PIPELINE_MIBS / PIPELINE2_MIBS settings that
# scripts/bench-mount.sh compares the mount's write rate with.
#
#   scripts/bench-pipeline.sh [extra criterion arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo bench --bench pipeline -- "$@"

python3 - <<'PY'
import json, os, platform, subprocess, time

base = "target/criterion/pipeline"
names = ["fastcdc", "fastcdc+blake3", "fastcdc+blake3+zstd1_1-thread", "fastcdc+blake3+zstd1_2-thread"]
rates = []
for name in names:
    with open(os.path.join(base, name, "new", "benchmark.json")) as f:
        throughput = json.load(f)["throughput"]["Bytes"]
    with open(os.path.join(base, name, "new", "estimates.json")) as f:
        median_ns = json.load(f)["median"]["point_estimate"]
    rates.append(throughput / 1048576 / (median_ns / 1e9))

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print()
print("medians, MiB/s: " + ", ".join("%s %.0f" % (n.replace("_", "/"), r) for n, r in zip(names, rates)))
print()
print("| %s | `%s` | %d × %s | %s | %.2f |" % (
    time.strftime("%Y-%m-%d"), commit or "?", os.cpu_count(), cpu,
    " | ".join("%.0f" % r for r in rates), rates[3] / rates[2]))
print()
print("PIPELINE_MIBS=%.0f PIPELINE2_MIBS=%.0f scripts/bench-mount.sh" % (rates[2], rates[3]))
PY
