#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running demo:
# installs prerequisites, builds and installs pg_envelope into PostgreSQL 15, starts the
# project's cluster (127.0.0.1:54315, as the postgres user), creates the local root key,
# runs the demo, and leaves the cluster running. Safe to run again.
#
#   scripts/demo.sh             # tenants under the embedded `local` provider (root key in a file)
#   scripts/demo.sh --openbao   # tenants under a real OpenBao Transit key (dev server, TLS, 127.0.0.1:8200)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"

PROVIDER=local
if [ "${1:-}" = "--openbao" ]; then PROVIDER=bao; fi

bash "$here/setup.sh"
bash "$here/cluster.sh" install
bash "$here/cluster.sh" start
if [ "$PROVIDER" = bao ]; then
  bash "$here/kms.sh" start-openbao
fi

DB=envelope_demo
# The demo database is recreated on every run, so it always matches the installed extension.
pge_psql -d postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
if [ "$PROVIDER" = bao ]; then
  pge_psql -q -d "$DB" -c "CREATE EXTENSION pg_envelope" -c "SELECT envelope.add_key_provider('bao', 'vault_transit',
    '{\"url\": \"https://127.0.0.1:8200\", \"key\": \"pg-root\", \"token_file\": \"$PGE_STATE/openbao/token\", \"ca_file\": \"$PGE_STATE/openbao/ca.pem\"}')" >/dev/null
  pge_psql -d "$DB" -c "SELECT envelope.verify_provider('bao')"
fi
pge_psql -q -d "$DB" -v provider="$PROVIDER" -f "$here/demo.sql"

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
