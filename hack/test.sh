#!/usr/bin/env bash
# Runs berth's whole test suite: unit tests and the end-to-end tests (real berthd, real
# registry, real runc). Needs root (mounts, namespaces, cgroups). Installs what the tests need
# when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v runc >/dev/null || need_pkgs+=(runc)
command -v crun >/dev/null || need_pkgs+=(crun)
command -v docker-registry >/dev/null || need_pkgs+=(docker-registry)
command -v protoc >/dev/null || need_pkgs+=(protobuf-compiler)
[ -x /bin/busybox ] || need_pkgs+=(busybox-static)
[ -x /usr/lib/cni/bridge ] || [ -x /opt/cni/bin/bridge ] || need_pkgs+=(containernetworking-plugins)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if [ "${BERTH_LINT:-1}" = 1 ]; then
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --quiet -- -D warnings
fi

# The end-to-end tests start the berthd binary: build it first.
cargo build --workspace --bins --quiet
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
