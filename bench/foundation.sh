#!/bin/bash
# Foundation benchmark: bring up N networks × M sandboxes on one node, change one remote
# endpoint, tear everything down — with swarmnet-netd, and with plain `ip` commands doing the
# same work (the naive peer) in the same run, each in a fresh node namespace.
# See bench/README.md. Needs root. Never touches the root network namespace: every link,
# address, route, sysctl and nft table is made inside namespaces created here (prefix
# sntbench<pid>), and the EXIT trap removes all of it.
set -euo pipefail

NETWORKS=50
SANDBOXES=20
STEP_TIMEOUT=600
DO_BATCH=1
DO_PLAIN=1
STRACE_STEP=""
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NETD="$REPO/target/release/swarmnet-netd"
OUT_JSON="$REPO/bench-out/foundation.json"

usage() {
    cat <<EOF
usage: $0 [--networks N] [--sandboxes M] [--quick] [--netd PATH] [--no-batch] [--no-plain]
          [--step-timeout SECONDS] [--out FILE]
  --networks N      overlay networks (default 50)
  --sandboxes M     sandboxes per network, one task each (default 20)
  --quick           5 networks × 4 sandboxes (smoke run)
  --netd PATH       netd binary (default target/release/swarmnet-netd)
  --no-batch        skip the 'ip -batch' peer
  --no-plain        skip the plain 'ip' peer
  --out FILE        JSON results (default bench-out/foundation.json)
  --strace-step S   attach strace ($STRACE_FLAGS, default -f -w -c) to netd in step S (up/change/down); the
                    summary lands in bench-out/foundation-strace-S.txt (slows netd down)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --networks) NETWORKS=$2; shift 2 ;;
        --sandboxes) SANDBOXES=$2; shift 2 ;;
        --quick) NETWORKS=5; SANDBOXES=4; shift ;;
        --netd) NETD=$2; shift 2 ;;
        --no-batch) DO_BATCH=0; shift ;;
        --no-plain) DO_PLAIN=0; shift ;;
        --step-timeout) STEP_TIMEOUT=$2; shift 2 ;;
        --out) OUT_JSON=$2; shift 2 ;;
        --strace-step) STRACE_STEP=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" != 0 ]; then echo "needs root" >&2; exit 2; fi
if [ ! -x "$NETD" ]; then
    echo "no netd binary at $NETD; build it: cargo build --release -p swarmnet-netd" >&2; exit 2
fi
if [ "$SANDBOXES" -gt 240 ] || [ "$NETWORKS" -gt 1000 ]; then
    echo "at most 240 sandboxes per network (addresses .2-.241; the remote endpoint is .250/.251)" >&2; exit 2
fi

HELPER="python3 $REPO/bench/foundation_helper.py"
TAG="sntbench$$"
WORK="/run/$TAG"               # everything on disk: intent, netd run dir, logs, peer scripts
RUN="$WORK/netd"               # netd's --run-dir
RES="$WORK/results"
CG="/sys/fs/cgroup/unified/$TAG"  # netd's tasks go in $CG/tasks
NODE_NS="$TAG-n1"              # netd's node namespace
PEER_PLAIN_NS="$TAG-a"         # plain ip peer's node namespace (its namespaces: $TAG-a-*)
PEER_BATCH_NS="$TAG-b"         # ip -batch peer's node namespace (its namespaces: $TAG-b-*)
NETD_PID=""

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    log "cleanup"
    # netd: only the pid we started.
    if [ -n "$NETD_PID" ] && [ -e "/proc/$NETD_PID" ]; then
        kill -TERM "$NETD_PID" 2>/dev/null
        for _ in $(seq 50); do [ -e "/proc/$NETD_PID" ] || break; sleep 0.1; done
        [ -e "/proc/$NETD_PID" ] && kill -KILL "$NETD_PID" 2>/dev/null
        wait "$NETD_PID" 2>/dev/null
    fi
    # netd's tasks: everything in our cgroup.
    if [ -d "$CG" ]; then
        [ -e "$CG/cgroup.kill" ] && echo 1 > "$CG/cgroup.kill"
        for _ in $(seq 50); do
            [ -z "$(find "$CG" -name cgroup.procs -exec cat {} + 2>/dev/null)" ] && break; sleep 0.1
        done
        find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null
    fi
    # The peers' sleeps: only the pids their scripts recorded, and only if still `sleep`.
    for f in "$WORK"/peer-*/peer-sleep.pids; do
        [ -f "$f" ] || continue
        while read -r p; do
            [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = sleep ] && kill -KILL "$p" 2>/dev/null
        done < "$f"
    done
    # netd's namespace bind mounts.
    if [ -d "$RUN/netns" ]; then
        for f in "$RUN"/netns/*; do [ -e "$f" ] && { umount -l "$f" 2>/dev/null; rm -f "$f"; }; done
    fi
    # Namespaces we made with `ip netns add` (all carry our pid-unique prefix).
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$TAG-"); do
        ip netns del "$ns" 2>/dev/null
    done
    [ -d "$WORK" ] && rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_node_ns() {  # a node namespace with lo up and the underlay address on ul0 (one end of a veth pair whose other end, ul0p, stays beside it)
    local ns=$1
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add ul0 mtu 1500 type veth peer name ul0p mtu 1500
    ip -n "$ns" link set ul0p up
    ip -n "$ns" addr add 198.18.0.1/24 dev ul0
    ip -n "$ns" link set ul0 up
}

mkdir -p "$WORK" "$RUN" "$RES" "$(dirname "$OUT_JSON")"
log "run $TAG: $NETWORKS networks × $SANDBOXES sandboxes = $((NETWORKS * SANDBOXES)) sandboxes; netd $NETD"

# ------------------------------------------------------------------ swarmnet
make_node_ns "$NODE_NS"
mkdir -p "$CG"
INTENT="$WORK/intent.json"
$HELPER write-intent --variant empty --networks 0 --sandboxes 0 --out "$INTENT"
NO_COLOR=1 nsenter --net="/run/netns/$NODE_NS" "$NETD" --node-id n1 --intent "$INTENT" --run-dir "$RUN" \
    --cgroup-dir "$CG/tasks" --full-reconcile-interval 600s > "$WORK/netd.log" 2>&1 &
NETD_PID=$!
log "netd pid $NETD_PID (log $WORK/netd.log)"

netd_step() {  # name variant generation [--wait-empty]
    local name=$1 variant=$2 gen=$3; shift 3
    log "swarmnet: $name (intent generation $gen)"
    local spid=""
    if [ "$STRACE_STEP" = "$name" ]; then
        strace ${STRACE_FLAGS:--f -w -c} -p "$NETD_PID" -o "$RES/strace-$name.txt" 2>/dev/null &
        spid=$!; sleep 1
    fi
    $HELPER netd-step --networks "$NETWORKS" --sandboxes "$SANDBOXES" --variant "$variant" \
        --intent "$INTENT" --run-dir "$RUN" --pid "$NETD_PID" --generation "$gen" \
        --timeout "$STEP_TIMEOUT" --out "$RES/netd-$name.json" "$@" >&2 \
        || log "swarmnet: $name did NOT converge within ${STEP_TIMEOUT}s (see $RES/netd-$name.json)"
    if [ -n "$spid" ]; then
        kill -INT "$spid"; wait "$spid" 2>/dev/null || true
        cp "$RES/strace-$name.txt" "$(dirname "$OUT_JSON")/foundation-strace-$name.txt"
    fi
}

CHECKS="$RES/checks.txt"
: > "$CHECKS"
check() { printf '%s\t%s\n' "$1" "$2" >> "$CHECKS"; }

netd_step start empty 1 --no-write
netd_step up full 2
check swarmnet.netns "$(ls "$RUN/netns" | wc -l)"
check swarmnet.node_links "$(ip -n "$NODE_NS" -o link show | wc -l)"
check swarmnet.tasks_running "$(find "$CG/tasks" -name cgroup.procs -exec cat {} + 2>/dev/null | wc -l)"
if [ -e "$RUN/netns/net-bn1" ]; then
    check swarmnet.net1_links "$(nsenter --net="$RUN/netns/net-bn1" ip -o link show | wc -l)"
    check swarmnet.net1_fdb_before "$(nsenter --net="$RUN/netns/net-bn1" bridge fdb show dev snvx5001 | grep dst | tr '\n' ';')"
fi
log "swarmnet: idle for 5 s with everything up"
$HELPER netd-idle --pid "$NETD_PID" --seconds 5 --out "$RES/netd-idle.json" >&2
netd_step change changed 3
[ -e "$RUN/netns/net-bn1" ] && {
    check swarmnet.net1_fdb_after "$(nsenter --net="$RUN/netns/net-bn1" bridge fdb show dev snvx5001 | grep dst | tr '\n' ';')"
    check swarmnet.net1_neigh_after "$(nsenter --net="$RUN/netns/net-bn1" ip neigh show dev snvx5001 | tr '\n' ';')"
}
netd_step down empty 4 --wait-empty
check swarmnet.netns_after_down "$(ls "$RUN/netns" | wc -l)"
check swarmnet.node_links_after_down "$(ip -n "$NODE_NS" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | tr '\n' ' ')"
$HELPER netd-mem --pid "$NETD_PID" --out "$RES/netd-mem.json" >&2
kill -TERM "$NETD_PID"; wait "$NETD_PID" 2>/dev/null || true
NETD_PID=""
check swarmnet.warn_error_log_lines "$(grep -cE '(WARN|ERROR)' "$WORK/netd.log" || true)"
cp "$WORK/netd.log" "$(dirname "$OUT_JSON")/foundation-netd.log"

# ------------------------------------------------------------------ naive peer(s)
peer_run() {  # variant node-ns
    local v=$1 node=$2 dir="$WORK/peer-$2"
    make_node_ns "$node"
    $HELPER peer-scripts --networks "$NETWORKS" --sandboxes "$SANDBOXES" --prefix "$node" --dir "$dir" >&2
    for step in up change down; do
        log "ip $v: $step"
        $HELPER run --timeout "$STEP_TIMEOUT" --out "$RES/peer-$step-$v.json" --log "$dir/$step.log" \
            -- nsenter --net="/run/netns/$node" bash "$dir/peer-$step-$v.sh" >&2 \
            || { log "ip $v: $step failed (log $dir/$step.log):"; tail -5 "$dir/$step.log" >&2; }
        if [ "$step" = up ]; then
            check "ip_$v.netns" "$(ip netns list 2>/dev/null | awk '{print $1}' | grep -c "^$node-" || true)"
            check "ip_$v.node_links" "$(ip -n "$node" -o link show | wc -l)"
            check "ip_$v.tasks_running" "$(wc -l < "$dir/peer-sleep.pids" 2>/dev/null || echo 0)"
            check "ip_$v.net1_links" "$(ip -n "$node-net1" -o link show 2>/dev/null | wc -l)"
        elif [ "$step" = change ]; then
            check "ip_$v.net1_fdb_after" "$(bridge -n "$node-net1" fdb show dev snvx5001 2>/dev/null | grep dst | tr '\n' ';')"
        fi
    done
    check "ip_$v.netns_after_down" "$(ip netns list 2>/dev/null | awk '{print $1}' | grep -c "^$node-" || true)"
    ip netns del "$node"
}
[ "$DO_PLAIN" = 1 ] && peer_run plain "$PEER_PLAIN_NS"
[ "$DO_BATCH" = 1 ] && peer_run batch "$PEER_BATCH_NS"

# ------------------------------------------------------------------ report
python3 - "$CHECKS" "$RES/checks.json" <<'EOF'
import json, sys
d = {}
for line in open(sys.argv[1]):
    k, _, v = line.rstrip("\n").partition("\t")
    d[k] = int(v) if v.strip().isdigit() else v
json.dump(d, open(sys.argv[2], "w"), indent=1)
EOF
echo
$HELPER report --dir "$RES" --networks "$NETWORKS" --sandboxes "$SANDBOXES" --netd-bin "$NETD" --out "$OUT_JSON"
