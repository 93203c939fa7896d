#!/usr/bin/env bash
# Builds a previous release of pg_envelope from its commit into a staged tree (cached), for the
# upgrade test. Prints the staged tree's path (STAGE/usr/lib/postgresql/15/lib/pg_envelope.so,
# STAGE/usr/share/postgresql/15/extension/pg_envelope--<version>.sql).
#
#   scripts/build-previous.sh 0.1.0
#
# Releases and their commits (a release is the commit whose Cargo.toml carries its version):
#   0.1.0  4eab78b6  (tag v0.1.0)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"

version="${1:?usage: $0 VERSION}"
case "$version" in
  0.1.0) commit=4eab78b ;;
  *) echo "unknown release $version" >&2; exit 2 ;;
esac
commit="$(git -C "$PGE_ROOT" rev-parse --verify "$commit^{commit}")"
base="$PGE_STATE/previous/$version-${commit:0:12}"
stage="$base/target/release/pg_envelope-pg15"
if [ -f "$stage/usr/share/postgresql/15/extension/pg_envelope--$version.sql" ] && [ -f "$stage/usr/lib/postgresql/15/lib/pg_envelope.so" ]; then
  echo "$stage"
  exit 0
fi
mkdir -p "$base"
rm -rf "$base/src"
git -C "$PGE_ROOT" archive --format=tar "$commit" | { mkdir -p "$base/src" && tar -x -C "$base/src"; }
( cd "$base/src" && CARGO_TARGET_DIR="$base/target" cargo pgrx package --pg-config "$PGE_PG15_CONFIG" >&2 )
echo "$stage"
