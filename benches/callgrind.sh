#!/usr/bin/env bash
# Instructions per proxied request (README "Performance"): the proxy under callgrind in front
# of the bench harness's nginx upstream, a wrk warm-up, counters zeroed, a measured wrk run,
# a dump, total Ir / requests. Counts repeat from run to run (unlike timings on a shared VM);
# the spread left comes from TLS handshakes when the upstream recycles connections.
#
#   BENCH=/tmp/bench ./benches/callgrind.sh target/release/cx-proxy
#
# LOG_LEVEL=info measures with the access log on (default: warn, off). KEEP=FILE keeps the dump.
# The config has no tuning keys (the defaults). With the bench's h2 upstream
# (UPSTREAM_CONF=conf/upstream-nginx-h2.conf ./start.sh upstream) it measures the h2 path.
# BENCH is a writable copy of ../shared/bench with its upstream started (`./start.sh upstream`).
# Needs valgrind, wrk and curl. Stops only the proxy it started.
set -euo pipefail
BIN=${1:?usage: callgrind.sh PATH/TO/cx-proxy}
BENCH=${BENCH:?set BENCH to the bench folder (its upstream running)}
LOG_LEVEL=${LOG_LEVEL:-warn}
WORK=$(mktemp -d)
cat >"$WORK/bench.toml" <<TOML
[server]
listen = "127.0.0.1:18090"
[upstream]
url = "https://127.0.0.1:19443"
ca_file = "$BENCH/certs/ca.crt"
[[app]]
name = "bench"
app_key = "ak"
corp_id = 1
corp_secret_env = "CX_BENCH_SECRET"
prefix = "/"
TOML
URL='http://127.0.0.1:18090/api/apps/v1/robot/groups?group_id=1'
CX_BENCH_SECRET=x valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" \
  "$BIN" --log-level "$LOG_LEVEL" run -c "$WORK/bench.toml" >"$WORK/proxy.log" 2>&1 &
VPID=$!
for _ in $(seq 1 100); do curl -sf "$URL" >/dev/null && break; sleep 0.3; done
wrk -t1 -c8 -d3s "$URL" >/dev/null
callgrind_control -z "$VPID" >/dev/null
wrk -t1 -c8 -d8s "$URL" >"$WORK/wrk.txt"
callgrind_control -d "$VPID" >/dev/null
sleep 1
REQS=$(grep -oE '^ +[0-9]+ requests' "$WORK/wrk.txt" | grep -oE '[0-9]+')
kill "$VPID"; wait "$VPID" 2>/dev/null || true
DUMP=$(ls "$WORK"/cg.*.1 | head -1)
TOTAL=$(grep -E '^(summary|totals):' "$DUMP" | head -1 | grep -oE '[0-9]+' | head -1)
echo "requests=$REQS total_Ir=$TOTAL per_request=$((TOTAL / REQS))"
# TLS handshakes that fell in the window (the upstream recycled connections): ring's key
# exchange and signature arithmetic, by self cost. Subtracted, the rest is per-request work.
HS=$(callgrind_annotate --threshold=100 "$DUMP" 2>/dev/null \
  | grep -E 'x25519|fe_|ge_|sha512|table_select|p256|nistz|bn_mul|limbs_mul|GFp_' \
  | awk '{gsub(",","",$1); s+=$1} END {print s+0}' || true)
echo "handshake_Ir=$HS per_request_without_handshakes=$(((TOTAL - HS) / REQS))"
if [ -n "${KEEP:-}" ]; then cp "$DUMP" "$KEEP"; fi
rm -rf "$WORK"
