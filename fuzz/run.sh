#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) on the nightly toolchain, one after
# the other; corpora stay in fuzz/corpus (not in git), crashes in fuzz/artifacts.
#
#   ./fuzz/run.sh 720        # 12 minutes per target, an hour across the five
#
# Needs `cargo install cargo-fuzz` and the nightly toolchain. A crash stops the run; turn
# it into a unit test where the code is, then fix it.
set -euo pipefail
SECONDS_EACH=${1:-60}
cd "$(dirname "$0")/.."
for t in ${TARGETS:-config target probe token_answer callback}; do
  echo "== $t ($SECONDS_EACH s)"
  cargo +nightly fuzz run "$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 2>&1 \
    | grep -E "^(#[0-9]+ *DONE|Done [0-9]+ runs|==[0-9]+==|SUMMARY|.*panicked)" || true
done
