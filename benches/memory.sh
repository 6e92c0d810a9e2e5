#!/usr/bin/env bash
# The memory scenarios of the load tool against pollmux (docs/BENCHMARKS.md, "Memory given
# back"), each against a fresh process so its idle baseline is a fresh one's. Loopback only.
#   benches/memory.sh                          # idle_return (5,000 polls), then an 8-minute soak
#   SCENARIOS=idle_return benches/memory.sh    # one of them
#   SOAK_SECS=60 benches/memory.sh             # a shorter soak
#   SCENARIOS=fanout_1topic PAYLOAD=0 benches/memory.sh   # any scenario of the tool, each in a fresh process
# POLLMUX names another pollmux binary to measure (default: the release build of this tree).
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIOS=${SCENARIOS:-idle_return,soak}
SOAK_SECS=${SOAK_SECS:-480}
PAYLOAD=${PAYLOAD:-256}
OUT=${OUT:-target/bench}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
ulimit -n "$(ulimit -Hn)"

cargo build --release --bin pollmux --bin pollmux-load
POLLMUX=${POLLMUX:-$TARGET_DIR/release/pollmux}
LOAD=$TARGET_DIR/release/pollmux-load
mkdir -p "$OUT"
rm -f "$OUT/memory.jsonl"

wait_http() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r); $POLLMUX"
PM=''
trap 'kill $PM 2>/dev/null || true' EXIT
for scenario in ${SCENARIOS//,/ }; do
  "$POLLMUX" run --config benches/pollmux.toml --log-level warn &
  PM=$!
  wait_http 19090
  # A fresh process's idle baseline: let start-up finish first.
  sleep 2
  $LOAD run --target pollmux --pid "$PM" --scenarios "$scenario" \
    --soak-secs "$SOAK_SECS" --payload-bytes "$PAYLOAD" \
    --sub-url 'http://127.0.0.1:18080/bench/{topic}' \
    --pub-url 'http://127.0.0.1:19090/publish/bench/{topic}' \
    --held-url 'http://127.0.0.1:19090/metrics' --held-prefix 'pollmux_polls_active{route="bench"}' \
    --out "$OUT/memory.jsonl"
  kill -TERM "$PM"; wait "$PM" || true
  PM=''
done
