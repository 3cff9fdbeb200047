#!/usr/bin/env bash
# A three-node Garage cluster on loopback, for the store's fleet tests and
# benchmarks, and for developers:
#
#   bash .ci/garage-cluster.sh start DIR [NODES] # 3 nodes (or 1), layout, key, bucket
#   bash .ci/garage-cluster.sh status DIR
#   bash .ci/garage-cluster.sh stop-node DIR N  # N = 1, 2 or 3
#   bash .ci/garage-cluster.sh start-node DIR N
#   bash .ci/garage-cluster.sh kill-nodes DIR N... # SIGKILL, all at once
#   bash .ci/garage-cluster.sh stop DIR         # every node this script started
#
# `replication_factor = 3` with the default `consistency_mode = "consistent"`:
# reads and writes need two of the three nodes, so with one node down both
# keep working. Each node is in its own zone. `start DIR 1` starts a single
# node (`replication_factor = 1`) the same way, for comparison.
#
# `start` writes DIR/cluster.env (shell syntax, also read by the tests):
#   SNAPVM_S3_ENDPOINT_1..3   each node's S3 API
#   SNAPVM_S3_BUCKET, SNAPVM_S3_REGION, SNAPVM_S3_ACCESS_KEY_ID,
#   SNAPVM_S3_SECRET_ACCESS_KEY
#
# Node N's pid is in DIR/nodeN/pid; `stop` and `stop-node` signal only those
# pids, and only while they still run the garage binary. Every wait is bounded
# (SNAPVM_GARAGE_TIMEOUT seconds, default 60). The binary is `garage` on PATH,
# else ~/.cargo/bin/garage (bash .ci/store-s3.sh installs it), or
# $SNAPVM_GARAGE.
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 2 ] || usage
cmd="$1"
dir="$2"
timeout="${SNAPVM_GARAGE_TIMEOUT:-60}"

garage_bin() {
    if [ -n "${SNAPVM_GARAGE:-}" ]; then
        echo "$SNAPVM_GARAGE"
    elif command -v garage >/dev/null 2>&1; then
        command -v garage
    elif [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/garage" ]; then
        echo "${CARGO_HOME:-$HOME/.cargo}/bin/garage"
    else
        echo "garage is not installed (bash .ci/store-s3.sh installs it)" >&2
        exit 3
    fi
}

free_port() {
    python3 - <<'EOF' 2>/dev/null || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
}

# Whether pid $1 is alive and runs garage (a reused pid is never signalled).
is_ours() {
    local pid="$1"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] &&
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "garage.* server"
}

node_cli() {
    local n="$1"
    shift
    "$bin" -c "$dir/node$n/garage.toml" "$@"
}

# Runs a garage CLI command until it succeeds or the timeout passes.
retry() {
    local deadline=$((SECONDS + timeout)) out
    while true; do
        if out="$("$@" 2>&1)"; then
            printf '%s\n' "$out"
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "timed out after ${timeout}s: $*" >&2
            printf '%s\n' "$out" >&2
            return 1
        fi
        sleep 0.2
    done
}

start_node() {
    local n="$1" pid
    pid="$(cat "$dir/node$n/pid" 2>/dev/null || true)"
    if is_ours "$pid"; then
        echo "node $n already running (pid $pid)"
        return 0
    fi
    "$bin" -c "$dir/node$n/garage.toml" server \
        </dev/null >>"$dir/node$n/server.log" 2>&1 &
    echo $! >"$dir/node$n/pid"
    # Ready when it answers over RPC (`node id` alone reads a local file).
    retry node_cli "$n" status >/dev/null
}

stop_node() {
    local n="$1" pid deadline
    pid="$(cat "$dir/node$n/pid" 2>/dev/null || true)"
    if ! is_ours "$pid"; then
        rm -f "$dir/node$n/pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while is_ours "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.1
    done
    if is_ours "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # Reap it if it is our child; otherwise wait for it to disappear.
    wait "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while [ -e "/proc/$pid" ] && is_ours "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.1
    done
    rm -f "$dir/node$n/pid"
}

start() {
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [ -f "$dir/cluster.env" ]; then
        echo "$dir already holds a cluster; stop it first (or use another directory)" >&2
        exit 1
    fi
    local secret n rpc s3 ids=() id key
    secret="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
    for n in $(seq "$nodes"); do
        mkdir -p "$dir/node$n"
        rpc="$(free_port)"
        s3="$(free_port)"
        cat >"$dir/node$n/garage.toml" <<EOF
metadata_dir = "$dir/node$n/meta"
data_dir = "$dir/node$n/data"
db_engine = "lmdb"
replication_factor = $nodes
consistency_mode = "consistent"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
EOF
        echo "$rpc" >"$dir/node$n/rpc_port"
        echo "$s3" >"$dir/node$n/s3_port"
    done
    for n in $(seq "$nodes"); do
        start_node "$n" &
    done
    wait
    for n in $(seq "$nodes"); do
        is_ours "$(cat "$dir/node$n/pid" 2>/dev/null)" || {
            echo "node $n did not start; see $dir/node$n/server.log" >&2
            stop
            exit 1
        }
    done
    for n in $(seq "$nodes"); do
        id="$(retry node_cli "$n" node id -q | tail -n1)"
        ids+=("${id%%@*}")
    done
    for n in $(seq 2 "$nodes"); do
        retry node_cli 1 node connect "${ids[$((n - 1))]}@127.0.0.1:$(cat "$dir/node$n/rpc_port")" >/dev/null
    done
    for n in $(seq "$nodes"); do
        retry node_cli 1 layout assign -z "dc$n" -c 1G "${ids[$((n - 1))]}" >/dev/null
    done
    retry node_cli 1 layout apply --version 1 >/dev/null
    retry node_cli 1 bucket create snapvm-test >/dev/null
    key="$(retry node_cli 1 key create snapvm-test)"
    retry node_cli 1 bucket allow --read --write --owner snapvm-test --key snapvm-test >/dev/null
    local key_id secret_key
    key_id="$(printf '%s\n' "$key" | sed -n 's/^Key ID: *//p' | head -n1)"
    secret_key="$(printf '%s\n' "$key" | sed -n 's/^Secret key: *//p' | head -n1)"
    if [ -z "$key_id" ] || [ -z "$secret_key" ]; then
        echo "could not read the key from \`garage key create\`:" >&2
        printf '%s\n' "$key" >&2
        stop
        exit 1
    fi
    {
        for n in $(seq "$nodes"); do
            echo "SNAPVM_S3_ENDPOINT_$n=http://127.0.0.1:$(cat "$dir/node$n/s3_port")"
        done
        echo "SNAPVM_S3_BUCKET=snapvm-test"
        echo "SNAPVM_S3_REGION=garage"
        echo "SNAPVM_S3_ACCESS_KEY_ID=$key_id"
        echo "SNAPVM_S3_SECRET_ACCESS_KEY=$secret_key"
    } >"$dir/cluster.env.tmp"
    mv "$dir/cluster.env.tmp" "$dir/cluster.env"
    status
}

# SIGKILL nodes "$@" at once (a crash, not a shutdown), then waits for them
# to be gone.
kill_nodes() {
    local n pid pids=()
    for n in "$@"; do
        pid="$(cat "$dir/node$n/pid" 2>/dev/null || true)"
        if is_ours "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$dir/node$n/pid"
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 5))
        while [ -e "/proc/$pid" ] && is_ours "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.05
        done
    done
}

stop() {
    local n
    for n in 1 2 3; do
        if [ -d "$dir/node$n" ]; then stop_node "$n"; fi
    done
    rm -f "$dir/cluster.env"
}

status() {
    local n pid state=0
    for n in 1 2 3; do
        [ -d "$dir/node$n" ] || continue
        pid="$(cat "$dir/node$n/pid" 2>/dev/null || true)"
        if is_ours "$pid"; then
            echo "node $n: up (pid $pid, s3 http://127.0.0.1:$(cat "$dir/node$n/s3_port"))"
        else
            echo "node $n: down"
            state=1
        fi
    done
    return $state
}

node_arg() {
    case "${1:-}" in
    1 | 2 | 3) ;;
    *) usage ;;
    esac
}

case "$cmd" in
start)
    nodes="${3:-3}"
    case "$nodes" in
    1 | 3) ;;
    *) usage ;;
    esac
    bin="$(garage_bin)"
    start
    ;;
stop) stop ;;
status) status ;;
stop-node)
    node_arg "${3:-}"
    stop_node "$3"
    ;;
kill-nodes)
    shift 2
    [ $# -ge 1 ] || usage
    for n in "$@"; do node_arg "$n"; done
    kill_nodes "$@"
    ;;
start-node)
    node_arg "${3:-}"
    bin="$(garage_bin)"
    dir="$(cd "$dir" && pwd)"
    start_node "$3"
    ;;
*) usage ;;
esac
