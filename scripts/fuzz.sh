#!/usr/bin/env bash
# Coverage-guided fuzzing of the core's parsers: cargo-fuzz with libFuzzer on the nightly
# toolchain (fuzz/, targets in crates/core/src/fuzzing.rs). Not part of scripts/test.sh: the core
# tier replays the kept corpus and every crash reproducer on stable Rust instead (fast).
#
#   scripts/fuzz.sh                  # every target, PGE_FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh term 600         # one target for 10 minutes
#   PGE_FUZZ_JOBS=2 scripts/fuzz.sh  # two libFuzzer processes per target (2 cores)
#
# Prints executions, coverage and corpus size per target and the total. New inputs go to
# fuzz/corpus/<target>/ (keep them small: `cargo +nightly fuzz cmin <target>` before committing),
# crash reproducers to fuzz/artifacts/<target>/ (commit them with the fix: the replay runs them).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
cd "$PGE_ROOT/fuzz"

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Every target is a [[bin]] of fuzz/Cargo.toml (and an entry of fuzzing::TARGETS).
mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^pg_envelope_fuzz$')
if [ $# -ge 1 ]; then targets=("$1"); else targets=("${all[@]}"); fi
secs="${2:-${PGE_FUZZ_SECONDS:-60}}"
jobs="${PGE_FUZZ_JOBS:-1}"
logdir="$PGE_ROOT/target/fuzz-logs"
mkdir -p "$logdir"

cargo +nightly fuzz build --release >/dev/null
total=0
printf '%-18s %14s %8s %8s %6s\n' target executions cov features corpus
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="$logdir/$t.log"
  # -timeout: an input taking over 10 s is a hang; -rss_limit_mb: a memory blow-up is a crash.
  par=()
  [ "$jobs" -gt 1 ] && par=(-jobs="$jobs" -workers="$jobs")
  # (AddressSanitizer's quarantine makes the RSS grow to a few hundred MB: not a leak.)
  if ! cargo +nightly fuzz run --release "$t" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 "${par[@]}" >"$log" 2>&1; then
    echo "CRASH, HANG OR PANIC in $t: see $log and fuzz/artifacts/$t/" >&2
    tail -30 "$log" >&2
    exit 1
  fi
  execs=$( { grep -h 'stat::number_of_executed_units' "$log" fuzz-*.log 2>/dev/null || true; } | awk '{s += $2} END {print s + 0}')
  last=$( { grep -h -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" fuzz-*.log 2>/dev/null || true; } | tail -1)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(find "corpus/$t" -type f | wc -l)
  printf '%-18s %14s %8s %8s %6s\n' "$t" "$execs" "${cov:-?}" "${ft:-?}" "$corp"
  total=$((total + execs))
  rm -f fuzz-*.log
done
echo "total executions: $total"
