#!/usr/bin/env bash
# Where a sequential request's latency comes from on this machine: the same four TCP loopback
# hops made by bare blocking sockets (examples/tcp_floor.rs), busbar and nats-server, with the
# server (or relay) and the clients placed three ways by `taskset`:
#   same  - server and clients on CPU 0;
#   split - server on CPU 0, clients on CPU 1 (every hop crosses CPUs);
#   free  - no pinning, as compare-nats.sh runs them.
# RUNS runs of each (floor, busbar and NATS in turn, the order rotated from run to run); prints
# the median p50/p90/p99 in µs. Needs nats-server (see compare-nats.sh), two CPUs at least and
# bash 4.4 or later (empty arrays under `set -u`). Not part of CI.
#
#   RUNS=4 MSGS=10000 scripts/latency-floor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-4}"
msgs="${MSGS:-10000}"
out="${OUT:-target/latency-floor.txt}"
command -v nats-server >/dev/null || { echo "nats-server not found: run scripts/compare-nats.sh once" >&2; exit 1; }
cargo build --release -q -p busbar-cli --bin busbar --example tcp_floor
busbar=target/release/busbar
floor=target/release/examples/tcp_floor

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done
    echo "nothing listens on port $1" >&2
    return 1
}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

: >"$out"
for placement in same split free; do
    case $placement in
        same) server=(taskset -c 0); client=(taskset -c 0) ;;
        split) server=(taskset -c 0); client=(taskset -c 1) ;;
        free) server=(); client=() ;;
    esac
    bb_port=$(free_port)
    nats_port=$(free_port)
    RUST_LOG=warn "${server[@]}" "$busbar" serve --listen "127.0.0.1:$bb_port" >/dev/null &
    pids+=($!)
    "${server[@]}" nats-server -a 127.0.0.1 -p "$nats_port" >/dev/null 2>&1 &
    pids+=($!)
    wait_port "$bb_port"
    wait_port "$nats_port"
    targets=(floor busbar nats)
    for run in $(seq "$runs"); do
        for i in 0 1 2; do
            target=${targets[$(((run + i) % 3))]}
            if [ "$target" = floor ]; then
                # The relay serves one pair of ends, so each floor run has its own.
                coproc relay { exec "${server[@]}" "$floor" relay; }
                relay_pid=$relay_PID
                read -r relay_addr <&"${relay[0]}"
                line=$("${client[@]}" "$floor" "$msgs" "$relay_addr")
                wait "$relay_pid" || true
            else
                if [ "$target" = busbar ]; then dest=(--server "127.0.0.1:$bb_port"); else dest=(--nats "127.0.0.1:$nats_port"); fi
                # A run that lost requests fails: kept apart, as in compare-nats.sh.
                line=$("${client[@]}" "$busbar" bench request -n "$msgs" "${dest[@]}" --quiet 2>/dev/null | grep '^{' | tail -1) || true
            fi
            [ -n "$line" ] || line='{"lost":-1}'
            echo "$placement $target $line" >>"$out"
        done
    done
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
    echo "$placement done" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    placement, target, js = line.split(" ", 2)
    rows.setdefault((placement, target), []).append(json.loads(js))
print(f"{'placement':<10} {'target':<7} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8}  failed runs")
for (placement, target), all_runs in sorted(rows.items(), key=lambda kv: (["same", "split", "free"].index(kv[0][0]), kv[0][1])):
    rs = [r for r in all_runs if r.get("lost", -1) == 0 and "p50_us" in r]
    failed = len(all_runs) - len(rs)
    if not rs:
        print(f"{placement:<10} {target:<7} no clean run ({failed} failed)")
        continue
    m = lambda k: statistics.median(r[k] for r in rs)
    print(f"{placement:<10} {target:<7} {m('p50_us'):>8.1f} {m('p90_us'):>8.1f} {m('p99_us'):>8.1f}  {failed}")
PY
