#!/usr/bin/env bash
# Start a throw-away PostgreSQL on 127.0.0.1 for the multi-machine sweep tests and
# print the URL to use. Needs root (Debian's postgresql package); prints nothing
# and exits 0 when it cannot, so the tests that need it are skipped, not failed.
set -uo pipefail
[ "$(id -u)" = 0 ] || exit 0
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } >&2 || exit 0
fi
bin=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
data=/tmp/vaelab-pg
port=${VAELAB_PG_PORT:-55432}
if ! su postgres -c "$bin/pg_ctl -D $data status" >/dev/null 2>&1; then
  rm -rf "$data" && mkdir -p "$data" && chown postgres "$data"
  su postgres -c "$bin/initdb -D $data -A trust -U postgres" >/dev/null 2>&1 || exit 0
  su postgres -c "$bin/pg_ctl -D $data -l $data/server.log -o '-c listen_addresses=127.0.0.1 -p $port -k /tmp' -w start" >/dev/null 2>&1 || exit 0
fi
psql="$bin/psql -h 127.0.0.1 -p $port -U postgres -v ON_ERROR_STOP=1 -q"
$psql -c "CREATE DATABASE vaelab_test" >/dev/null 2>&1 || true
echo "postgresql://postgres@127.0.0.1:$port/vaelab_test"
