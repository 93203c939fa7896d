#!/usr/bin/env bash
# Golden SQL tests (pg_regress) against the project's running cluster.
#   scripts/regress.sh            # run pg_test/regress/sql/*.sql in order, compare with expected/
#   scripts/regress.sh --accept   # after a deliberate change: copy results over expected/ (review the diff!)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"

PG_REGRESS="$("$PGE_PG15_CONFIG" --pkglibdir)/pgxs/src/test/regress/pg_regress"
IN="$PGE_ROOT/pg_test/regress"
OUT="$PGE_ROOT/target/regress"
mkdir -p "$OUT"
tests=()
for f in "$IN"/sql/*.sql; do tests+=("$(basename "$f" .sql)"); done

set +e
"$PG_REGRESS" --bindir="$PGE_PG15_BIN" --inputdir="$IN" --outputdir="$OUT" \
  --host="$PGE_SOCKDIR" --port="$PGE_PORT" --user=postgres --dbname=envelope_regress "${tests[@]}"
rc=$?
set -e
if [ "${1:-}" = "--accept" ]; then
  for t in "${tests[@]}"; do cp "$OUT/results/$t.out" "$IN/expected/$t.out"; done
  echo "accepted results into $IN/expected (review with git diff)"
  exit 0
fi
if [ $rc -ne 0 ] && [ -f "$OUT/regression.diffs" ]; then
  echo "---- regression.diffs ----"; head -200 "$OUT/regression.diffs"
fi
exit $rc
