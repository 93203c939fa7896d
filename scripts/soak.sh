#!/usr/bin/env bash
# The soak (benches/soak.py): 32 sessions over 20 tenants on a private cluster (pg15-soak,
# 127.0.0.1:54342) and a private OpenBao (127.0.0.1:8242) while a rotation with online
# re-encryption, a suspension, a lockdown and an OpenBao restart happen. Not part of
# scripts/test.sh; its one-minute variant is pg_test/integration/test_soak.py.
#
#   scripts/soak.sh                  # 10 minutes, summary in target/soak.json
#   scripts/soak.sh --duration 60    # one minute
#   scripts/soak.sh --help
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
py=("$PGE_STATE/py-venv/bin/python" "$PGE_ROOT/benches/soak.py" "$@")
if [ "$(id -u)" = 0 ]; then exec "${py[@]}"; else exec sudo "${py[@]}"; fi
