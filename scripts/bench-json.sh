#!/usr/bin/env bash
# Builds scripts/bench_json.c with gcc -O2 against this repository's JSON codec, Lua 5.4,
# jansson and lua-cjson (Debian packages), then prints the machine and a Markdown table of
# decode and encode figures. Runs for about 4 seconds with the default 0.25 s per case.
#
# Usage: scripts/bench-json.sh [seconds per case]
# Needs: apt-get install gcc liblua5.4-dev libjansson-dev lua-cjson
set -euo pipefail

repository="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
codec="$repository/Sources/CLuaJSON"
cjson_module=/usr/lib/x86_64-linux-gnu/lua/5.4/cjson.so

for header in /usr/include/lua5.4/lua.h /usr/include/jansson.h; do
    if [[ ! -f "$header" ]]; then
        echo "bench-json: $header not found; install liblua5.4-dev and libjansson-dev" >&2
        exit 1
    fi
done
if [[ ! -f "$cjson_module" ]]; then
    echo "bench-json: $cjson_module not found; install lua-cjson" >&2
    exit 1
fi

build_dir="$(mktemp -d)"
trap 'rm -rf "$build_dir"' EXIT

gcc -O2 -std=gnu11 -Wall -Wextra \
    -I"$codec/include" -I"$codec" \
    "$repository/scripts/bench_json.c" "$codec/json.c" "$codec/decode.c" "$codec/encode.c" \
    -llua5.4 -ljansson -ldl -lm \
    -o "$build_dir/bench_json"

echo "machine: $(lscpu | grep 'Model name' | sed 's/.*: *//'), $(nproc) cores"
echo "compiler: $(gcc --version | head -n 1)"
echo "packages: $(dpkg-query -W -f '${Package} ${Version}, ' liblua5.4-dev libjansson-dev lua-cjson | sed 's/, $//')"
echo
"$build_dir/bench_json" "$@"
