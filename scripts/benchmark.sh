#!/usr/bin/env bash
# Benchmarks projection-runtime against kcat and a Python consumer, with one command.
#
# Builds the runtime in release mode, prepares a Python venv with confluent-kafka and redis-py
# in var/benchmark/venv, and runs scripts/bench/run.py. That starts redis-server,
# clickhouse-server and the dev Kafka broker on 127.0.0.1 with their data in var/benchmark,
# measures throughput, latency, scaling and start-up, prints one table with the targets, and
# writes var/benchmark/results.json. It stops every process it started. docs/performance.md
# explains the figures.
#
# A full run took 5 to 6.5 minutes on 2 cores, plus the build.
#
# Environment:
#   QUICK=1        a smoke run of 2 to 3 minutes: fewer events, shorter phases, no profile
#   BENCH_BINARY   benchmark this projection-runtime executable instead of building one
#   BENCH_ONLY     comma-separated sections to run: baselines, throughput, scaling, latency,
#                  startup, profile
set -euo pipefail
cd "$(dirname "$0")/.."

# The versions behind the figures in docs/performance.md.
python_packages=(confluent-kafka==2.16.1 redis==8.2.0)
venv=var/benchmark/venv

log() { printf 'benchmark: %s\n' "$*" >&2; }

scripts/install-deps.sh

binary=${BENCH_BINARY:-}
if [[ -z $binary ]]; then
  log "building (release)"
  swift build -c release --static-swift-stdlib --product projection-runtime 2>&1 | tail -n 1
  binary=.build/release/projection-runtime
fi
if [[ ! -x $binary ]]; then
  log "projection-runtime executable not found at '$binary'; unset BENCH_BINARY to build it"
  exit 1
fi

installed_versions() {
  "$venv/bin/python" -c 'import confluent_kafka, redis; print(f"confluent-kafka=={confluent_kafka.__version__} redis=={redis.__version__}")' \
    2>/dev/null || true
}
if [[ "$(installed_versions)" != "${python_packages[*]}" ]]; then
  log "preparing $venv with ${python_packages[*]} from PyPI"
  mkdir -p "$(dirname "$venv")"
  if ! python3 -m venv "$venv"; then
    log "python3 -m venv failed; on Debian install the package python3-venv and run again"
    exit 1
  fi
  "$venv/bin/pip" install --quiet "${python_packages[@]}"
fi

# A copy, so that a rebuild during the run cannot swap the executable between two measurements.
mkdir -p var/benchmark
cp "$binary" var/benchmark/projection-runtime
arguments=(--binary var/benchmark/projection-runtime --python "$venv/bin/python")
if [[ ${QUICK:-0} == 1 ]]; then
  arguments+=(--quick)
fi
if [[ -n ${BENCH_ONLY:-} ]]; then
  arguments+=(--only "$BENCH_ONLY")
fi
exec "$venv/bin/python" scripts/bench/run.py "${arguments[@]}"
