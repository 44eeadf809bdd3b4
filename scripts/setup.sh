#!/usr/bin/env bash
# Installs what dedupfs needs to build and test, if it is missing; checks /dev/fuse.
# Idempotent: on a machine that has everything it changes nothing and runs no apt-get.
#
#   scripts/setup.sh           build and test dependencies
#   scripts/setup.sh --bench   also fio and bindfs, for scripts/bench-mount.sh
set -euo pipefail

usage() {
    sed -n '2,7s/^# \{0,1\}//p' "$0"
}

bench=0
for arg in "$@"; do
    case "$arg" in
        --bench) bench=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "setup: $*"; }

# librocksdb-dev: linked dynamically (.cargo/config.toml); libclang-dev and clang: bindgen
# for rocksdb's bindings; fuse3: fusermount3; attr: getfattr/setfattr used by tests.
packages=(librocksdb-dev libclang-dev clang fuse3 libfuse3-dev pkg-config attr)
if ((bench)); then
    packages+=(fio bindfs)
fi

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { say "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    say "installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    say "packages present: ${packages[*]}"
fi

# The Rust toolchain comes from rustup (Debian's cargo is older than rust-version in Cargo.toml).
if ! command -v cargo >/dev/null; then
    say "cargo not found: install Rust with rustup (https://rustup.rs), then run this again" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null; then
            say "adding rustup component $component"
            rustup component add "$component"
        else
            say "cargo ${component/rustfmt/fmt} is missing and rustup is not installed" >&2
            exit 1
        fi
    fi
done

if [[ ! -c /dev/fuse ]]; then
    # The module may just not be loaded yet.
    modprobe fuse 2>/dev/null || true
fi
if [[ ! -c /dev/fuse ]]; then
    say "/dev/fuse is missing: FUSE mounts cannot work here (load the fuse module, or give the container --device /dev/fuse)" >&2
    exit 1
fi
say "ok: /dev/fuse present, $(cargo --version)"
