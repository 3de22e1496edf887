#!/usr/bin/env bash
# Runs a private clickhouse-server on 127.0.0.1 for tests and local work. Its config, data,
# temporary files and logs all live under FOLDER, so it needs neither root-owned paths nor the
# system service. The script stays in the foreground. It prints a line starting with
# "clickhouse-local: ready" once the HTTP interface responds to /ping, and stops the server
# when it receives SIGTERM or SIGINT, or when the process that started it exits.
#
# Usage: scripts/clickhouse-local.sh FOLDER HTTP_PORT TCP_PORT INTERSERVER_PORT
#
# Environment:
#   CLICKHOUSE_SERVER             server binary (default: clickhouse-server from /usr/bin,
#                                 /usr/sbin or PATH)
#   CLICKHOUSE_LOCAL_PASSWORD     password of the user "default" (default: none)
#   CLICKHOUSE_LOCAL_WAIT_SECONDS seconds to wait for the server to respond (default: 30)
#
# Written for clickhouse-server 18.16 (Debian 12), whose config root element is <yandex>.
set -euo pipefail

if (($# != 4)); then
  echo "usage: $0 FOLDER HTTP_PORT TCP_PORT INTERSERVER_PORT" >&2
  exit 2
fi
folder=$1
http_port=$2
tcp_port=$3
interserver_port=$4
wait_seconds=${CLICKHOUSE_LOCAL_WAIT_SECONDS:-30}

for port in "$http_port" "$tcp_port" "$interserver_port"; do
  if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    echo "clickhouse-local: invalid port '$port': expected a number from 1 to 65535" >&2
    exit 2
  fi
done

server=${CLICKHOUSE_SERVER:-}
if [[ -z $server ]]; then
  for candidate in /usr/bin/clickhouse-server /usr/sbin/clickhouse-server \
    "$(command -v clickhouse-server || true)"; do
    if [[ -n $candidate && -x $candidate ]]; then
      server=$candidate
      break
    fi
  done
fi
if [[ -z $server || ! -x $server ]]; then
  echo "clickhouse-local: clickhouse-server not found; install the Debian package" \
    "clickhouse-server or set CLICKHOUSE_SERVER" >&2
  exit 1
fi

mkdir -p "$folder"
folder=$(cd "$folder" && pwd)
mkdir -p "$folder/data" "$folder/tmp" "$folder/user_files" "$folder/format_schemas" "$folder/log"

# The user "default" may connect from loopback only. A password is stored as its SHA-256.
password_element="<password></password>"
if [[ -n ${CLICKHOUSE_LOCAL_PASSWORD:-} ]]; then
  hash=$(printf '%s' "$CLICKHOUSE_LOCAL_PASSWORD" | sha256sum | cut -d' ' -f1)
  password_element="<password_sha256_hex>$hash</password_sha256_hex>"
fi

cat >"$folder/users.xml" <<EOF
<?xml version="1.0"?>
<yandex>
  <profiles>
    <default></default>
  </profiles>
  <users>
    <default>
      $password_element
      <networks>
        <ip>127.0.0.1</ip>
        <ip>::1</ip>
      </networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas>
    <default>
      <interval>
        <duration>3600</duration>
        <queries>0</queries>
        <errors>0</errors>
        <result_rows>0</result_rows>
        <read_rows>0</read_rows>
        <execution_time>0</execution_time>
      </interval>
    </default>
  </quotas>
</yandex>
EOF

# Every path the server writes to points into the folder. The server also writes
# data/preprocessed_configs and data/status there.
cat >"$folder/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
  <logger>
    <level>information</level>
    <log>$folder/log/clickhouse-server.log</log>
    <errorlog>$folder/log/clickhouse-server.err.log</errorlog>
    <size>10M</size>
    <count>2</count>
  </logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>$http_port</http_port>
  <tcp_port>$tcp_port</tcp_port>
  <interserver_http_port>$interserver_port</interserver_http_port>
  <interserver_http_host>127.0.0.1</interserver_http_host>
  <path>$folder/data/</path>
  <tmp_path>$folder/tmp/</tmp_path>
  <user_files_path>$folder/user_files/</user_files_path>
  <format_schema_path>$folder/format_schemas/</format_schema_path>
  <users_config>$folder/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <keep_alive_timeout>10</keep_alive_timeout>
  <max_concurrent_queries>20</max_concurrent_queries>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
</yandex>
EOF

"$server" --config-file="$folder/config.xml" >"$folder/log/stdout.log" 2>&1 &
server_pid=$!

stop() {
  trap - TERM INT EXIT
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    # The server finishes its queries and exits. An idle test server needs far less than
    # 20 s, so after that it is killed.
    for _ in $(seq 1 200); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
      echo "clickhouse-local: server did not stop within 20 s; killing it" >&2
      kill -KILL "$server_pid" 2>/dev/null || true
    fi
  fi
  wait "$server_pid" 2>/dev/null || true
  echo "clickhouse-local: stopped"
  exit "${1:-0}"
}
trap 'stop 0' TERM INT
trap 'stop 1' EXIT

show_log() {
  echo "clickhouse-local: last lines of $folder/log:" >&2
  tail -n 20 "$folder/log/stdout.log" "$folder/log/clickhouse-server.err.log" \
    >&2 2>/dev/null || true
}

# Sends GET /ping over bash's /dev/tcp, so the check needs no HTTP client installed.
ping_succeeds() {
  timeout 2 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3
    grep -q "^Ok\." <&3
  ' ping_succeeds "$http_port" 2>/dev/null
}

deadline=$((SECONDS + wait_seconds))
until ping_succeeds; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "clickhouse-local: server exited before responding on port $http_port" >&2
    show_log
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    echo "clickhouse-local: server did not respond to /ping on port $http_port within" \
      "$wait_seconds s" >&2
    show_log
    exit 1
  fi
  sleep 0.1
done
echo "clickhouse-local: ready on http://127.0.0.1:$http_port (pid $server_pid, folder $folder)"

# Waits in the background so that a signal interrupts `wait` at once, and checks once a second
# that the server and the parent process still run.
parent_pid=$PPID
while kill -0 "$server_pid" 2>/dev/null; do
  if ! kill -0 "$parent_pid" 2>/dev/null; then
    echo "clickhouse-local: parent process $parent_pid exited; stopping the server" >&2
    stop 0
  fi
  sleep 1 &
  wait $! || true
done

echo "clickhouse-local: server exited unexpectedly" >&2
show_log
exit 1
