#!/usr/bin/env bash
# The main job on the sample input: builds in release mode, checks the shipped projections and
# runs the sample events through them, printing every effect.
# NOTE: the live runtime (Kafka in, Redis and ClickHouse out, HTTP ports) is not built yet, so
# this runs the projections offline with `projection-runtime test`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
swift build -c release --product projection-runtime
binary=.build/release/projection-runtime

$binary check --projections projections
$binary test projections --events examples/events/sample.jsonl
