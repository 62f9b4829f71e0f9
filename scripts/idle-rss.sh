#!/usr/bin/env bash
# Broker memory: RSS of an idle `busbar serve`, then with N idle connections that each hold one
# subscription (raw protocol frames from a small Python client, so that client-side memory is
# not part of the figure). Targets: idle ≤ 10 MB; 10 000 connections ≤ 150 MB.
#
#   scripts/idle-rss.sh [connections]     default 10000
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10000}"
ulimit -n $((n + 1000)) 2>/dev/null || true
cargo build --release -q -p busbar-cli
out=$(mktemp)
RUST_LOG=warn target/release/busbar serve --listen 127.0.0.1:0 --max-connections $((n + 100)) >"$out" 2>&1 &
pid=$!
clients=""
trap 'kill $pid $clients 2>/dev/null || true; rm -f "$out" "$out.clients"' EXIT
for _ in $(seq 100); do grep -q "listening on" "$out" && break; sleep 0.05; done
addr=$(awk '/listening on/ {print $NF}' "$out")
sleep 0.5
echo "idle broker: $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status)"
python3 - "${addr%:*}" "${addr#*:}" "$n" >"$out.clients" 2>&1 <<'PY' &
import socket, struct, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def frame(signal, corr, body):
    header = struct.pack(">HBBIIQ", 0x6562, 1, signal, 0, 0, corr)
    return struct.pack(">I", len(header) + len(body)) + header + body
def s16(b):
    return struct.pack(">H", len(b)) + b
hello = frame(0x81, 0, s16(b"idle") + struct.pack(">H", 0))
socks = []
for i in range(n):
    s = socket.create_connection((host, port))
    sub = frame(0x85, 1, s16(f"idle.{i}".encode()) + s16(b"") + b"\x00\x00")
    s.sendall(hello + sub + frame(0x83, 0, b""))
    socks.append(s)
for s in socks:  # each gets WELCOME then PONG: the subscription is in place
    got = b""
    while len(got) < 24 + 20 + 24:
        got += s.recv(4096)
print("opened", len(socks), flush=True)
time.sleep(600)
PY
clients=$!
for _ in $(seq 600); do grep -q opened "$out.clients" 2>/dev/null && break; sleep 0.2; done
if ! grep -qx "opened $n" "$out.clients" 2>/dev/null; then
    echo "not every connection opened and subscribed; no figure taken:" >&2
    cat "$out.clients" >&2
    exit 1
fi
sleep 1
echo "$(cat "$out.clients")"
echo "with $n idle connections, one subscription each: $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status)"
