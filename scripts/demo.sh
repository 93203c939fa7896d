#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running demo:
# installs prerequisites, builds and installs pg_envelope into PostgreSQL 15, starts the
# project's cluster (127.0.0.1:54315, as the postgres user), creates the local root key,
# runs the demo, and leaves the cluster running. Safe to run again.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"

bash "$here/setup.sh"
bash "$here/cluster.sh" install
bash "$here/cluster.sh" start

DB=envelope_demo
# The demo database is recreated on every run, so it always matches the installed extension.
pge_psql -d postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
pge_psql -q -d "$DB" -f "$here/demo.sql"

as_root tee "$PGE_ENV_FILE" >/dev/null <<ENV
# Written by scripts/demo.sh: source it, then run psql.
export PGHOST=$PGE_SOCKDIR
export PGPORT=$PGE_PORT
export PGDATABASE=$DB
export PGUSER=postgres
ENV
as_root chmod 0644 "$PGE_ENV_FILE"

cat <<MSG

pg_envelope demo is ready; the cluster keeps running.
  Connect:   psql "host=$PGE_SOCKDIR port=$PGE_PORT dbname=$DB user=postgres"
  Or:        . $PGE_ENV_FILE && psql
  Stop:      scripts/cluster.sh stop
MSG
