#!/usr/bin/env bash
# Intent to data plane (issue 7): time from `swarmnet service scale` returning until every
# node's load balancer and DNS reflect the change, p50/p99/max over 50 changes (web scaled
# 3 <-> 6) on a 3-node lab with 3 managers (`swarmnet lab up`: one network namespace per node,
# netd in client mode, the orchestrator's assignment stream). Target: p50 under 200 ms. No
# peer runs here (Kubernetes is not installable on this machine): the published Kubernetes
# nftables figure (p50 1.52 s, p99 6.8 s at 100 nodes, kubernetes/kubernetes#124272) is
# printed for reference only. Output also goes to bench-out/intent.txt.
#
#   bench/intent.sh [--changes 50] [--debug]
#
# Needs root (namespaces); everything lives in the lab's own namespaces (underlay
# 198.19.0.0/24) and is removed by `swarmnet lab down` on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
CHANGES=50
PROFILE=release
while [ $# -gt 0 ]; do
  case "$1" in
    --changes) CHANGES="$2"; shift 2 ;;
    --debug) PROFILE=debug; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
for c in cargo nsenter nft dig python3; do
  command -v "$c" >/dev/null || { echo "missing $c (scripts/install-deps.sh)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
mkdir -p bench-out
echo "== building ($PROFILE)" >&2
flag=""; [ "$PROFILE" = release ] && flag="--release"
cargo build $flag -q -p swarmnet-cli -p swarmnet-netd -p swarmnet-orchestrator >&2
BIN="$PWD/target/$PROFILE/swarmnet"
LAB=ib$$
trap '"$BIN" lab down --name "$LAB" >/dev/null 2>&1 || true' EXIT
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee bench-out/intent.txt
"$BIN" lab up --name "$LAB" --nodes 3 --managers 3 >&2
SWARMNET_BIN="$BIN" SWARMNET_CONTEXT="$LAB" LAB="$LAB" CHANGES="$CHANGES" \
  timeout 1200 python3 bench/intent_latency.py | tee -a bench-out/intent.txt
