#!/usr/bin/env bash
# Rule-sync benchmark of issue 4: full program of N services x 10 backends (default 10,000),
# then +1 service, then one endpoint flip; swarmnet's nftables load balancer (netlink, release
# build) beside kube-proxy's two methods on the same load: nftables mode (`nft -f` of the whole
# table, then of the changed objects) and iptables mode (`iptables-restore`, then
# `iptables-restore --noflush` of the changed chains). Prints a table, writes
# bench-out/lb-sync.json. Needs root, nft, iptables, iproute2, python3, cargo.
#
#   sudo bench/lb-sync.sh [--services N] [--step-timeout S]
#
# Never touches the root network namespace: ours runs in a namespace the test thread unshares;
# the peers run in namespaces created here (snlbbench<pid>-nft/-ipt) and deleted by the EXIT
# trap. Each peer step is bounded by --step-timeout (default 240 s).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVICES=10000
STEP_TIMEOUT=240
while [ $# -gt 0 ]; do
  case "$1" in
    --services) SERVICES="$2"; shift 2 ;;
    --step-timeout) STEP_TIMEOUT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
for t in nft iptables-restore ip python3 cargo timeout; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install nftables iptables iproute2)" >&2; exit 1; }
done
NS_NFT="snlbbench$$-nft"
NS_IPT="snlbbench$$-ipt"
WORK="$(mktemp -d /tmp/snlbbench.XXXXXX)"
cleanup() {
  ip netns del "$NS_NFT" 2>/dev/null || true
  ip netns del "$NS_IPT" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p bench-out

echo "== building (release)" >&2
cargo test --release -q -p swarmnet-netd --test lb_contract --no-run >&2

echo "== swarmnet: $SERVICES services x 10 backends (netlink)" >&2
OURS="$(SWARMNET_LB_BENCH_SERVICES=$SERVICES timeout 300 cargo test --release -q -p swarmnet-netd \
  --test lb_contract bench_lb_sync -- --ignored --nocapture --test-threads 1 2>&1 \
  | sed -n 's/^LBSYNC //p')"
[ -n "$OURS" ] || { echo "our benchmark printed nothing" >&2; exit 1; }

echo "== peers: generating kube-proxy inputs" >&2
python3 bench/lb_sync_peers.py "$WORK" "$SERVICES"
ip netns add "$NS_NFT"
ip netns add "$NS_IPT"

# Runs "$@" in namespace $1 with stdin from $2, bounded; prints seconds or "timeout"/"error".
timed() {
  local ns="$1" input="$2"; shift 2
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  timeout "$STEP_TIMEOUT" ip netns exec "$ns" "$@" < "$input" >/dev/null 2>"$WORK/err" || rc=$?
  t1=$(date +%s.%N)
  if [ "$rc" = 124 ]; then echo timeout; elif [ "$rc" != 0 ]; then
    echo "peer step failed: $* < $input: $(head -c 300 "$WORK/err")" >&2; echo error
  else python3 -c "print(f'{$t1 - $t0:.4f}')"; fi
}

echo "== kube-proxy nftables mode (nft -f)" >&2
KPN_FULL=$(timed "$NS_NFT" "$WORK/kp-nft-full.nft" nft -f -)
KPN_ADD=$(timed "$NS_NFT" "$WORK/kp-nft-add.nft" nft -f -)
KPN_FLIP=$(timed "$NS_NFT" "$WORK/kp-nft-flip.nft" nft -f -)
ip netns del "$NS_NFT"

echo "== kube-proxy iptables mode ($(iptables-restore --version 2>/dev/null | head -1))" >&2
KPI_FULL=$(timed "$NS_IPT" "$WORK/kp-ipt-full.txt" iptables-restore)
KPI_ADD=$(timed "$NS_IPT" "$WORK/kp-ipt-add.txt" iptables-restore --noflush)
KPI_FLIP=$(timed "$NS_IPT" "$WORK/kp-ipt-flip.txt" iptables-restore --noflush)
ip netns del "$NS_IPT"

python3 - "$OURS" "$SERVICES" "$KPN_FULL" "$KPN_ADD" "$KPN_FLIP" "$KPI_FULL" "$KPI_ADD" "$KPI_FLIP" \
  "$(iptables-restore --version 2>/dev/null | head -1)" "$(nft --version)" "$(uname -r)" <<'PY'
import json, sys
ours = json.loads(sys.argv[1])
n = int(sys.argv[2])
def sec(v):
    return None if v in ("timeout", "error") else float(v)
peers = {
    "kube-proxy nftables (nft -f)": [sec(v) for v in sys.argv[3:6]],
    "kube-proxy iptables (iptables-restore)": [sec(v) for v in sys.argv[6:9]],
}
raw = {k: v for k, v in zip(peers, [sys.argv[3:6], sys.argv[6:9]])}
ours_row = [ours["full_s"], ours["add_service_ms"] / 1e3, ours["flip_ms"] / 1e3]
def fmt(v, raw=None):
    if v is None:
        return raw or "-"
    return f"{v:.3f} s" if v >= 1 else f"{v * 1e3:.2f} ms"
print(f"\nrule sync, {n} services x 10 backends (targets: full < 2 s, +1 service and flip < 5 ms)\n")
print(f"| {'method':40} | {'full program':>14} | {'+1 service':>12} | {'endpoint flip':>14} |")
print(f"|{'-' * 42}|{'-' * 16}|{'-' * 14}|{'-' * 16}|")
print(f"| {'swarmnet (netlink, one batch)':40} | {fmt(ours_row[0]):>14} | {fmt(ours_row[1]):>12} | {fmt(ours_row[2]):>14} |")
for name, vals in peers.items():
    r = raw[name]
    print(f"| {name:40} | {fmt(vals[0], r[0]):>14} | {fmt(vals[1], r[1]):>12} | {fmt(vals[2], r[2]):>14} |")
print(f"\nswarmnet batches: full {ours['full_messages']} messages, +1 service {ours['add_service_messages']}, flip {ours['flip_messages']} (medians of 21 incremental runs)")
out = {
    "services": n, "backends_per_service": 10, "kernel": sys.argv[11],
    "tools": {"iptables": sys.argv[9], "nft": sys.argv[10]},
    "swarmnet": ours,
    "peers": {k: {"full_s": v[0], "add_service_s": v[1], "flip_s": v[2], "raw": raw[k]} for k, v in peers.items()},
}
with open("bench-out/lb-sync.json", "w") as f:
    json.dump(out, f, indent=2)
print("wrote bench-out/lb-sync.json")
PY
