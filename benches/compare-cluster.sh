#!/usr/bin/env bash
# Runs the load tool's fan-out against a pollmux cluster (NODES nodes, default 3, on one
# redis-server over a unix socket) with the clients spread over the nodes and the publish sent
# to the first node, and against one pollmux without a cluster, on this machine; prints the
# cluster/single ratios and Redis's commands per published message. Loopback only. Usage:
#   benches/compare-cluster.sh                     # 100, 2k, 10k clients on 1 topic, 19k on 100; 3 rounds
#   SCALE=0.1 ROUNDS=1 benches/compare-cluster.sh  # a quick run with 10% of the connections
# Each of ROUNDS rounds starts a fresh Redis and fresh nodes, runs every scenario against the
# cluster, stops it, then starts a fresh single pollmux and runs them again; the comparison
# takes each figure's median over the rounds (the worst for losses).
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-1}
SCENARIOS=${SCENARIOS:-fanout_1topic=100,fanout_1topic=2000,fanout_1topic=10000,fanout_100topics}
ROUNDS=${ROUNDS:-3}
NODES=${NODES:-3}
OUT=${OUT:-target/bench}
# Single pollmux: PORT_BASE+80 (public), +90 (admin); node k: +100+k and +200+k.
PORT_BASE=${PORT_BASE:-28000}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
HELD='pollmux_polls_active{route="bench"}'

for tool in redis-server redis-cli curl jq; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is needed" >&2; exit 1; }
done
# The servers and the tool's workers inherit the hard descriptor limit.
ulimit -n "$(ulimit -Hn)"

cargo build --release --bin pollmux --bin pollmux-load
mkdir -p "$OUT"
rm -f "$OUT/cluster.jsonl" "$OUT/single.jsonl"
LOAD=$TARGET_DIR/release/pollmux-load
PM=$TARGET_DIR/release/pollmux

wait_http() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# wait_backplane ADMIN_PORT: until the node says Redis answers it.
wait_backplane() {
  for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$1/metrics" | grep -q '^pollmux_backplane_up 1'; then
      return 0
    fi
    sleep 0.1
  done
  echo "the node on admin port $1 never reached the backplane" >&2
  return 1
}

# config PUBLIC ADMIN: benches/pollmux.toml on other ports.
config() {
  sed -e "s/127.0.0.1:18080/127.0.0.1:$1/" -e "s/127.0.0.1:19090/127.0.0.1:$2/" \
    benches/pollmux.toml
}

# measure LABEL ARGS…: every scenario against one server or cluster.
measure() {
  local label=$1
  shift
  $LOAD run --target pollmux --label "$label" --scale "$SCALE" --scenarios "$SCENARIOS" \
    --held-prefix "$HELD" --out "$OUT/$label.jsonl" "$@"
}

stop() {
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r)," \
  "$(redis-server --version | grep -o 'v=[^ ]*'), load average: $(cut -d' ' -f1-3 /proc/loadavg)"

DIR=$(mktemp -d)
RUNNING=()
trap 'stop "${RUNNING[@]}"; rm -rf "$DIR"' EXIT
SOCK=$DIR/redis.sock
config $((PORT_BASE + 80)) $((PORT_BASE + 90)) >"$DIR/single.toml"
for k in $(seq 0 $((NODES - 1))); do
  config $((PORT_BASE + 100 + k)) $((PORT_BASE + 200 + k)) >"$DIR/node$k.toml"
  cat >>"$DIR/node$k.toml" <<EOF

[cluster]
backplane = "redis"
node_id = "bench-$k"

[cluster.redis]
url = "unix://$SOCK"
EOF
done
grep -q "127.0.0.1:$((PORT_BASE + 100))" "$DIR/node0.toml" \
  || { echo "benches/pollmux.toml's addresses changed; update config()" >&2; exit 1; }

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS: cluster of $NODES nodes"
  rm -f "$SOCK"
  redis-server --port 0 --unixsocket "$SOCK" --unixsocketperm 700 --save '' \
    --appendonly no --dir "$DIR" --logfile "$DIR/redis.log" &
  REDIS=$!
  RUNNING=("$REDIS")
  for _ in $(seq 1 100); do
    redis-cli -s "$SOCK" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  PIDS='' SUBS='' HELDS=''
  for k in $(seq 0 $((NODES - 1))); do
    $PM run --config "$DIR/node$k.toml" --log-level warn &
    RUNNING+=("$!")
    PIDS+="${PIDS:+,}$!"
    SUBS+="${SUBS:+,}http://127.0.0.1:$((PORT_BASE + 100 + k))/bench/{topic}"
    HELDS+="${HELDS:+,}http://127.0.0.1:$((PORT_BASE + 200 + k))/metrics"
  done
  for k in $(seq 0 $((NODES - 1))); do
    wait_http $((PORT_BASE + 100 + k))
    wait_backplane $((PORT_BASE + 200 + k))
  done
  # A fresh Redis has no scripts cached: the first publish would also count a SCRIPT LOAD
  # and a second EVALSHA. One publish to a topic nobody waits on loads it before measuring.
  curl -sf -X POST -H 'Content-Type: text/plain' --data warm-up \
    "http://127.0.0.1:$((PORT_BASE + 200))/publish/bench/warm-up" >/dev/null
  measure cluster --pid "$PIDS" --sub-url "$SUBS" --held-url "$HELDS" \
    --pub-url "http://127.0.0.1:$((PORT_BASE + 200))/publish/bench/{topic}" \
    --redis-url "unix://$SOCK" --redis-pid "$REDIS"
  stop "${RUNNING[@]}"
  RUNNING=()

  echo "== round $round of $ROUNDS: single node"
  $PM run --config "$DIR/single.toml" --log-level warn &
  RUNNING=("$!")
  wait_http $((PORT_BASE + 90))
  measure single --pid "${RUNNING[0]}" \
    --sub-url "http://127.0.0.1:$((PORT_BASE + 80))/bench/{topic}" \
    --held-url "http://127.0.0.1:$((PORT_BASE + 90))/metrics" \
    --pub-url "http://127.0.0.1:$((PORT_BASE + 90))/publish/bench/{topic}"
  stop "${RUNNING[@]}"
  RUNNING=()
done

echo
echo "== Redis commands per published message, per round (cluster)"
jq -r '"\(.scenario): \(.redis_calls_per_msg) commands, \(.redis_info_cpu_us_per_msg) µs of Redis CPU per message (\(.redis_calls_by_command | to_entries | map("\(.key) \(.value)") | join(", ")))"' \
  "$OUT/cluster.jsonl"
echo
echo "== cluster ($NODES nodes) / single node"
$LOAD compare "$OUT/cluster.jsonl" "$OUT/single.jsonl"
