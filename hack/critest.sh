#!/usr/bin/env bash
# Run the CRI validation suite (critest, kubernetes-sigs/cri-tools) against berthd, offline.
#
#   hack/critest.sh [options] CRITEST_BINARY [-- critest args...]
#
# Options:
#   --bin DIR        directory with berthd, berth-shim, berth-pod-init (default: target/debug
#                    of this checkout)
#   --shim MODE      embedded | external   ([runtime] shim)
#   --config FILE    extra TOML appended to the generated berth.toml (may not repeat
#                    tables the script writes: [registry.mirrors], [runtime])
#   --crictl PATH    crictl used for leftover cleanup (default: next to critest, else PATH)
#   --keep-logs DIR  copy berthd.log and registry.log into DIR (default: don't keep)
#   --busybox PATH   busybox for the fixture images (default: Debian's dynamic busybox,
#                    fetched with `apt-get download busybox`, else /bin/busybox; the static
#                    one runs applets inside its shell, so the MaskedPaths spec then fails)
#
# What it does: makes a private network namespace, starts a docker-registry (CNCF
# distribution, /usr/bin/docker-registry) on 127.0.0.1 inside it, pushes the fixture images
# built by hack/critest-images.py, starts berthd in the netns with temp root/state dirs, its own
# cgroup parent and registry mirrors for every host critest names, runs critest there, then
# cleans everything up (also on failure). Exits with critest's exit code. It never builds
# cri-tools; build critest/crictl yourself (see the report in the lead's notes).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
bin="$repo/target/debug"
shim=""
extra_config=""
crictl=""
keep_logs=""
busybox=""
critest=""
critest_args=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) bin=$2; shift 2 ;;
        --shim) shim=$2; shift 2 ;;
        --config) extra_config=$2; shift 2 ;;
        --crictl) crictl=$2; shift 2 ;;
        --keep-logs) keep_logs=$2; shift 2 ;;
        --busybox) busybox=$2; shift 2 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        --) shift; critest_args+=("$@"); break ;;
        *)
            if [[ -z "$critest" ]]; then critest=$1; shift
            else critest_args+=("$1"); shift; fi ;;
    esac
done
[[ -n "$critest" && -x "$critest" ]] || { echo "usage: $0 [--bin DIR] [--shim embedded|external] [--config FILE] CRITEST [-- args]" >&2; exit 2; }
critest=$(readlink -f "$critest")
bin=$(readlink -f "$bin")
for b in berthd berth-shim berth-pod-init; do
    [[ -x "$bin/$b" ]] || { echo "missing $bin/$b" >&2; exit 2; }
done
if [[ -z "$crictl" ]]; then
    if [[ -x "$(dirname "$critest")/crictl" ]]; then crictl="$(dirname "$critest")/crictl"
    else crictl=$(command -v crictl || true); fi
fi
[[ $EUID -eq 0 ]] || { echo "must run as root" >&2; exit 2; }
command -v docker-registry >/dev/null || { echo "docker-registry not installed (apt-get install docker-registry)" >&2; exit 2; }

id="critest-$$"
netns="berth-$id"
tmp=$(mktemp -d "/tmp/berth-$id.XXXXXX")
cgparent="/berth-$id"
port=5000
sock="$tmp/state/berth.sock"
berthd_pid=""
registry_pid=""
rc=1

log() { echo "[critest.sh] $*" >&2; }

cleanup() {
    set +e
    trap - EXIT INT TERM
    log "cleaning up"
    if [[ -n "$berthd_pid" ]] && kill -0 "$berthd_pid" 2>/dev/null; then
        if [[ -n "$crictl" && -S "$sock" ]]; then
            timeout 120 nsenter --net="/run/netns/$netns" -- "$crictl" --timeout 60s -r "unix://$sock" rmp -fa >/dev/null 2>&1
        fi
        kill -TERM "$berthd_pid"
        for _ in $(seq 1 60); do kill -0 "$berthd_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$berthd_pid" 2>/dev/null
        wait "$berthd_pid" 2>/dev/null
    fi
    if [[ -n "$registry_pid" ]] && kill -0 "$registry_pid" 2>/dev/null; then
        kill -TERM "$registry_pid"; wait "$registry_pid" 2>/dev/null
    fi
    # Leftover processes in our cgroup parent (shims, containers): kill them by pid.
    for hier in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
        d="${hier%/}$cgparent"
        [[ -d "$d" ]] || continue
        for p in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u); do
            kill -KILL "$p" 2>/dev/null
        done
    done
    # Leftover processes running inside our netns.
    for p in $(ip netns pids "$netns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    sleep 0.5
    if [[ -n "$keep_logs" ]]; then
        mkdir -p "$keep_logs"
        cp -f "$tmp/berthd.log" "$keep_logs/" 2>/dev/null
        cp -f "$tmp/registry.log" "$keep_logs/" 2>/dev/null
    fi
    # Unmount everything under the temp dir, deepest first (several passes for stacked mounts).
    for _ in 1 2 3 4 5; do
        mapfile -t mnts < <(awk -v t="$tmp" 'index($5, t) == 1 { print $5 }' /proc/self/mountinfo | sort -r | uniq)
        [[ ${#mnts[@]} -eq 0 ]] && break
        for m in "${mnts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
    done
    # Namespace pin files (netns etc.) may be bind-mounted elsewhere too, e.g. /run/netns.
    ip netns del "$netns" 2>/dev/null
    # Remove the cgroup parent in every hierarchy, deepest first.
    for hier in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
        d="${hier%/}$cgparent"
        [[ -d "$d" ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    rm -rf "$tmp"
    log "exit $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'rc=130; exit 130' INT TERM

mkdir -p "$tmp/root" "$tmp/state" "$tmp/registry"
ip netns add "$netns"
# Processes join the netns with nsenter, not "ip netns exec": the latter also unshares the
# mount namespace and mounts a fresh /sys, hiding /sys/fs/cgroup from runc.
ip -n "$netns" link set lo up

# --- registry ---------------------------------------------------------------
cat > "$tmp/registry.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $tmp/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
nsenter --net="/run/netns/$netns" -- docker-registry serve "$tmp/registry.yml" >"$tmp/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 1 50); do
    nsenter --net="/run/netns/$netns" -- python3 -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:$port/v2/',timeout=1)" 2>/dev/null && break
    sleep 0.2
done
if [[ -z "$busybox" ]]; then
    busybox=/bin/busybox
    if (cd "$tmp" && apt-get download -qq busybox >/dev/null 2>&1) \
        && dpkg-deb -x "$tmp"/busybox_*.deb "$tmp/busybox-deb" \
        && [[ -x "$tmp/busybox-deb/bin/busybox" ]]; then
        busybox="$tmp/busybox-deb/bin/busybox"
    else
        log "no dynamic busybox: using $busybox (the MaskedPaths spec will fail)"
    fi
fi
log "pushing fixture images (busybox: $busybox)"
nsenter --net="/run/netns/$netns" -- python3 "$here/critest-images.py" --registry "127.0.0.1:$port" \
    --busybox "$busybox" >&2

# --- berthd -----------------------------------------------------------------
mirror="[\"http://127.0.0.1:$port\"]"
{
    echo "root = \"$tmp/root\""
    echo "state = \"$tmp/state\""
    echo "listen = \"$sock\""
    echo "log_level = \"info\""
    echo
    echo "[metrics]"
    echo "address = \"\""
    echo
    echo "[registry.mirrors]"
    for h in registry.k8s.io k8s.gcr.io gcr.io docker.io quay.io; do
        echo "\"$h\" = $mirror"
    done
    echo
    echo "[runtime]"
    echo "cgroup_parent = \"$cgparent\""
    if [[ -n "$shim" ]]; then
        echo "shim = \"$shim\""
        [[ "$shim" == external ]] && echo "shim_binary = \"$bin/berth-shim\""
    fi
    if [[ -n "$extra_config" ]]; then echo; cat "$extra_config"; fi
} > "$tmp/berth.toml"
log "berth.toml:"; sed 's/^/    /' "$tmp/berth.toml" >&2

nsenter --net="/run/netns/$netns" -- "$bin/berthd" -c "$tmp/berth.toml" >"$tmp/berthd.log" 2>&1 &
berthd_pid=$!
for _ in $(seq 1 100); do [[ -S "$sock" ]] && break; kill -0 "$berthd_pid" || { cat "$tmp/berthd.log" >&2; exit 1; }; sleep 0.2; done
[[ -S "$sock" ]] || { log "berthd did not create $sock"; tail -50 "$tmp/berthd.log" >&2; exit 1; }

# --- critest ----------------------------------------------------------------
log "running $critest ${critest_args[*]}"
set +e
(cd "$tmp" && nsenter --net="/run/netns/$netns" -- "$critest" \
    -runtime-endpoint "unix://$sock" -image-endpoint "unix://$sock" \
    -ginkgo.no-color "${critest_args[@]}")
rc=$?
set -e
log "critest exit code $rc"
exit "$rc"
