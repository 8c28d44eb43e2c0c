#!/usr/bin/env bash
# Builds `berth-shim`, the external shim (one process per pod with `shim = "external"`), the
# way it should run: a static executable from the `shim` profile (size-optimised, fat LTO,
# stripped; see the root Cargo.toml), and installs it next to berthd, where berthd looks for
# it (`[runtime] shim_binary = ""`).
#
# Why static: every pod runs its own shim, and a shim's resident memory is mostly the code
# pages it maps. Linked dynamically it maps glibc's shared text (over 1 MB resident per
# process, as RSS counts it); linked statically it maps only the part of glibc it uses.
# Why not position-independent: a static PIE relocates itself at start, which dirties (makes
# private to each shim) its relocated data and keeps the relocation table resident; a fixed
# address has nothing to relocate (as Go's static binaries, containerd's shims among them).
# Stack, heap and mmap addresses are still randomised.
#
# Usage: hack/build-shim.sh [destination directory]
#   default destination: target/release (next to `cargo build --release -p berth-berthd`'s
#   berthd). Build berthd first: a later `cargo build --release` of the whole workspace
#   replaces target/release/berth-shim with the plain dynamic build. Alternatively point
#   `[runtime] shim_binary` at the built file (printed at the end).
# The build itself lands in target/<host triple>/shim/berth-shim.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-target/release}
triple=$(rustc -vV | sed -n 's/^host: //p')
case $triple in
  *-linux-gnu) ;;
  *) echo "build-shim.sh: static glibc builds need a *-linux-gnu host, not $triple" >&2; exit 1 ;;
esac
# `cargo rustc` puts the flags on the berth-shim binary only: with fat LTO its final
# compilation generates the code of every crate, while build scripts and proc-macros (which
# cannot link statically) are left alone. The explicit --target keeps these artifacts apart
# from the normal host builds.
cargo rustc --profile shim -p berth-shim --bin berth-shim --target "$triple" -- \
  -C target-feature=+crt-static -C relocation-model=static
bin=target/$triple/shim/berth-shim
if file "$bin" 2>/dev/null | grep -q 'dynamically linked'; then
  echo "build-shim.sh: $bin is not static" >&2
  exit 1
fi
mkdir -p "$dest"
# Copy, then rename: running shims keep executing the old file.
cp "$bin" "$dest/.berth-shim.tmp"
mv -f "$dest/.berth-shim.tmp" "$dest/berth-shim"
echo "berth-shim: $(stat -c %s "$bin") bytes, static; installed as $dest/berth-shim (built: $bin)"
