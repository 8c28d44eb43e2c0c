#!/usr/bin/env bash
# Measures the external shim: start-up time (spawn until its API socket is bound) and
# resident memory (RSS/PSS from /proc/<pid>/smaps_rollup) of idle `berth-shim` processes,
# one per pod, as berthd starts them. For the footprint with containers running under the
# shims, see the ignored test `shim_memory_per_pod` in tests/recovery.rs.
#
# Usage: hack/shim-rss.sh [path to berth-shim] [number of shims]
#   default binary: the static build of hack/build-shim.sh (target/<host triple>/shim/), what
#   users should run; pass another path to compare builds.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/$(rustc -vV | sed -n 's/^host: //p')/shim/berth-shim}
n=${2:-5}
[[ -x $bin ]] || { echo "no $bin: run hack/build-shim.sh" >&2; exit 1; }
dir=$(mktemp -d /tmp/berth-shim-rss.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT
kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$2/smaps_rollup"; }
total_rss=0 total_pss=0
for i in $(seq 1 "$n"); do
    pod=$(printf '%064x' "$i")
    start=$(date +%s%N)
    "$bin" --dir "$dir/$pod" --pod "$pod" 2>>"$dir/shim.log" &
    pids+=($!)
    disown  # killed by PID at exit: no "Killed" job reports
    until [[ -S $dir/$pod/shim.sock ]]; do sleep 0.001; done
    end=$(date +%s%N)
    sleep 0.2
    pid=$(cat "$dir/$pod/shim.pid")
    rss=$(kb Rss "$pid") pss=$(kb Pss "$pid")
    total_rss=$((total_rss + rss)) total_pss=$((total_pss + pss))
    printf 'shim %d: start-up %6.2f ms  RSS %5d kB  PSS %5d kB  threads %s\n' \
        "$i" "$(echo "($end - $start) / 1000000" | bc -l)" "$rss" "$pss" \
        "$(awk '/^Threads:/ { print $2 }' "/proc/$pid/status")"
done
echo "average per pod: RSS $((total_rss / n)) kB, PSS $((total_pss / n)) kB (binary $(stat -c %s "$bin") bytes)"
