#!/usr/bin/env bash
# Benchmarks berthd and containerd (Debian's, CRI plugin) side by side on this machine with
# berth-bench, and prints one table: figure, berth, containerd, ratio berth/containerd.
#
# Everything runs in a temp dir and on loopback: a docker-registry with the fixture images,
# containerd with its own root/state/socket/CNI config, berthd with its own root/state/socket.
# Everything started here is stopped on exit (by PID), leftover mounts under the temp dir are
# unmounted, and the CNI bridge configured for containerd is deleted.
#
# Needs root. Tunables (environment):
#   BENCH_ITERATIONS=50 BENCH_CONCURRENCY=4   lifecycle cycles per phase, pods in flight
#   BENCH_PULLS=5                             cold pulls of the 100 MiB image
#   BENCH_CONTAINERS=1000 BENCH_SCALE_PODS=10 list-scale size
#   BENCH_MEMORY_PODS=100                     pods running for the memory scenario (run
#                                             on freshly restarted daemons)
#   BENCH_SCENARIOS="lifecycle pull list-scale memory"   (also: churn, BENCH_CONTAINERS
#                                             containers created and removed between rounds)
#   BENCH_RUNTIMES="containerd berth"         order within each scenario
#   BENCH_BERTH_SHIM=embedded                 berthd's shim: embedded, or external (one
#                                             static berth-shim per pod, hack/build-shim.sh)
#   BENCH_OUT=<dir>                           keep JSON, SVG and logs here (default: ./target/bench)
#   BENCH_NO_BUILD=1                          use the binaries already built
#   BENCH_PROFILE=release                     cargo profile to build and run (debug: dev only)
#   BENCH_BERTH_LOG=                          berthd's log level (e.g. berth_runtime=debug for
#                                             the per-call phase timings in berthd.log)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

ITERATIONS=${BENCH_ITERATIONS:-50}
CONCURRENCY=${BENCH_CONCURRENCY:-4}
PULLS=${BENCH_PULLS:-5}
CONTAINERS=${BENCH_CONTAINERS:-1000}
SCALE_PODS=${BENCH_SCALE_PODS:-10}
MEMORY_PODS=${BENCH_MEMORY_PODS:-100}
SCENARIOS=${BENCH_SCENARIOS:-"lifecycle pull list-scale memory"}
RUNTIMES=${BENCH_RUNTIMES:-"containerd berth"}
BERTH_SHIM=${BENCH_BERTH_SHIM:-embedded}
OUT=${BENCH_OUT:-$REPO/target/bench}

[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }

need_pkgs=()
command -v containerd >/dev/null || need_pkgs+=(containerd)
command -v runc >/dev/null || need_pkgs+=(runc)
command -v docker-registry >/dev/null || need_pkgs+=(docker-registry)
command -v curl >/dev/null || need_pkgs+=(curl)
[ -x /bin/busybox ] || need_pkgs+=(busybox-static)
[ -x /usr/lib/cni/bridge ] || need_pkgs+=(containernetworking-plugins)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

PROFILE=${BENCH_PROFILE:-release}
build_pkgs=(-p berth-bench)
case " $RUNTIMES " in *" berth "*) build_pkgs+=(-p berth-berthd -p berth-pod-init) ;; esac
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  if [ "$PROFILE" = release ]; then cargo build --release "${build_pkgs[@]}"; else cargo build "${build_pkgs[@]}"; fi
  # berthd with `shim = "external"` runs the berth-shim next to it: the static build users get.
  case " $RUNTIMES " in *" berth "*) "$REPO/hack/build-shim.sh" "$REPO/target/$PROFILE" ;; esac
fi
BENCH=$REPO/target/$PROFILE/berth-bench
BERTHD=$REPO/target/$PROFILE/berthd

mkdir -p "$OUT"
rm -f "$OUT/berth.json" "$OUT/containerd.json"
T=$(mktemp -d /tmp/berth-bench.XXXXXX)
BRIDGE="bb$(printf '%s' "$T" | sha256sum | cut -c1-8)"
# berthd's own bridge and nft table, unique to the run (not the host-wide berth0 defaults).
BERTH_BRIDGE="bt$(printf '%s' "$T" | sha256sum | cut -c9-16)"
BERTH_NAT="bench$(printf '%s' "$T" | sha256sum | cut -c17-22)"
BERTH_CGROUP="berth-bench-$(printf '%s' "$T" | sha256sum | cut -c23-30)"
REGISTRY_PID="" CONTAINERD_PID="" BERTHD_PID="" CTRD_SUBNET="" BERTH_SUBNET=""
# containerd's shims keep sockets under /run/containerd whatever the config says: if that
# directory is ours to create, it is ours to remove.
RUN_CONTAINERD_EXISTED=0
[ -e /run/containerd ] && RUN_CONTAINERD_EXISTED=1

log() { printf '\n== %s\n' "$*" >&2; }

# Waits for PID to exit after SIGTERM, SIGKILL after 15 s.
stop_pid() {
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

# PIDs of processes whose command line mentions our temp dir: the shims our containerd
# started (they outlive it by design) and anything else we spawned.
our_pids() {
  local p
  for p in /proc/[0-9]*; do
    tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "$T" && echo "${p#/proc/}"
  done
  return 0
}

cleanup() {
  set +e
  log "cleaning up"
  [ -n "$BERTHD_PID" ] && "$BENCH" cleanup --endpoint "unix://$T/berth.sock" --call-timeout 30 >/dev/null 2>&1
  [ -n "$CONTAINERD_PID" ] && "$BENCH" cleanup --endpoint "unix://$T/containerd.sock" --call-timeout 30 >/dev/null 2>&1
  stop_pid "$BERTHD_PID"
  stop_pid "$CONTAINERD_PID"
  stop_pid "$REGISTRY_PID"
  for pid in $(our_pids); do [ "$pid" != $$ ] && stop_pid "$pid"; done
  # Deepest first: a mount under another one must go before it.
  awk -v t="$T" '$5 ~ "^"t {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  ip link del "$BRIDGE" 2>/dev/null
  ip link del "$BERTH_BRIDGE" 2>/dev/null
  nft delete table inet "$BERTH_NAT" 2>/dev/null
  for c in /sys/fs/cgroup/*/"$BERTH_CGROUP" /sys/fs/cgroup/"$BERTH_CGROUP"; do
    [ -d "$c" ] && find "$c" -depth -type d -delete 2>/dev/null
  done
  [ "$RUN_CONTAINERD_EXISTED" = 0 ] && [ -d /run/containerd ] && find /run/containerd -depth -type d -empty -delete
  cp "$T"/*.log "$OUT"/ 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# --- registry with the fixtures -------------------------------------------------------------
log "registry"
PORT=$(free_port)
REG=127.0.0.1:$PORT
mkdir -p "$T/registry"
cat >"$T/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $T/registry
  delete:
    enabled: true
http:
  addr: $REG
EOF
docker-registry serve "$T/registry.yml" >"$T/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 100); do curl -fs "http://$REG/v2/" >/dev/null && break; sleep 0.1; done
"$BENCH" push-fixtures --registry "$REG"
IMAGE=$REG/busybox:1.0
BIG=$REG/big:1.0

# --- containerd ---------------------------------------------------------------------------
start_containerd() {
  log "containerd $(containerd --version | awk '{print $3}')"
  mkdir -p "$T/ctrd-root" "$T/ctrd-state" "$T/cni" "$T/ipam"
  # A /16 no route on this machine uses yet (kept across restarts: the bridge has it).
  local n subnet=$CTRD_SUBNET
  for n in $(seq 200 250); do
    [ -n "$subnet" ] && break
    ip route | grep -q "^10\.$n\." || subnet=10.$n.0.0/16
  done
  CTRD_SUBNET=$subnet
  cat >"$T/cni/10-bench.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "berth-bench",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "$subnet" }]], "dataDir": "$T/ipam" }
    }
  ]
}
EOF
  cat >"$T/containerd.toml" <<EOF
version = 2
root = "$T/ctrd-root"
state = "$T/ctrd-state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "$T/containerd.sock"
[ttrpc]
  address = "$T/containerd.sock.ttrpc"
[debug]
  address = ""
  level = "warn"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$T/ctrd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$REG/pause:3.9"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$T/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."$REG"]
    endpoint = ["http://$REG"]
EOF
  containerd --config "$T/containerd.toml" >"$T/containerd.log" 2>&1 &
  CONTAINERD_PID=$!
  wait_cri "unix://$T/containerd.sock" "$CONTAINERD_PID" "$T/containerd.log"
}

# --- berthd -------------------------------------------------------------------------------
start_berthd() {
  log "berthd"
  mkdir -p "$T/berth-root" "$T/berth-state"
  local n subnet=$BERTH_SUBNET
  for n in $(seq 150 199); do  # containerd's CNI takes 200-250
    [ -n "$subnet" ] && break
    ip route | grep -q "^10\.$n\." || subnet=10.$n.0.0/16
  done
  BERTH_SUBNET=$subnet
  printf '[runtime]\nshim = "%s"\ncgroup_parent = "/%s"\n[network]\nbridge = "%s"\nsubnet = "%s"\nnat_table = "%s"\n' \
    "$BERTH_SHIM" "$BERTH_CGROUP" "$BERTH_BRIDGE" "$subnet" "$BERTH_NAT" >"$T/berth.toml"
  "$BERTHD" --config "$T/berth.toml" --root "$T/berth-root" --state "$T/berth-state" \
    --listen "$T/berth.sock" --metrics-address "" ${BENCH_BERTH_LOG:+--log-level "$BENCH_BERTH_LOG"} \
    >"$T/berthd.log" 2>&1 &
  BERTHD_PID=$!
  wait_cri "unix://$T/berth.sock" "$BERTHD_PID" "$T/berthd.log"
}

# Waits until the CRI endpoint answers (the sweep lists pods and containers).
wait_cri() {
  local ep=$1 pid=$2 logf=$3
  for _ in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || { echo "daemon exited:" >&2; tail -20 "$logf" >&2; return 1; }
    "$BENCH" cleanup --endpoint "$ep" --call-timeout 5 >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "no CRI on $ep" >&2; tail -20 "$logf" >&2; return 1
}

endpoint() { case $1 in berth) echo "unix://$T/berth.sock" ;; containerd) echo "unix://$T/containerd.sock" ;; esac; }
daemon_pid() { case $1 in berth) echo "$BERTHD_PID" ;; containerd) echo "$CONTAINERD_PID" ;; esac; }
shim_names() { case $1 in berth) echo "--shim-name berth-shim" ;; containerd) echo "--shim-name containerd-shim-runc-v2" ;; esac; }

restart_daemon() {
  case $1 in
    berth) stop_pid "$BERTHD_PID"; start_berthd ;;
    containerd) stop_pid "$CONTAINERD_PID"; start_containerd ;;
  esac
}

case " $RUNTIMES " in *" containerd "*) start_containerd ;; esac
case " $RUNTIMES " in *" berth "*) start_berthd ;; esac

FAILED=()
run() {
  local rt=$1 scenario=$2; shift 2
  log "$scenario on $rt"
  if ! "$BENCH" "$scenario" --endpoint "$(endpoint "$rt")" --label "$rt" --json "$OUT/$rt.json" \
      --image "$IMAGE" "$@"; then
    echo "!! $scenario failed on $rt" >&2
    FAILED+=("$scenario/$rt")
  fi
}

for scenario in $SCENARIOS; do
  for rt in $RUNTIMES; do
    case $scenario in
      lifecycle) run "$rt" lifecycle -n "$ITERATIONS" -c "$CONCURRENCY" ;;
      pull) run "$rt" pull --pull-image "$BIG" -m "$PULLS" ;;
      list-scale) run "$rt" list-scale --containers "$CONTAINERS" --pods "$SCALE_PODS" ;;
      churn) run "$rt" churn -n "$CONTAINERS" ;;
      memory)
        # Fresh daemons, so that what earlier scenarios left in their heaps is not counted.
        restart_daemon "$rt"
        # shellcheck disable=SC2046
        run "$rt" memory --daemon-pid "$(daemon_pid "$rt")" $(shim_names "$rt") \
          --shim-match "$T" --pods "$MEMORY_PODS" ;;
      *) echo "unknown scenario $scenario" >&2; exit 2 ;;
    esac
  done
done

for rt in berth containerd; do [ -f "$OUT/$rt.json" ] || echo '{"runtime":"'$rt'","figures":[]}' >"$OUT/$rt.json"; done
log "berth vs containerd (lower is better except pods/s and 1/s)"
"$BENCH" compare "$OUT/berth.json" "$OUT/containerd.json" | tee "$OUT/compare.txt"
"$BENCH" compare --markdown "$OUT/berth.json" "$OUT/containerd.json" >"$OUT/compare.md"
"$BENCH" plot -o "$OUT/latency.svg" "$OUT/berth.json" "$OUT/containerd.json"
echo "machine: $(nproc) vCPU, kernel $(uname -r), $(stat -fc %T /sys/fs/cgroup) at /sys/fs/cgroup"
echo "results in $OUT (JSON, compare.md, latency.svg, daemon logs)"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
