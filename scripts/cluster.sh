#!/usr/bin/env bash
# A 3-node busbar cluster on this machine: node 1 first, nodes 2 and 3 seeded with node 1 only
# (they learn of each other from it). Client ports 4900-4902, route ports 6900-6902, monitoring
# 8900-8902 (override with BASE_CLIENT, BASE_ROUTE, BASE_HTTP).
#
#   scripts/cluster.sh            run until Ctrl-C, printing the addresses
#   scripts/cluster.sh --check    on free ports: start, check that a message crosses the
#                                 cluster, stop (fails, within about 30 s, if it does not)
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
[ "${1:-}" = "--check" ] && check=true
# Three consecutive free ports from the kernel's ephemeral range (a check must not collide with
# a broker already running on the defaults).
free_base() {
    python3 - <<'PY'
import random, socket
for _ in range(200):
    base = random.randint(20000, 30000)
    socks = []
    try:
        for p in range(base, base + 3):
            s = socket.socket(); s.bind(("127.0.0.1", p)); socks.append(s)
        print(base); break
    except OSError:
        pass
    finally:
        for s in socks: s.close()
PY
}
if $check; then
    client=${BASE_CLIENT:-$(free_base)}
    route=${BASE_ROUTE:-$(free_base)}
    http=${BASE_HTTP:-$(free_base)}
else
    client=${BASE_CLIENT:-4900}
    route=${BASE_ROUTE:-6900}
    http=${BASE_HTTP:-8900}
fi
cargo build --quiet --release -p busbar-cli
bin=target/release/busbar
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for n in 1 2 3; do
    seeds=()
    [ "$n" -gt 1 ] && seeds=(--routes "127.0.0.1:$route")
    "$bin" serve --name "node-$n" --node-id "$n" --cluster-name local \
        --listen "127.0.0.1:$((client + n - 1))" --http "127.0.0.1:$((http + n - 1))" \
        --cluster-listen "127.0.0.1:$((route + n - 1))" "${seeds[@]}" &
    pids+=($!)
done
# Until every node has routes to the two others (a node not listening yet counts as none).
up=0
for _ in $(seq 150); do
    up=0
    for n in 1 2 3; do
        count=$("$bin" routes --http "127.0.0.1:$((http + n - 1))" --json 2>/dev/null | sed -n 's/^  "count": \([0-9]*\),*/\1/p' || true)
        [ "${count:-0}" = 2 ] && up=$((up + 1))
    done
    [ "$up" = 3 ] && break
    sleep 0.1
done
if [ "$up" != 3 ]; then
    echo "the cluster did not form a full mesh within 15 s" >&2
    exit 1
fi
"$bin" routes --http "127.0.0.1:$http"
if $check; then
    # A subscriber on node 3, a publisher on node 1. Its interest reaches node 1 a moment after
    # it subscribes, and a message published before is (rightly) not forwarded: publish again
    # until it arrives, for at most 10 s.
    out=$(mktemp)
    timeout 15 "$bin" sub --server "127.0.0.1:$((client + 2))" 'cluster.>' --count 1 --raw >"$out" &
    sub=$!
    pids+=("$sub")
    for _ in $(seq 100); do
        "$bin" pub --server "127.0.0.1:$client" cluster.hello 'across the cluster'
        kill -0 "$sub" 2>/dev/null || break
        sleep 0.1
    done
    wait "$sub" || true
    if grep -q 'across the cluster' "$out"; then
        echo "ok: node 1 -> node 3"
        rm -f "$out"
        exit 0
    fi
    rm -f "$out"
    echo "the message did not cross the cluster" >&2
    exit 1
fi
echo "cluster up: clients on 127.0.0.1:$client-$((client + 2)); Ctrl-C stops it"
wait
