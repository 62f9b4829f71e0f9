#!/usr/bin/env bash
# A 3-node busbar cluster on this machine: node 1 first, nodes 2 and 3 seeded with node 1 only
# (they learn of each other from it). Client ports 4900-4902, route ports 6900-6902, monitoring
# 8900-8902 (override with BASE_CLIENT, BASE_ROUTE, BASE_HTTP).
#
#   scripts/cluster.sh            run until Ctrl-C, printing the addresses
#   scripts/cluster.sh --check    start, check that a message crosses the cluster, stop
set -euo pipefail
cd "$(dirname "$0")/.."
client=${BASE_CLIENT:-4900}
route=${BASE_ROUTE:-6900}
http=${BASE_HTTP:-8900}
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
# Until every node has routes to the two others.
for _ in $(seq 100); do
    up=0
    for n in 1 2 3; do
        count=$("$bin" routes --http "127.0.0.1:$((http + n - 1))" --json 2>/dev/null | sed -n 's/^  "count": \([0-9]*\),*/\1/p')
        [ "${count:-0}" = 2 ] && up=$((up + 1))
    done
    [ "$up" = 3 ] && break
    sleep 0.1
done
"$bin" routes --http "127.0.0.1:$http"
if [ "${1:-}" = "--check" ]; then
    # A subscriber on node 3, a publisher on node 1.
    "$bin" sub --server "127.0.0.1:$((client + 2))" 'cluster.>' --count 1 --raw > /tmp/busbar-cluster-check.$$ &
    sub=$!
    sleep 0.5
    "$bin" pub --server "127.0.0.1:$client" cluster.hello 'across the cluster'
    wait "$sub"
    grep -q 'across the cluster' /tmp/busbar-cluster-check.$$ && echo "ok: node 1 -> node 3"
    rm -f /tmp/busbar-cluster-check.$$
    exit 0
fi
echo "cluster up: clients on 127.0.0.1:$client-$((client + 2)); Ctrl-C stops it"
wait
