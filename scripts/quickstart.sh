#!/usr/bin/env bash
# From a fresh machine to a mounted dedupfs: installs what is missing, builds the release
# binary, creates a store (unless there already is one) and mounts it.
#
#   DEDUPFS_STORE   store directory   (default ~/.local/share/dedupfs/store)
#   DEDUPFS_MOUNT   mount point       (default ~/dedupfs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

store=${DEDUPFS_STORE:-$HOME/.local/share/dedupfs/store}
mnt=${DEDUPFS_MOUNT:-$HOME/dedupfs}
bin="$repo/target/release/dedupfs"

say() { echo "quickstart: $*"; }

bash scripts/setup.sh
say "cargo build --release"
cargo build --release

if [[ -f "$store/dedupfs-store" ]]; then
    say "using the existing store in $store"
else
    "$bin" init "$store"
fi

mkdir -p "$mnt"
mnt=$(cd "$mnt" && pwd -P)
# Field 5 of mountinfo is the mount point; after the "-" separator come type and source.
source=$(awk -v m="$mnt" '$5 == m { for (i = 6; i <= NF; i++) if ($i == "-") { print $(i + 2); exit } }' /proc/self/mountinfo)
if [[ $source == dedupfs* ]]; then
    say "$mnt is already a dedupfs mount; leaving it as it is"
elif mountpoint -q "$mnt"; then
    say "$mnt is already a mount point of something else; set DEDUPFS_MOUNT to another directory" >&2
    exit 1
else
    "$bin" mount "$store" "$mnt"
    say "mounted $store on $mnt"
fi

cat <<USAGE

dedupfs is mounted on $mnt. Its top-level directories are containers:

  export DEDUPFS_STORE=$store   # or pass --store to each command
  $bin container create backups
  cp -a /etc $mnt/backups/
  $bin stats                 # logical vs stored bytes, dedup and compression ratios
  $bin container list

Unmount (the store stays; mount it again with \`$bin mount $store $mnt\`):

  $bin umount $mnt

Check a store that is not mounted:

  $bin fsck $store
USAGE
