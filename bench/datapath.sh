#!/usr/bin/env bash
# Datapath benchmarks of issues 4 and 5: short-connection rate and iperf3 throughput through a
# service VIP vs straight to the backend (client on n1, backend on n2, across VXLAN), and
# through a published port on the node with the task, on a node without it (routing mesh), a
# host-mode port, vs straight to the task (outside client on the underlay). Paths alternate
# within each round; the median of the rounds is printed. Writes bench-out/datapath.json.
#
#   sudo bench/datapath.sh [--secs S] [--rounds R]
#
# Needs root, iperf3, iproute2, nftables, cargo. Everything runs in namespaces the tests-netns
# harness creates and removes (never the root namespace).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=4
ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --secs) SECS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
for t in iperf3 ip nft nsenter cargo python3; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install iperf3 iproute2 nftables)" >&2; exit 1; }
done
mkdir -p bench-out
echo "== building (release)" >&2
cargo build --release -q -p swarmnet-netd -p swarmnet-cli >&2
cargo test --release -q -p swarmnet-tests-netns --test datapath_bench --no-run >&2
# The machine may be shared: the load around the run is printed with the results.
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
OUT="$(SWARMNET_BENCH_SECS=$SECS SWARMNET_BENCH_ROUNDS=$ROUNDS timeout 1200 \
  cargo test --release -q -p swarmnet-tests-netns --test datapath_bench -- --ignored --nocapture \
  --test-threads 1 2>&1 | tee /dev/stderr | sed -n 's/^DATAPATH //p')"
[ "$(printf '%s\n' "$OUT" | grep -c .)" = 2 ] || { echo "the benchmark did not print both results" >&2; exit 1; }
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%s\n' "$OUT" | LOAD_BEFORE="$LOAD_BEFORE" LOAD_AFTER="$LOAD_AFTER" NPROC="$(nproc)" python3 -c '
import json, os, sys
runs = [json.loads(l) for l in sys.stdin if l.strip()]
for r in runs:
    r["loadavg_before"] = os.environ["LOAD_BEFORE"]
    r["loadavg_after"] = os.environ["LOAD_AFTER"]
json.dump(runs, open("bench-out/datapath.json", "w"), indent=1)
print()
print("%-6s %-24s %8s %6s %8s %6s | %9s %6s %9s %6s | %s" % ("bench", "path", "conn/s", "x dir",
      "Gbit/s", "x dir", "us CPU/c", "dir/x", "ms CPU/GB", "dir/x", "failed"))
for r in runs:
    d = r["paths"]["direct"]
    for name, p in r["paths"].items():
        # A path without a throughput figure (no iperf3 run) prints nan there.
        gb = p["gbit_per_s"] or float("nan")
        ms = p["cpu_ms_per_gb"] or float("nan")
        print("%-6s %-24s %8.0f %6.2f %8.2f %6.2f | %9.1f %6.2f %9.0f %6.2f | %d" % (r["bench"], name,
              p["conn_per_s"], p["conn_per_s"] / d["conn_per_s"], gb,
              gb / d["gbit_per_s"], p["cpu_us_per_conn"],
              d["cpu_us_per_conn"] / p["cpu_us_per_conn"], ms,
              d["cpu_ms_per_gb"] / ms, p["conn_failed"]))
print()
print("x dir: the rate as a fraction of direct (wall clock: on a loaded machine it also measures")
print("waiting for a core); dir/x: the CPU cost of direct as a fraction of this path, per connection")
print("(client + server threads, the softirq work of every hop included) and per GB (iperf3 CPU figures)")
print("load average (1, 5, 15 min) before: %s, after: %s, on %s cores" % (os.environ["LOAD_BEFORE"], os.environ["LOAD_AFTER"], os.environ["NPROC"]))
print("targets: vip >= 0.95 of direct throughput and >= 0.9 of direct connection rate;")
print("         mesh on the node with the task >= 0.9 of direct; the node without it pays one VXLAN hop")
'
