#!/bin/bash
# Raft write throughput: three swarmnet managers beside a three-member etcd 3.4 cluster
# (Debian's etcd-server), both on loopback, in one run. For 1, 16 and 64 concurrent clients,
# acknowledged writes per second: swarmnet `Services.Scale` (a state-machine command that
# re-plans the service's tasks), etcd 256-byte `KV.Put`. Clients are spread over the three
# endpoints (followers forward to the leader in both systems). Both fsync every commit.
# See bench/README.md.
#
# Everything listens on 127.0.0.1 only; data lives in a temporary directory removed on exit;
# the EXIT trap stops only the processes this script started (by pid).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ORCH="${SWARMNET_ORCHESTRATOR_BIN:-$REPO/target/release/swarmnet-orchestrator}"
LOAD="${SWARMNET_RAFT_LOAD_BIN:-$REPO/target/release/examples/raft_load}"
SECS=5
CLIENTS="1 16 64"

while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECS=$2; shift 2 ;;
        --clients) CLIENTS=$2; shift 2 ;;
        --quick) SECS=2; CLIENTS="1 16"; shift ;;
        *) echo "usage: $0 [--seconds S] [--clients \"1 16 64\"] [--quick]" >&2; exit 2 ;;
    esac
done

command -v etcd >/dev/null || { echo "etcd not found: apt-get install etcd-server" >&2; exit 1; }
if [ ! -x "$ORCH" ] || [ ! -x "$LOAD" ]; then
    echo "building release binaries (cargo build --release -p swarmnet-orchestrator --bin swarmnet-orchestrator --example raft_load)" >&2
    (cd "$REPO" && cargo build --release -p swarmnet-orchestrator --bin swarmnet-orchestrator --example raft_load)
fi

TMP=$(mktemp -d /tmp/snraftbench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# Ports from the pid, so parallel runs do not collide.
BASE=$((20000 + ($$ % 5000) * 8))
M=(); E=(); P=()
for i in 1 2 3; do
    M+=("127.0.0.1:$((BASE + i))")
    E+=("127.0.0.1:$((BASE + 3 + i))")
done
PEERS=""
for i in 1 2 3; do
    P+=("http://127.0.0.1:$((BASE + 6 + i * 100))")
    PEERS="${PEERS:+$PEERS,}e$i=${P[$((i - 1))]}"
done

echo "== starting 3 swarmnet managers and 3 etcd members" >&2
"$ORCH" --id 1 --listen "${M[0]}" --data-dir "$TMP/m1" --bootstrap >"$TMP/m1.log" 2>&1 &
PIDS+=($!)
# Every call is mTLS: the load generator uses the administrator certificate of manager 1.
ADMIN="$TMP/m1/tls/admin"
TOKEN=""
for _ in $(seq 1 50); do
    TOKEN=$("$LOAD" --target swarmnet --addrs "${M[0]}" --tls-dir "$ADMIN" --init 2>/dev/null) && break
    sleep 0.2
done
[ -n "$TOKEN" ] || { echo "manager 1 did not initialize; see $TMP/m1.log" >&2; exit 1; }
for i in 2 3; do
    "$ORCH" --id "$i" --listen "${M[$((i - 1))]}" --data-dir "$TMP/m$i" --join "${M[0]}" --join-token "$TOKEN" >"$TMP/m$i.log" 2>&1 &
    PIDS+=($!)
done
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$TMP/e$i" \
        --listen-client-urls "http://${E[$((i - 1))]}" --advertise-client-urls "http://${E[$((i - 1))]}" \
        --listen-peer-urls "${P[$((i - 1))]}" --initial-advertise-peer-urls "${P[$((i - 1))]}" \
        --initial-cluster "$PEERS" --initial-cluster-state new --initial-cluster-token "snb$$" \
        >"$TMP/e$i.log" 2>&1 &
    PIDS+=($!)
done
MADDRS=$(IFS=,; echo "${M[*]}")
EADDRS=$(IFS=,; echo "${E[*]}")
"$LOAD" --target swarmnet --addrs "$MADDRS" --tls-dir "$ADMIN" --wait
for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "$EADDRS" endpoint health >/dev/null 2>&1 && break
    sleep 0.2
done

printf '%-8s %-8s %12s %10s %10s %8s\n' system clients writes/s p50_ms p99_ms errors
for c in $CLIENTS; do
    for t in swarmnet etcd; do
        if [ "$t" = swarmnet ]; then a=$MADDRS; else a=$EADDRS; fi
        line=$("$LOAD" --target "$t" --addrs "$a" --tls-dir "$ADMIN" --clients "$c" --seconds "$SECS")
        python3 -c '
import json, sys
r = json.loads(sys.argv[1])
print("%-8s %-8s %12.0f %10.2f %10.2f %8d" % (r["target"], r["clients"], r["writes_per_s"], r["p50_ms"], r["p99_ms"], r["errors"]))
' "$line"
    done
done
