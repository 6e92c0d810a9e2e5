#!/usr/bin/env bash
# Runs the load tool's scenarios against pollmux, then against Nchan, on this machine, and
# prints pollmux/Nchan ratios. Loopback only. Usage:
#   benches/compare-nchan.sh                       # full scenarios (needs root to install nginx)
#   SCALE=0.1 SCENARIOS=fanout_1topic ROUNDS=1 benches/compare-nchan.sh
# Each of ROUNDS rounds (default 3) runs every scenario against a fresh pollmux, then a fresh
# Nchan; the comparison takes each figure's median over the rounds (the worst for losses).
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-1}
SCENARIOS=${SCENARIOS:-fanout_1topic,fanout_100topics,burst,sustained}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-target/bench}
NCHAN_MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so

if [ ! -e "$NCHAN_MODULE" ] || ! command -v nginx >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-nchan >/dev/null
fi
# Both servers and the tool's workers inherit the hard descriptor limit.
ulimit -n "$(ulimit -Hn)"

cargo build --release --bin pollmux --bin pollmux-load
mkdir -p "$OUT"
rm -f "$OUT/pollmux.jsonl" "$OUT/nchan.jsonl"
LOAD=target/release/pollmux-load

wait_http() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# measure TARGET PID SUB_URL PUB_URL HELD_URL HELD_PREFIX: every scenario against one server.
measure() {
  $LOAD run --target "$1" --pid "$2" --scale "$SCALE" --scenarios "$SCENARIOS" \
    --sub-url "$3" --pub-url "$4" --held-url "$5" --held-prefix "$6" --out "$OUT/$1.jsonl"
}

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r)"

PREFIX=$(mktemp -d)
mkdir -p "$PREFIX/logs" "$PREFIX/tmp"
PM='' NG=''
trap 'kill $PM $NG 2>/dev/null || true; rm -rf "$PREFIX"' EXIT
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  target/release/pollmux run --config benches/pollmux.toml --log-level warn &
  PM=$!
  wait_http 19090
  measure pollmux "$PM" 'http://127.0.0.1:18080/bench/{topic}' \
    'http://127.0.0.1:19090/publish/bench/{topic}' \
    'http://127.0.0.1:19090/metrics' 'pollmux_polls_active{route="bench"}'
  kill -TERM "$PM"; wait "$PM" || true
  PM=''

  nginx -p "$PREFIX" -c "$PWD/benches/nchan.conf" -g 'daemon off;' &
  NG=$!
  wait_http 18081
  measure nchan "$NG" 'http://127.0.0.1:18081/sub/{topic}' \
    'http://127.0.0.1:18081/pub/{topic}' \
    'http://127.0.0.1:18081/nchan_status' 'subscribers:'
  kill -QUIT "$NG"; wait "$NG" || true
  NG=''
done

echo
echo "== pollmux / Nchan"
$LOAD compare "$OUT/pollmux.jsonl" "$OUT/nchan.jsonl"
