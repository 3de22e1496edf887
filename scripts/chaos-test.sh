#!/usr/bin/env bash
# Chaos test: runs projection-runtime on a seeded stream of about 209,000 events while it is
# killed with SIGKILL and restarted many times, and while redis-server and clickhouse-server
# restart once each, then checks that each event's effects are in Redis and ClickHouse exactly
# once. The end state of Redis and ClickHouse is compared with an offline replay of the same
# events (`projection-runtime test --redis`), and examples/chaos/event_counter.lua counts each
# event with non-idempotent writes, so a lost or doubled event shows as a wrong counter.
#
# Everything runs on 127.0.0.1 with data and logs under CHAOS_DIR, on free ports. The run ends
# by itself within CHAOS_TIMEOUT_SECONDS and stops every process it started, by PID. It prints
# a summary table and exits 0 only when nothing was lost, duplicated or different and the
# runtime neither stalled nor dropped a batch as fenced.
# docs/delivery.md (section "Chaos test") explains the design.
#
# Environment:
#   CHAOS_SEED              seed of the events and of the kill timing (default: 1)
#   CHAOS_KILLS             SIGKILLs of the runtime, each followed by a restart (default: 12)
#   CHAOS_CHUNKS            slices in which the events are produced during the run (default: 8)
#   CHAOS_MINUTES           1m bars per instrument before corrections and extras (default: 132)
#   CHAOS_WORKERS           DATA_PROC_WORKERS of the runtime (default: unset, one per core)
#   CHAOS_TIMEOUT_SECONDS   limit on the whole run, build included (default: 900)
#   CHAOS_DIR               data and logs, emptied first (default: var/chaos)
set -euo pipefail
cd "$(dirname "$0")/.."

seed=${CHAOS_SEED:-1}
kill_count=${CHAOS_KILLS:-12}
chunk_count=${CHAOS_CHUNKS:-8}
minutes=${CHAOS_MINUTES:-132}
budget_seconds=${CHAOS_TIMEOUT_SECONDS:-900}
workers=${CHAOS_WORKERS:-0}
state_dir=${CHAOS_DIR:-var/chaos}

bar_topic=aggregation.bars.v1
invalidation_topic=projection.invalidation.v1
group=chaos-$seed
deadline=$((SECONDS + budget_seconds))
# The kill cycles in which redis-server and clickhouse-server restart while the runtime runs.
redis_cycle=$(((kill_count + 2) / 3))
clickhouse_cycle=$(((2 * kill_count + 2) / 3))

runtime_pid=""
redis_pid=""
scratch_pid=""
clickhouse_pid=""
broker_pid=""
producer_pids=()
kills=0
runtime_starts=0
redis_restarts=0
clickhouse_restarts=0
produced=0
clickhouse_starts=0

log() { printf 'chaos: %s\n' "$*" >&2; }

fail() {
  log "FAILED: $*"
  exit 1
}

# stalled MESSAGE: fails after showing which partitions are behind and how often the runtime
# dropped a batch because it believed another process owned its partitions.
stalled() {
  log "FAILED: $*"
  python3 scripts/chaos_verify.py behind --redis-port "$redis_port" --group "$group" \
    --expected "$events_dir/expected.json" >&2 || true
  log "runtime.log has $(grep -c 'partitions were claimed by another process' "$state_dir/runtime.log" || true)" \
    "warnings 'partitions were claimed by another process'"
  exit 1
}

# stop_pid PID [SIGNAL] [SECONDS]: sends SIGNAL (default TERM) and waits up to SECONDS
# (default 30) for the process to exit, then sends SIGKILL.
stop_pid() {
  local pid=$1 signal=${2:-TERM} seconds=${3:-30}
  [[ -n $pid ]] || return 0
  kill -"$signal" "$pid" 2>/dev/null || return 0
  local until=$((SECONDS + seconds))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < until)); do
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "process $pid did not exit within $seconds s after SIG$signal; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for pid in "${producer_pids[@]}"; do
    stop_pid "$pid" TERM 5
  done
  # The runtime first, so it can still write to Redis and ClickHouse while it stops.
  stop_pid "$runtime_pid" TERM 30
  stop_pid "$broker_pid" TERM 10
  stop_pid "$clickhouse_pid" TERM 40
  stop_pid "$redis_pid" TERM 10
  stop_pid "$scratch_pid" TERM 10
  log "logs and data are in $state_dir (runtime.log, redis.log, clickhouse*.out, broker.log, offline.log, verify-details.txt)"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

check_deadline() {
  ((SECONDS < deadline)) || fail "the run exceeded its limit of $budget_seconds s (CHAOS_TIMEOUT_SECONDS)"
}

remaining_seconds() { echo $((deadline - SECONDS)); }

# wait_for DESCRIPTION SECONDS COMMAND...: retries COMMAND every 0.2 s until it succeeds.
wait_for() {
  local description=$1 seconds=$2
  shift 2
  local until=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < until)) || fail "timed out after $seconds s waiting for $description"
    check_deadline
    sleep 0.2
  done
}

# random_sleep MIN MAX: sleeps a random time between MIN and MAX seconds, from bash's RANDOM,
# which the seed initializes.
random_sleep() {
  sleep "$(awk -v r="$RANDOM" -v low="$1" -v high="$2" 'BEGIN { printf "%.2f", low + (high - low) * r / 32767 }')"
}

# --- Setup -----------------------------------------------------------------------------------

for tool in redis-server redis-cli kcat python3 swift awk timeout curl; do
  command -v "$tool" >/dev/null || fail "$tool is not installed; run scripts/install-deps.sh"
done
RANDOM=$seed
# Settings of the caller's environment would override the ones below.
while read -r variable; do
  unset "$variable"
done < <(compgen -e | grep '^DATA_PROC_' || true)

rm -rf "$state_dir"
mkdir -p "$state_dir/redis" "$state_dir/scratch-redis" "$state_dir/projections"
# The run uses a copy of the binary, so a rebuild during the run does not change what is tested.
binary=$state_dir/projection-runtime

log "building (release)"
# A source file saved while swift build runs fails the build, so it is tried a second time.
if ! swift build -c release --static-swift-stdlib --product projection-runtime >"$state_dir/build.log" 2>&1 &&
  ! swift build -c release --static-swift-stdlib --product projection-runtime >"$state_dir/build.log" 2>&1; then
  tail -n 20 "$state_dir/build.log" >&2
  fail "swift build failed; see $state_dir/build.log"
fi
cp .build/release/projection-runtime "$binary"

events_dir=$state_dir/events
projections_dir=$state_dir/projections

log "generating events (seed $seed)"
python3 scripts/chaos_events.py --out "$events_dir" --seed "$seed" --minutes "$minutes" \
  --chunks "$chunk_count" --bar-topic "$bar_topic" --invalidation-topic "$invalidation_topic" >&2
total=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["events"])' "$events_dir/expected.json")

# The shipped projections, their lib/ and the counting projection, in one folder.
cp -R projections/. "$projections_dir/"
cp examples/chaos/*.lua "$projections_dir/"
"$binary" check --projections "$projections_dir" >"$state_dir/check.out" ||
  fail "projection-runtime check failed: $(cat "$state_dir/check.out")"

read -r redis_port scratch_port clickhouse_http_port clickhouse_tcp_port clickhouse_interserver_port \
  health_port api_port < <(python3 scripts/chaos_verify.py ports 7)

# --- Services --------------------------------------------------------------------------------

# Every write is in the append-only file before Redis replies, so a restart keeps everything
# that the runtime saw acknowledged.
start_redis() {
  redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$state_dir/redis" --save '' \
    --appendonly yes --appendfsync always >>"$state_dir/redis.log" 2>&1 &
  redis_pid=$!
  wait_for "redis-server on port $redis_port" 20 redis-cli -p "$redis_port" ping
}

start_clickhouse() {
  clickhouse_starts=$((clickhouse_starts + 1))
  local out="$state_dir/clickhouse-$clickhouse_starts.out"
  scripts/clickhouse-local.sh "$state_dir/clickhouse" "$clickhouse_http_port" "$clickhouse_tcp_port" \
    "$clickhouse_interserver_port" >"$out" 2>&1 &
  clickhouse_pid=$!
  wait_for "clickhouse-server on port $clickhouse_http_port" 90 grep -q "clickhouse-local: ready" "$out"
}

restart_redis() {
  log "restarting redis-server (SIGTERM, then the same data folder)"
  stop_pid "$redis_pid" TERM 30
  sleep 1
  start_redis
  redis_restarts=$((redis_restarts + 1))
}

restart_clickhouse() {
  log "restarting clickhouse-server (SIGTERM, then the same data folder)"
  stop_pid "$clickhouse_pid" TERM 40
  sleep 1
  start_clickhouse
  clickhouse_restarts=$((clickhouse_restarts + 1))
}

log "starting redis-server, clickhouse-server and the dev broker"
start_redis
start_clickhouse
"$binary" dev-broker --topic "$bar_topic:16" --topic "$invalidation_topic:4" \
  >"$state_dir/broker.out" 2>"$state_dir/broker.log" &
broker_pid=$!
wait_for "the dev broker" 20 test -s "$state_dir/broker.out"
bootstrap=$(head -n 1 "$state_dir/broker.out")

# A short session timeout lets the group notice a killed member after 6 s instead of librdkafka's
# default 45 s. kafka.properties can only be set in the YAML file.
cat >"$state_dir/config.yaml" <<EOF
logLevel: info
kafka:
  groupId: $group
  properties:
    session.timeout.ms: "6000"
    heartbeat.interval.ms: "500"
EOF

start_runtime() {
  runtime_starts=$((runtime_starts + 1))
  printf '{"chaos":"runtime start %d"}\n' "$runtime_starts" >>"$state_dir/runtime.log"
  DATA_PROC_KAFKA_BOOTSTRAP=$bootstrap \
  DATA_PROC_REDIS_PORT=$redis_port \
  DATA_PROC_CLICKHOUSE_HTTP_PORT=$clickhouse_http_port \
  DATA_PROC_PROJECTION_PORT=$health_port \
  DATA_PROC_INTERNAL_API_PORT=$api_port \
  DATA_PROC_HTTP_BIND=127.0.0.1 \
  DATA_PROC_PROJECTIONS_DIR=$projections_dir \
  DATA_PROC_SHUTDOWN_TIMEOUT_MS=10000 \
  DATA_PROC_WORKERS=$workers \
    "$binary" run --config "$state_dir/config.yaml" >/dev/null 2>>"$state_dir/runtime.log" &
  runtime_pid=$!
}

kill_runtime() {
  kill -KILL "$runtime_pid"
  wait "$runtime_pid" 2>/dev/null || true
  runtime_pid=""
  kills=$((kills + 1))
}

# The events applied so far: the sum of the next offsets that the runtime stores in Redis in
# each batch's transaction. 0 while Redis is down.
applied() {
  redis-cli -p "$redis_port" --raw HVALS "prt:offsets:{$group}" 2>/dev/null |
    awk '/^[0-9]+$/ { sum += $1 } END { print sum + 0 }'
}

runtime_alive() { [[ -n $runtime_pid ]] && kill -0 "$runtime_pid" 2>/dev/null; }

# wait_for_progress SECONDS: waits until the runtime applies more events than now, unless it
# has applied everything produced so far.
wait_for_progress() {
  local seconds=$1 before
  before=$(applied)
  local until=$((SECONDS + seconds))
  while (($(applied) <= before && before < produced)); do
    runtime_alive || fail "the runtime exited by itself; see the end of $state_dir/runtime.log"
    ((SECONDS < until)) || stalled "the runtime applied nothing for $seconds s ($before of $produced produced events applied)"
    check_deadline
    sleep 0.2
  done
}

# produce_chunk N: produces slice N of every partition, each partition by its own kcat with
# an explicit partition, all at once, and waits for them.
produce_chunk() {
  local chunk=$1 file topic partition name count=0
  producer_pids=()
  for file in "$events_dir"/kcat/*/p*.c"$chunk".kcat; do
    [[ -e $file ]] || continue
    topic=$(basename "$(dirname "$file")")
    name=$(basename "$file")
    partition=$((10#${name:1:2}))
    count=$((count + $(wc -l <"$file")))
    kcat -b "$bootstrap" -P -t "$topic" -p "$partition" -K '|' -X message.timeout.ms=30000 \
      -l "$file" 2>>"$state_dir/kcat.log" &
    producer_pids+=($!)
  done
  for pid in "${producer_pids[@]}"; do
    wait "$pid" || fail "kcat failed to produce chunk $chunk; see $state_dir/kcat.log"
  done
  producer_pids=()
  produced=$((produced + count))
  log "produced chunk $chunk of $chunk_count: $count events ($produced of $total)"
}

# --- Chaos -----------------------------------------------------------------------------------

started_at=$SECONDS
log "$kill_count SIGKILLs; redis-server restarts in cycle $redis_cycle, clickhouse-server in cycle $clickhouse_cycle"
next_chunk=1
for ((cycle = 1; cycle <= kill_count; cycle++)); do
  check_deadline
  # The slices are spread over the cycles, so that the later kills also find events to apply.
  # A slice comes early when fewer than 5,000 produced events are left to apply.
  while ((next_chunk <= chunk_count)) &&
    { (((next_chunk - 1) * kill_count / chunk_count < cycle)) || ((produced - $(applied) < 5000)); }; do
    produce_chunk "$next_chunk"
    next_chunk=$((next_chunk + 1))
  done
  start_runtime
  wait_for_progress 120
  if ((cycle == redis_cycle)); then
    restart_redis
    wait_for_progress 120
  fi
  if ((cycle == clickhouse_cycle)); then
    restart_clickhouse
    wait_for_progress 120
  fi
  random_sleep 0.2 3.0
  runtime_alive || fail "the runtime exited by itself; see the end of $state_dir/runtime.log"
  kill_runtime
  log "cycle $cycle: SIGKILL with $(applied) of $produced produced events applied"
done
for ((chunk = next_chunk; chunk <= chunk_count; chunk++)); do
  produce_chunk "$chunk"
done

log "last start: waiting until all $total events are applied"
start_runtime
last_applied=-1
last_progress=$SECONDS
while true; do
  now_applied=$(applied)
  ((now_applied != total)) || break
  if ((now_applied != last_applied)); then
    last_applied=$now_applied
    last_progress=$SECONDS
  fi
  runtime_alive || fail "the runtime exited by itself; see the end of $state_dir/runtime.log"
  ((SECONDS - last_progress < 120)) ||
    stalled "the runtime applied nothing for 120 s ($now_applied of $total events applied)"
  check_deadline
  sleep 0.5
done
chaos_seconds=$((SECONDS - started_at))
# The runtime handles SIGTERM once it has started, and it serves /health from then on.
wait_for "the runtime's /health" 60 curl -sf "http://127.0.0.1:$health_port/health"
log "all events applied $chaos_seconds s after the first start; stopping the runtime with SIGTERM"
kill -TERM "$runtime_pid"
stop_status=0
stop_until=$((SECONDS + 30))
while runtime_alive && ((SECONDS < stop_until)); do
  sleep 0.1
done
if runtime_alive; then
  fail "the runtime did not exit within 30 s of SIGTERM"
fi
wait "$runtime_pid" || stop_status=$?
runtime_pid=""
((stop_status == 0)) || log "the runtime exited with status $stop_status after SIGTERM"

# --- Verification ----------------------------------------------------------------------------

log "reading back both topics and the dead-letter topics"
: >"$state_dir/consumed.tsv"
for topic in "$bar_topic" "$invalidation_topic"; do
  # kcat's simple consumer reads one topic per run.
  timeout 120 kcat -b "$bootstrap" -C -t "$topic" -o beginning -e -q \
    -f '%t\t%p\t%o\t%k\t%s\n' >>"$state_dir/consumed.tsv" 2>>"$state_dir/kcat.log" ||
    fail "kcat could not read back $topic; see $state_dir/kcat.log"
done
dead_letter_files=()
for topic in "$bar_topic" "$invalidation_topic"; do
  # A dead-letter topic exists only once something was dead-lettered to it.
  timeout 60 kcat -b "$bootstrap" -C -t "$topic.dlq" -o beginning -e -q -J \
    >"$state_dir/$topic.dlq.jsonl" 2>>"$state_dir/kcat.log" || true
  dead_letter_files+=("$state_dir/$topic.dlq.jsonl")
done

log "replaying the events offline into a scratch redis-server"
redis-server --bind 127.0.0.1 --port "$scratch_port" --dir "$state_dir/scratch-redis" --save '' \
  --appendonly no >"$state_dir/scratch-redis.log" 2>&1 &
scratch_pid=$!
wait_for "the scratch redis-server on port $scratch_port" 20 redis-cli -p "$scratch_port" ping
offline_started=$SECONDS
set +e
timeout "$(remaining_seconds)" "$binary" test "$projections_dir" --events "$events_dir/envelopes.jsonl" \
  --redis "127.0.0.1:$scratch_port" 2>"$state_dir/offline.log" |
  grep -E '"effect":"(insert|error)"' >"$state_dir/offline-effects.jsonl"
offline_status=${PIPESTATUS[0]}
set -e
log "offline replay took $((SECONDS - offline_started)) s (status $offline_status: 1 is expected, because malformed events fail)"
check_deadline

python3 scripts/chaos_verify.py verify \
  --expected "$events_dir/expected.json" \
  --consumed "$state_dir/consumed.tsv" \
  --offline "$state_dir/offline-effects.jsonl" \
  --offline-status "$offline_status" \
  --dead-letters "${dead_letter_files[@]}" \
  --live-redis "$redis_port" \
  --scratch-redis "$scratch_port" \
  --clickhouse "$clickhouse_http_port" \
  --details "$state_dir/verify-details.txt" \
  --runtime-log "$state_dir/runtime.log" \
  --kills "$kills" \
  --runtime-restarts "$((runtime_starts - 1))" \
  --redis-restarts "$redis_restarts" \
  --clickhouse-restarts "$clickhouse_restarts" || verify_status=$?
log "chaos phase $chaos_seconds s, whole run $SECONDS s"
((stop_status == 0)) || fail "the runtime exited with status $stop_status after SIGTERM"
exit "${verify_status:-0}"
