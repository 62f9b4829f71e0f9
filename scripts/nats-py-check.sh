#!/usr/bin/env bash
# Runs scripts/nats_check.py (the nats-py client from PyPI) against busbar's NATS listener.
#
#   scripts/nats-py-check.sh                 build, start a broker on free ports, check, stop it
#   NATS_URL=nats://127.0.0.1:4222 scripts/nats-py-check.sh
#                                            check a broker that is already running
#
# nats-py is installed into a virtualenv under target/ (not into the system Python).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/nats-py-venv
# Checked by importing it: a venv whose install failed half-way is made again.
if ! "$venv/bin/python" -c 'import nats' >/dev/null 2>&1; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet nats-py
fi
if [ -n "${NATS_URL:-}" ]; then
    exec "$venv/bin/python" scripts/nats_check.py "$NATS_URL"
fi
cargo build --quiet --release -p busbar-cli
bin=target/release/busbar
log=$(mktemp)
"$bin" serve --listen 127.0.0.1:0 --nats-listen 127.0.0.1:0 >"$log" &
broker=$!
responder=""
trap 'kill $broker ${responder:-} 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
    grep -q "^busbar listening on" "$log" && break
    sleep 0.1
done
native=$(sed -n 's/^busbar listening on //p' "$log")
nats_url=$(sed -n 's/^busbar NATS protocol on //p' "$log")
# A native busbar responder, for the Python client to reach across protocols.
"$bin" reply --server "$native" check.native "hello from busbar" >/dev/null &
responder=$!
sleep 0.5
"$venv/bin/python" scripts/nats_check.py "$nats_url" check.native
