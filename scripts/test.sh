#!/usr/bin/env bash
# Runs every test: installs the Debian packages that are missing, builds, and runs `swift test`.
# The tests start their own redis-server and clickhouse-server on free loopback ports and use
# librdkafka's mock cluster as the Kafka broker.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
swift build --build-tests
# The tests are XCTest only; without this flag swift-testing prints a closing "0 tests" line.
swift test --skip-build --disable-swift-testing
