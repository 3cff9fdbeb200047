#!/usr/bin/env bash
# Load test of the HTTP gateway (examples/gateway.rs) with wrk, on
# 127.0.0.1 only: the testguest's `echo` under the `Always` policy (a reset
# after every request), then the same gateway serving a native `echo`
# (`--native`, no VM) with the same wrk settings. Prints throughput and
# p50/p99/p99.9 latency of both and `gateway.rps_ratio` (VM / native).
#
#   benches/gateway.sh [SECONDS] [CONNECTIONS]     (defaults: 10 s, 16)
#
# Environment: GATEWAY_PORT (default 18571), GATEWAY_WORKERS (default: the
# number of cores), CARGO_TARGET_DIR. Installs wrk with apt-get when it is
# missing. Stops every gateway it started.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-10}
connections=${2:-16}
port=${GATEWAY_PORT:-18571}
workers=${GATEWAY_WORKERS:-$(nproc)}

if ! command -v wrk >/dev/null; then
    echo "installing wrk"
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi

cargo build --release --example gateway
bin=${CARGO_TARGET_DIR:-target}/release/examples/gateway

gateway_pid=
stop_gateway() {
    if [[ -n $gateway_pid ]]; then
        kill -TERM "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
        gateway_pid=
    fi
}
trap stop_gateway EXIT

# run MODE [gateway flags...]: starts the gateway, loads it, stops it, and
# leaves wrk's RESULT line in $result.
run() {
    local mode=$1
    shift
    "$bin" --listen "127.0.0.1:$port" --workers "$workers" "$@" 2>"/tmp/gateway-$mode.log" &
    gateway_pid=$!
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        if ! kill -0 "$gateway_pid" 2>/dev/null; then
            cat "/tmp/gateway-$mode.log" >&2
            echo "the gateway did not start" >&2
            exit 1
        fi
        sleep 0.05
    done
    result=$(wrk -t1 -c"$connections" -d"${seconds}s" --timeout 5s -s benches/gateway.lua \
        "http://127.0.0.1:$port/fn/echo" | grep '^RESULT')
    stop_gateway
    echo "$mode: $result" | awk '{
        for (i = 3; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%-7s %9.0f req/s  p50 %6.0f us  p99 %6.0f us  p99.9 %6.0f us  (%d requests, %d errors, %d non-2xx)\n",
            $1, v["requests"] / v["duration_us"] * 1e6, v["p50_us"], v["p99_us"], v["p999_us"],
            v["requests"], v["errors"], v["non2xx"]
    }'
}

rps() { awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
               printf "%.1f", v["requests"] / v["duration_us"] * 1e6 }' <<<"$1"; }
failures() { awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                    print v["errors"] + v["non2xx"] }' <<<"$1"; }

echo "wrk -t1 -c$connections -d${seconds}s, POST /fn/echo, gateway with $workers workers"
run vm
vm=$result
run native --native
native=$result
awk -v vm="$(rps "$vm")" -v native="$(rps "$native")" \
    'BEGIN { printf "gateway.rps_ratio %.2f (VM with Always %.0f req/s / native %.0f req/s; target >= 0.35)\n", vm / native, vm, native }'
if [[ $(failures "$vm") != 0 || $(failures "$native") != 0 ]]; then
    echo "requests failed" >&2
    exit 1
fi
