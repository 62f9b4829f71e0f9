#!/usr/bin/env bash
# Fuzz the native frame decoder with libFuzzer. Needs a nightly toolchain (rustup toolchain
# install nightly). Uses cargo-fuzz when installed; otherwise builds the target with the same
# instrumentation flags cargo-fuzz would pass. Not part of CI.
#
#   scripts/fuzz.sh [seconds]      default 60
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
target="${TARGET:-frame_decode}"
mkdir -p "corpus/$target"
if cargo fuzz --version >/dev/null 2>&1; then
    exec cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- -max_total_time="$seconds" -max_len=4096
fi
triple="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
    cargo +nightly build --release --bin "$target" --target "$triple"
"target/$triple/release/$target" "corpus/$target" "seeds/$target" -max_total_time="$seconds" -max_len=4096
