#!/usr/bin/env bash
# The benchmark suite (not part of scripts/test.sh): Criterion for the core, then SQL benchmarks
# against pgcrypto and a bare AES-256-GCM floor, INSERT cost, pgbench, KMS economy.
# Writes docs/benchmarks.md and the README's summary table.
#
#   scripts/bench.sh                 # full run (about 15-25 minutes on 2 cores)
#   PGE_BENCH_QUICK=1 scripts/bench.sh   # a smoke run with small row counts
#   scripts/bench.sh --search        # only the blind-index benchmark (benches/sql/search_bench.py)
#   scripts/bench.sh --ratios        # per-value ratios to bare AES-GCM, HMAC and pgcrypto: instruction
#                                    # counts (benches/sql/callgrind.py, ~4 min) then CPU (cpu_ratios.py, 41 rounds, ~7 min)
#   scripts/bench.sh --callgrind     # only the instruction counts
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
cd "$PGE_ROOT"

bash "$here/setup.sh"

search_only=0 callgrind_only=0
[ "${1:-}" = --search ] && search_only=1
[ "${1:-}" = --callgrind ] && callgrind_only=1
[ "${1:-}" = --ratios ] && callgrind_only=2
if [ "$search_only" = 0 ] && [ "$callgrind_only" = 0 ]; then
  echo "==> Criterion (core)"
  cargo bench -p pg_envelope_benches --bench core
fi

echo "==> install a build WITH the bench-only envelope_bench schema"
sudo=()
[ "$(id -u)" = 0 ] || sudo=(--sudo)
pge_rehome_installed_so "$PGE_PG15_CONFIG"   # a new inode: running backends keep theirs
cargo pgrx install --release --pg-config "$PGE_PG15_CONFIG" --features bench-floor "${sudo[@]}"
bash "$here/cluster.sh" start
bash "$here/kms.sh" start-openbao   # for the cold-tenant latency with a real KMS
restore_normal_build() {
  echo "==> reinstall the normal build (no envelope_bench)"
  bash "$here/cluster.sh" install && bash "$here/cluster.sh" start
}
trap restore_normal_build EXIT

if [ "$search_only" = 1 ]; then
  "$PGE_STATE/py-venv/bin/python" benches/sql/search_bench.py
  exit 0
fi
if [ "$callgrind_only" != 0 ]; then
  shift
  "$PGE_STATE/py-venv/bin/python" benches/sql/callgrind.py --audit --out-json "$PGE_ROOT/target/callgrind.json" "$@"
  if [ "$callgrind_only" = 2 ]; then
    "$PGE_STATE/py-venv/bin/python" benches/sql/cpu_ratios.py --out-json "$PGE_ROOT/target/cpu-ratios.json"
  fi
  exit 0
fi
args=(--out-json "$PGE_ROOT/benches/results/sql.json")
if [ "${PGE_BENCH_QUICK:-0}" = 1 ]; then
  args+=(--rows 100000 --rows-1k 20000 --rounds 2 --pgbench-seconds 5 --pgbench-rounds 1)
fi
"$PGE_STATE/py-venv/bin/python" benches/sql/bench.py "${args[@]}"
"$PGE_STATE/py-venv/bin/python" benches/sql/report.py "$PGE_ROOT/benches/results/sql.json" "scripts/bench.sh"
"$PGE_STATE/py-venv/bin/python" benches/sql/search_bench.py
