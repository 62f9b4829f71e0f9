#!/usr/bin/env bash
# busbar against nats-server, side by side on this machine: starts both on free loopback ports,
# runs every scenario against each, alternating, RUNS times, and prints the medians and the
# busbar/NATS ratio per scenario. Not part of CI (it installs nats-server with apt).
#
#   RUNS=3 MSGS=200000 scripts/compare-nats.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-3}"
msgs="${MSGS:-200000}"
out="${OUT:-target/compare-nats.txt}"

if ! command -v nats-server >/dev/null 2>&1; then
    echo "installing nats-server from the distribution's packages" >&2
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq nats-server >/dev/null
fi
cargo build --release -q -p busbar-cli
busbar=target/release/busbar

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
bb_port=$(free_port)
nats_port=$(free_port)
RUST_LOG=warn "$busbar" serve --listen "127.0.0.1:$bb_port" >/dev/null &
bb_pid=$!
nats-server -a 127.0.0.1 -p "$nats_port" >/dev/null 2>&1 &
nats_pid=$!
trap 'kill $bb_pid $nats_pid 2>/dev/null || true' EXIT
for port in "$bb_port" "$nats_port"; do
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.05
    done
done
echo "busbar $($busbar --version) on :$bb_port, $(nats-server --version) on :$nats_port, $runs runs of $msgs messages" >&2

# label|arguments|messages (sequential requests are slow: fewer of them)
scenarios=(
    "pubsub-16|pubsub --size 16|$msgs"
    "pubsub-1k|pubsub --size 1024|$msgs"
    "fanout-4|fanout --subs 4|$msgs"
    "group-4|group --subs 4|$msgs"
    "request|request|$((msgs / 20))"
    "request-32|request-inflight --inflight 32|$msgs"
)
: >"$out"
for run in $(seq "$runs"); do
    for entry in "${scenarios[@]}"; do
        IFS='|' read -r label args count <<<"$entry"
        # Alternate which one goes first, so that neither always runs on a warmer machine.
        if [ $((run % 2)) -eq 1 ]; then order="busbar nats"; else order="nats busbar"; fi
        for target in $order; do
            if [ "$target" = busbar ]; then dest=(--server "127.0.0.1:$bb_port"); else dest=(--nats "127.0.0.1:$nats_port"); fi
            # shellcheck disable=SC2086
            # A run that lost messages still prints its figures (then fails): keep them.
            line=$("$busbar" bench $args -n "$count" "${dest[@]}" --quiet 2>/dev/null | grep '^{' | tail -1) || true
            [ -n "$line" ] || line='{"lost":-1}'
            echo "$label $target $line" >>"$out"
        done
    done
    echo "run $run/$runs done" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, target, js = line.split(" ", 2)
    rows.setdefault(label, {}).setdefault(target, []).append(json.loads(js))
med = lambda rs, k: statistics.median(r.get(k, 0) for r in rs)
# Medians over the clean runs; runs that lost messages (or failed) are counted apart.
clean = lambda rs: [r for r in rs if r.get("lost", -1) == 0 and "msgs_per_sec" in r]
print(f"{'scenario':<12} {'busbar msg/s':>13} {'nats msg/s':>13} {'ratio':>6} {'bb p50':>8} {'nats p50':>9} {'p50 ratio':>9} {'bb p99':>8} {'nats p99':>9} {'p99 ratio':>9}  lossy runs (busbar/nats)")
for label, by in rows.items():
    b_all, n_all = by.get("busbar", []), by.get("nats", [])
    b, n = clean(b_all), clean(n_all)
    lossy = f"{len(b_all) - len(b)}/{len(n_all) - len(n)}"
    if not b or not n or not med(n, "msgs_per_sec") or not med(n, "p50_us"):
        print(f"{label:<12} no clean run to compare: lossy runs {lossy}")
        continue
    bm, nm = med(b, "msgs_per_sec"), med(n, "msgs_per_sec")
    b50, n50, b99, n99 = med(b, "p50_us"), med(n, "p50_us"), med(b, "p99_us"), med(n, "p99_us")
    print(f"{label:<12} {bm:>13.0f} {nm:>13.0f} {bm / nm:>6.2f} {b50:>8.1f} {n50:>9.1f} {b50 / n50:>9.2f} {b99:>8.1f} {n99:>9.1f} {b99 / n99:>9.2f}  {lossy}")
PY
