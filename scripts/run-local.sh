#!/usr/bin/env bash
# The main job on real input, on one machine: builds in release mode, starts redis-server,
# clickhouse-server and the dev Kafka broker on 127.0.0.1 with their data under var/local,
# starts the runtime with examples/config.yaml and projections/, publishes the sample events
# with kcat, prints curl commands with their real answers, and runs until Ctrl-C, then stops
# everything it started.
#
# Environment:
#   RUN_LOCAL_ONESHOT=1   stop after printing the answers instead of waiting for Ctrl-C
#   RUN_LOCAL_DIR         where data and logs go (default: var/local)
set -euo pipefail
cd "$(dirname "$0")/.."

state_dir=${RUN_LOCAL_DIR:-var/local}
redis_port=16379
clickhouse_http_port=18123
clickhouse_tcp_port=19000
clickhouse_interserver_port=19009
health_port=8084
api_port=8085
binary=.build/release/projection-runtime
pids=()

log() { printf 'run-local: %s\n' "$*" >&2; }

stop_all() {
  local status=$?
  trap - EXIT INT TERM
  log "stopping everything that was started"
  # Reverse order: the runtime first, so that it can flush and commit while the services run.
  for ((index = ${#pids[@]} - 1; index >= 0; index--)); do
    kill -TERM "${pids[index]}" 2>/dev/null || true
    wait "${pids[index]}" 2>/dev/null || true
  done
  exit "$status"
}
trap stop_all EXIT
trap 'exit 0' INT TERM

# wait_for DESCRIPTION SECONDS COMMAND...: retries COMMAND every 0.2 s until it succeeds.
wait_for() {
  local description=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${seconds} s waiting for $description; logs are in $state_dir"
      return 1
    fi
    sleep 0.2
  done
}

scripts/install-deps.sh
log "building (release)"
swift build -c release --static-swift-stdlib --product projection-runtime 2>&1 | tail -n 1
"$binary" check --projections projections

rm -rf "$state_dir"
mkdir -p "$state_dir/redis"

log "starting redis-server on 127.0.0.1:$redis_port"
redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$state_dir/redis" --save '' \
  --appendonly no >"$state_dir/redis.log" 2>&1 &
pids+=($!)
wait_for "redis-server" 10 redis-cli -p "$redis_port" ping

log "starting clickhouse-server on 127.0.0.1:$clickhouse_http_port (HTTP)"
scripts/clickhouse-local.sh "$state_dir/clickhouse" "$clickhouse_http_port" "$clickhouse_tcp_port" \
  "$clickhouse_interserver_port" >"$state_dir/clickhouse.out" 2>&1 &
pids+=($!)
wait_for "clickhouse-server" 60 grep -q "clickhouse-local: ready" "$state_dir/clickhouse.out"

log "starting the dev broker"
"$binary" dev-broker --topic aggregation.bars.v1:4 --topic projection.invalidation.v1:2 \
  >"$state_dir/broker.out" 2>"$state_dir/broker.log" &
pids+=($!)
wait_for "the dev broker" 10 test -s "$state_dir/broker.out"
bootstrap=$(head -n 1 "$state_dir/broker.out")
log "dev broker at $bootstrap"

# One worker: librdkafka's mock cluster holds a rebalance until the session timeout (45 s by
# default) runs out, so a second group member joining a moment later would delay the start.
log "starting projection-runtime (logs: $state_dir/runtime.log)"
DATA_PROC_KAFKA_BOOTSTRAP=$bootstrap \
DATA_PROC_REDIS_PORT=$redis_port \
DATA_PROC_CLICKHOUSE_HTTP_PORT=$clickhouse_http_port \
DATA_PROC_PROJECTION_PORT=$health_port \
DATA_PROC_INTERNAL_API_PORT=$api_port \
DATA_PROC_HTTP_BIND=127.0.0.1 \
DATA_PROC_WORKERS=1 \
  "$binary" run --config examples/config.yaml --projections projections 2>"$state_dir/runtime.log" &
pids+=($!)
wait_for "the runtime to be ready (GET /ready)" 30 curl -sf "http://127.0.0.1:$health_port/ready"

log "publishing examples/events/*.kcat with kcat"
kcat -b "$bootstrap" -t aggregation.bars.v1 -P -K '|' -l examples/events/bars.kcat
kcat -b "$bootstrap" -t projection.invalidation.v1 -P -K '|' -l examples/events/invalidations.kcat

bars=$(wc -l <examples/events/bars.kcat)
handled() {
  curl -sf "http://127.0.0.1:$api_port/projections" |
    grep -o '"name":"latest_price"[^}]*"events_handled":[0-9]*' | grep -o '[0-9]*$'
}
all_handled() { [ "$(handled)" = "$bars" ]; }
wait_for "the sample bars to be handled" 30 all_handled
sleep 1.5  # one ClickHouse flush interval, so the rollup rows are in

# show DESCRIPTION COMMAND: prints what the command shows, the command, and its real output.
show() {
  printf '\n# %s\n$ %s\n' "$1" "$2"
  eval "$2"
  printf '\n'
}
show "the latest price of acme BTC-USD: its last bar ends after acme's tenant-wide invalidation" \
  "curl -s 'http://127.0.0.1:$api_port/projections/latest_price?tenant_id=acme&instrument_id=BTC-USD'"
show "404: acme's tenant-wide invalidation (issued_ms 1709547000000) removed ETH-USD's older price" \
  "curl -s 'http://127.0.0.1:$api_port/projections/latest_price?tenant_id=acme&instrument_id=ETH-USD'"
show "404: an instrument invalidation removed globex SOL-USD" \
  "curl -s 'http://127.0.0.1:$api_port/projections/latest_price?tenant_id=globex&instrument_id=SOL-USD'"
show "15-minute rollups of acme BTC-USD, newest first" \
  "curl -s 'http://127.0.0.1:$api_port/projections/bar_rollups/bars?tenant_id=acme&instrument_id=BTC-USD&timeframe=15m'"
show "every loaded projection with its version, status and counters" \
  "curl -s 'http://127.0.0.1:$api_port/projections'"
show "readiness" "curl -s 'http://127.0.0.1:$health_port/ready'"
show "events by projection and result" \
  "curl -s 'http://127.0.0.1:$health_port/metrics' | grep '^projection_events_total'"
show "rollup rows in ClickHouse (FINAL merges rewritten buckets)" \
  "curl -s 'http://127.0.0.1:$clickhouse_http_port/' --data-binary 'SELECT timeframe, count() FROM bar_rollups FINAL GROUP BY timeframe ORDER BY timeframe'"
printf '%s\n' "Publish more with: kcat -b $bootstrap -t aggregation.bars.v1 -P -K '|'"
printf '%s\n' "Reload projections with: kill -HUP ${pids[3]}   (or curl -X POST http://127.0.0.1:$api_port/admin/reload)"

if [ "${RUN_LOCAL_ONESHOT:-0}" = 1 ]; then
  exit 0
fi
log "running; press Ctrl-C to stop everything"
wait "${pids[3]}"
