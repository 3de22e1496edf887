#!/usr/bin/env bash
# Installs the Debian packages the build, the tests and the local stack need, when missing.
set -euo pipefail

packages=(
  liblua5.4-dev libssl-dev libjansson-dev lua-cjson
  librdkafka-dev libhiredis-dev libmicrohttpd-dev libcurl4-openssl-dev libyaml-dev
  redis-server clickhouse-server clickhouse-client kcat curl
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "installing: ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
