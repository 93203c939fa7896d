#!/usr/bin/env bash
# The project's local PostgreSQL 15 cluster: build+install the extension, start, stop, status.
#
#   scripts/cluster.sh install   # build (cargo pgrx package) and install into PostgreSQL 15 by
#                                # write-new-then-rename (running backends are never disturbed)
#   scripts/cluster.sh start     # initdb if needed, root key, start (restart if the .so changed)
#   scripts/cluster.sh stop
#   scripts/cluster.sh status
#   scripts/cluster.sh reset     # drop envelope.* settings a test left in postgresql.auto.conf
#   PGE_INSTANCE=pg15-b PGE_PORT=54316 scripts/cluster.sh start   # a second cluster
#   PGE_NO_ROOT_KEY=1 ...                                           # without the local root key
#
# The cluster runs as the postgres OS user, listens on 127.0.0.1:$PGE_PORT (default 54315) and
# on a Unix socket in $PGE_STATE/run, with shared_preload_libraries = 'pg_envelope' and the
# local provider's root key in $PGE_STATE/keys/root.key (outside the data directory).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"

# The server's environment: SoftHSM2 (the pkcs11 provider's test HSM) reads its configuration
# from SOFTHSM2_CONF, which must be set in the postmaster's environment.
PGE_SERVER_ENV=(SOFTHSM2_CONF="$PGE_STATE/softhsm/softhsm2.conf")
# PGE_MEMLOCK_KB: start the server under `ulimit -l` (tests of the key pool's mlock fallback).
pg_ctl() {
  if [ -n "${PGE_MEMLOCK_KB:-}" ]; then
    as_postgres env -u RUST_BACKTRACE "${PGE_SERVER_ENV[@]}" sh -c 'ulimit -l "$0" && exec "$@"' "$PGE_MEMLOCK_KB" "$PGE_PG15_BIN/pg_ctl" "$@"
  else
    as_postgres env -u RUST_BACKTRACE "${PGE_SERVER_ENV[@]}" "$PGE_PG15_BIN/pg_ctl" "$@"
  fi
}
server_env_current() {
  local pid
  pid="$(as_root head -n1 "$PGE_DATA/postmaster.pid" 2>/dev/null)" || return 1
  as_root tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "${PGE_SERVER_ENV[0]}"
}

install_ext() {
  cd "$PGE_ROOT"
  cargo pgrx package --pg-config "$PGE_PG15_CONFIG"
  pge_install_tree "$PGE_ROOT/target/release/pg_envelope-pg15"
}

# Writes pg_envelope.conf; returns 0 when its content changed (a running server then restarts:
# some settings, max_prepared_transactions for one, apply only at a start).
write_conf() {
  local old new
  old="$(as_root cat "$PGE_DATA/pg_envelope.conf" 2>/dev/null || true)"
  new="$(conf_text)"
  printf '%s\n' "$new" | as_root tee "$PGE_DATA/pg_envelope.conf" >/dev/null
  as_root chown postgres:postgres "$PGE_DATA/pg_envelope.conf"
  grep -q "include_if_exists = 'pg_envelope.conf'" "$PGE_DATA/postgresql.conf" ||
    echo "include_if_exists = 'pg_envelope.conf'" | as_root tee -a "$PGE_DATA/postgresql.conf" >/dev/null
  [ "$old" != "$new" ]
}

conf_text() {
  cat <<CONF
# Written by scripts/cluster.sh; regenerated on every start.
listen_addresses = '127.0.0.1'
port = $PGE_PORT
unix_socket_directories = '$PGE_SOCKDIR'
shared_preload_libraries = 'pg_envelope'
$( [ "${PGE_NO_ROOT_KEY:-0}" = 1 ] && echo "# envelope.local_root_key_file not set (PGE_NO_ROOT_KEY=1)" || echo "envelope.local_root_key_file = '$PGE_ROOT_KEY'" )
# Key providers may only name files under these directories and load these PKCS#11 modules.
envelope.credential_dirs = '$PGE_STATE/regress-credentials, $PGE_STATE/openbao, $PGE_STATE/openbao-persistent, $PGE_STATE/moto, $PGE_STATE/softhsm'
envelope.pkcs11_modules = '/usr/lib/softhsm/libsofthsm2.so'
wal_level = logical
max_connections = 200
# Two-phase commit is tested (prepared transactions and destroy_data_key).
max_prepared_transactions = 8
fsync = off
CONF
}

start() {
  as_root install -d -o postgres -g postgres -m 0755 "$PGE_STATE" "$PGE_STATE/$PGE_INSTANCE"
  as_root install -d -o postgres -g postgres -m 0700 "$PGE_SOCKDIR" "$PGE_STATE/regress-credentials"
  pge_make_key "$PGE_ROOT_KEY"
  if [ ! -f "$PGE_DATA/PG_VERSION" ]; then
    as_root install -d -o postgres -g postgres -m 0700 "$PGE_DATA"
    # Local socket (private directory): trust. TCP on 127.0.0.1: passwords (scram).
    as_postgres "$PGE_PG15_BIN/initdb" -D "$PGE_DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  fi
  local so conf_changed=0
  write_conf && conf_changed=1
  so="$("$PGE_PG15_CONFIG" --pkglibdir)/pg_envelope.so"
  if pg_ctl -D "$PGE_DATA" status >/dev/null 2>&1; then
    if [ "$so" -nt "$PGE_DATA/postmaster.pid" ] || ! server_env_current || [ "$conf_changed" = 1 ]; then
      echo "pg_envelope.so, pg_envelope.conf or the server environment changed: restarting the cluster"
      pg_ctl -D "$PGE_DATA" -w -m fast restart -l "$PGE_STATE/$PGE_INSTANCE/server.log" >/dev/null
    else
      pg_ctl -D "$PGE_DATA" reload >/dev/null
    fi
  else
    pg_ctl -D "$PGE_DATA" -w start -l "$PGE_STATE/$PGE_INSTANCE/server.log" >/dev/null
  fi
  echo "PostgreSQL 15 ($PGE_INSTANCE) running: 127.0.0.1:$PGE_PORT and $PGE_SOCKDIR (log: $PGE_STATE/$PGE_INSTANCE/server.log)"
}

# The test tiers set envelope.* settings with ALTER SYSTEM and reset them when they finish; a run
# that is killed (a session's end, a CI timeout) leaves them in postgresql.auto.conf, and the next
# run's golden tests would see them. Resets every envelope.* setting found there and restarts the
# cluster if there was one (some are read only at a start). Settings of other names are kept.
reset_settings() {
  local names n
  names="$(pge_psql -d postgres -Atc "SELECT DISTINCT name FROM pg_file_settings
      WHERE sourcefile LIKE '%/postgresql.auto.conf' AND name LIKE 'envelope.%' ORDER BY 1")"
  [ -n "$names" ] || return 0
  for n in $names; do
    echo "resetting $n (left in postgresql.auto.conf by an earlier, interrupted run)"
    pge_psql -d postgres -qc "ALTER SYSTEM RESET $n"
  done
  pg_ctl -D "$PGE_DATA" -w -m fast restart -l "$PGE_STATE/$PGE_INSTANCE/server.log" >/dev/null
}

stop() {
  if [ -f "$PGE_DATA/PG_VERSION" ] && pg_ctl -D "$PGE_DATA" status >/dev/null 2>&1; then
    pg_ctl -D "$PGE_DATA" -w -m fast stop >/dev/null
  fi
}

case "${1:-}" in
  install) install_ext ;;
  start) start ;;
  stop) stop ;;
  status) pg_ctl -D "$PGE_DATA" status ;;
  reset) reset_settings ;;
  *) echo "usage: $0 install|start|stop|status|reset" >&2; exit 2 ;;
esac
