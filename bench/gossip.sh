#!/usr/bin/env bash
# Gossip propagation benchmark of issue 6: time for an endpoint added on one node to be seen
# by every other node (p50, p99, max) and bytes sent per second per node, for clusters of
# 10, 50, 100 and 200 in-process nodes over UDP on 127.0.0.1, release build. Ours (chitchat
# 0.13 over the sealed transport, as netd runs it) beside the peer measured in the same run:
# chitchat 0.13 over its own unauthenticated UDP transport. The published Serf and NetworkDB
# figures (../shared/ANCHORS.md) are printed with them. Output also goes to
# bench-out/gossip.txt.
#
#   bench/gossip.sh [--nodes 10,50,100,200] [--intervals 500,200] [--rounds 20]
#                   [--variants sealed,plain]
#
# No root needed; only loopback sockets of this process (one UDP port per node from 20000 up,
# plus the sealed transport's two codec socket pairs per node on 127.0.0.1). Every node runs
# on the same tokio runtime with 2 worker threads: on a 2-core machine all N nodes share two
# cores, so the larger sizes measure a CPU-bound cluster (say so when quoting them).
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=10,50,100,200
INTERVALS=500,200
ROUNDS=20
VARIANTS=sealed,plain
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --intervals) INTERVALS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --variants) VARIANTS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v cargo >/dev/null || { echo "missing cargo" >&2; exit 1; }
mkdir -p bench-out
echo "== building (release)" >&2
cargo test --release -q -p swarmnet-netd --test gossip_bench --no-run >&2
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee bench-out/gossip.txt
SWARMNET_GOSSIP_NODES="$NODES" SWARMNET_GOSSIP_INTERVALS_MS="$INTERVALS" \
SWARMNET_GOSSIP_ROUNDS="$ROUNDS" SWARMNET_GOSSIP_VARIANTS="$VARIANTS" \
  timeout 3600 cargo test --release -q -p swarmnet-netd --test gossip_bench -- \
  --ignored --nocapture --test-threads=1 2>&1 | grep --line-buffered -v '^$' | tee -a bench-out/gossip.txt
