#!/bin/bash
# DNS benchmark: netd's resolver at 127.0.0.11 beside dnsmasq and unbound serving the same
# 1,000 names, all in namespaces on this machine, in one run; server and load generator pinned
# to different cores. See bench/README.md. Needs root.
#
# Never touches the root network namespace: netd runs in a node namespace made here (its
# client sandbox is where it answers), dnsmasq and unbound each in their own namespace with
# only `lo`; every name starts with sntdnsb<pid>, and the EXIT trap removes all of it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NETD="$REPO/target/release/swarmnet-netd"
OUT_JSON="$REPO/bench-out/dns.json"
NAMES=1000
ROUNDS=3
DURATION=3          # seconds per capacity / latency / dnsperf run
WINDOW=128          # queries in flight in the capacity runs (fits a default socket buffer)
SOCKETS=2
BATCH=64
SERVER_CPU=1
LOAD_CPU=0
PEERS="dnsmasq unbound"

usage() {
    cat <<EOF
usage: $0 [--netd PATH] [--names N] [--rounds R] [--duration S] [--window W] [--sockets K] [--batch B]
          [--server-cpu C] [--load-cpu C] [--peers "dnsmasq unbound"] [--quick] [--out FILE]
  --names N        names served by every server (default 1000)
  --rounds R       capacity runs per server, interleaved; the median is reported (default 3)
  --duration S     seconds per measured run (default 3)
  --window W       queries in flight for the capacity runs (default 128)
  --quick          1 round of 1 s (smoke run)
EOF
}
while [ $# -gt 0 ]; do
    case "$1" in
        --netd) NETD=$2; shift 2 ;;
        --names) NAMES=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --window) WINDOW=$2; shift 2 ;;
        --sockets) SOCKETS=$2; shift 2 ;;
        --batch) BATCH=$2; shift 2 ;;
        --server-cpu) SERVER_CPU=$2; shift 2 ;;
        --load-cpu) LOAD_CPU=$2; shift 2 ;;
        --peers) PEERS=$2; shift 2 ;;
        --quick) ROUNDS=1; DURATION=1; shift ;;
        --out) OUT_JSON=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" != 0 ]; then echo "needs root" >&2; exit 2; fi
if [ "$NAMES" -gt 20000 ] || [ "$NAMES" -lt 1 ]; then echo "--names: 1..20000" >&2; exit 2; fi
if [ ! -x "$NETD" ]; then
    echo "no netd binary at $NETD; build it: cargo build --release -p swarmnet-netd" >&2; exit 2
fi
missing=()
for t in dnsperf taskset nsenter dig python3 ip; do command -v "$t" >/dev/null || missing+=("$t"); done
for p in $PEERS; do command -v "$p" >/dev/null || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]} (apt-get install dnsperf dnsmasq-base unbound dnsutils util-linux python3 iproute2)" >&2
    exit 2
fi
if [ "$(nproc)" -lt 2 ]; then echo "needs 2 cores (server and load generator apart)" >&2; exit 2; fi

echo "== building the load generator (bench/dnsload)" >&2
cargo build -q --release --manifest-path "$REPO/bench/dnsload/Cargo.toml" \
    --target-dir "$REPO/target/bench-dnsload"
DNSLOAD="$REPO/target/bench-dnsload/release/swarmnet-dnsload"

TAG="sntdnsb$$"
WORK="/run/$TAG"
RUN="$WORK/netd"
CG_ROOT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
[ -n "$CG_ROOT" ] || { echo "no cgroup2 mount" >&2; exit 2; }
CG="$CG_ROOT/$TAG"
declare -A PID NS
STARTED=()   # pids this script started (servers)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    log "cleanup"
    # Keep the servers' logs beside the results.
    for f in netd dnsmasq unbound; do
        [ -f "$WORK/$f.log" ] && cp "$WORK/$f.log" "$(dirname "$OUT_JSON")/dns-$f.log" 2>/dev/null
    done
    for p in "${STARTED[@]}"; do
        [ -e "/proc/$p" ] && kill -TERM "$p" 2>/dev/null
    done
    for p in "${STARTED[@]}"; do
        for _ in $(seq 30); do [ -e "/proc/$p" ] || break; sleep 0.1; done
        [ -e "/proc/$p" ] && kill -KILL "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    if [ -d "$CG" ]; then
        for d in "$CG" "$CG"/*/; do [ -e "$d/cgroup.kill" ] && echo 1 > "$d/cgroup.kill"; done
        for _ in $(seq 50); do
            [ -z "$(find "$CG" -name cgroup.procs -exec cat {} + 2>/dev/null)" ] && break; sleep 0.1
        done
        find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null
    fi
    if [ -d "$RUN/netns" ]; then
        for f in "$RUN"/netns/*; do [ -e "$f" ] && { umount -l "$f" 2>/dev/null; rm -f "$f"; }; done
    fi
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$TAG-"); do
        ip netns del "$ns" 2>/dev/null
    done
    [ -d "$WORK" ] && rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK" "$RUN" "$(dirname "$OUT_JSON")"

# ---------------------------------------------------------------------------------------------
# The 1,000 names: s<i> -> 10.100.<i/250>.<i%250+2> (a service VIP in netd's intent).
log "generating $NAMES names"
python3 - "$WORK" "$NAMES" <<'PY'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
vip = lambda i: f"10.100.{i // 250}.{i % 250 + 2}"
tip = lambda i: f"10.101.{i // 250}.{i % 250 + 2}"
with open(f"{work}/names.txt", "w") as f:
    for i in range(n):
        f.write(f"s{i} {vip(i)}\n")
with open(f"{work}/queries.txt", "w") as f:
    for i in range(n):
        f.write(f"s{i} A\n")
with open(f"{work}/hosts", "w") as f:
    for i in range(n):
        f.write(f"{vip(i)} s{i}\n")
with open(f"{work}/unbound.conf", "w") as f:
    f.write(f"""server:
    interface: 127.0.0.11
    port: 53
    num-threads: 1
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{work}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    so-reuseport: no
""")
    for i in range(n):
        f.write(f'    local-data: "s{i}. 5 IN A {vip(i)}"\n')
    f.write("remote-control:\n    control-enable: no\n")
# netd: node n1 (this netd) and n2 (never started): every service has a VIP on the network and
# one task on n2, so its name exists without a local sandbox; the client sandbox c1 is on n1.
services = [{"name": f"s{i}", "endpoint_mode": "vip",
             "networks": [{"network": "bench", "vip": vip(i)}]} for i in range(n)]
services.append({"name": "client", "networks": [{"network": "bench"}]})
tasks = [{"id": f"t{i}", "service": f"s{i}", "slot": 1, "node": "n2", "argv": ["sleep", "infinity"],
          "networks": [{"network": "bench", "ip": tip(i)}]} for i in range(n)]
tasks.append({"id": "c1", "service": "client", "slot": 1, "node": "n1", "argv": ["sleep", "infinity"],
              "networks": [{"network": "bench", "ip": "10.102.0.2"}]})
intent = {"version": 1,
          "nodes": [{"id": "n1", "addr": "198.18.0.1"}, {"id": "n2", "addr": "198.18.0.2"}],
          "networks": [{"name": "bench", "subnet": "10.96.0.0/11", "vni": 4999}],
          "services": services, "tasks": tasks}
with open(f"{work}/cluster.json", "w") as f:
    json.dump(intent, f)
PY

# ---------------------------------------------------------------------------------------------
# Servers, each pinned to SERVER_CPU.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
in_ns() { local ns=$1; shift; nsenter --net="$ns" -- "$@"; }
answers() { # ns name want
    local got
    got=$(in_ns "$1" dig +short +time=1 +tries=1 @127.0.0.11 "$2" 2>/dev/null | head -1)
    [ "$got" = "$3" ]
}
wait_answers() { # server ns
    local first last
    first=$(head -1 "$WORK/names.txt"); last=$(tail -1 "$WORK/names.txt")
    for _ in $(seq 100); do
        if answers "$2" ${first% *} ${first#* } && answers "$2" ${last% *} ${last#* }; then return 0; fi
        sleep 0.2
    done
    echo "$1 does not answer ${first% *} / ${last% *} in $2" >&2
    return 1
}

log "netd: node namespace, intent with $NAMES services, client sandbox"
ip netns add "$TAG-n1"
ip -n "$TAG-n1" link set lo up
ip -n "$TAG-n1" link add ul0 mtu 1500 type veth peer name ul0p mtu 1500
ip -n "$TAG-n1" link set ul0p up
ip -n "$TAG-n1" addr add 198.18.0.1/24 dev ul0
ip -n "$TAG-n1" link set ul0 up
mkdir -p "$CG/tasks" "$CG/netd"
# nsenter --net only: netd's namespace bind mounts must stay in the shared mount namespace.
# The resolver's own threads (--dns-cpus) get the server core to themselves; the rest of netd
# (reconcile tick, status writes, API: idle here, well under 1 % of a core) runs on the other
# core, so its wake-ups never preempt the resolver. The peers are single-process servers on
# the server core; their few housekeeping wake-ups stay there.
(echo $BASHPID > "$CG/netd/cgroup.procs" && exec nsenter --net="/run/netns/$TAG-n1" -- \
    taskset -c "$LOAD_CPU" "$NETD" --node-id n1 --intent "$WORK/cluster.json" --run-dir "$RUN" \
    --dns-cpus "$SERVER_CPU" \
    --cgroup-dir "$CG/tasks" --full-reconcile-interval 600s --dns-upstreams none \
    >"$WORK/netd.log" 2>&1) &
PID[netd]=$!
STARTED+=("${PID[netd]}")
NS[netd]="$RUN/netns/sb-c1"
for _ in $(seq 300); do
    python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if s["converged"] else 1)' \
        "$RUN/status.json" 2>/dev/null && break
    [ -e "/proc/${PID[netd]}" ] || { echo "netd exited:" >&2; tail -20 "$WORK/netd.log" >&2; exit 1; }
    sleep 0.2
done
wait_answers netd "${NS[netd]}"

if [[ " $PEERS " == *" dnsmasq "* ]]; then
    log "dnsmasq: own namespace, the same names from a hosts file"
    ip netns add "$TAG-dm"
    ip -n "$TAG-dm" link set lo up
    nsenter --net="/run/netns/$TAG-dm" -- taskset -c "$SERVER_CPU" dnsmasq --keep-in-foreground \
        --conf-file=/dev/null --no-resolv --no-hosts --addn-hosts="$WORK/hosts" \
        --listen-address=127.0.0.11 --bind-interfaces --port=53 --local-ttl=5 --cache-size=10000 \
        --user=root --pid-file= >"$WORK/dnsmasq.log" 2>&1 &
    PID[dnsmasq]=$!
    STARTED+=("${PID[dnsmasq]}")
    NS[dnsmasq]="/run/netns/$TAG-dm"
    wait_answers dnsmasq "${NS[dnsmasq]}"
fi
if [[ " $PEERS " == *" unbound "* ]]; then
    log "unbound: own namespace, the same names as local-data, 1 thread"
    ip netns add "$TAG-ub"
    ip -n "$TAG-ub" link set lo up
    nsenter --net="/run/netns/$TAG-ub" -- taskset -c "$SERVER_CPU" unbound -d -c "$WORK/unbound.conf" \
        >"$WORK/unbound.log" 2>&1 &
    PID[unbound]=$!
    STARTED+=("${PID[unbound]}")
    NS[unbound]="/run/netns/$TAG-ub"
    wait_answers unbound "${NS[unbound]}"
fi
SERVERS="netd $PEERS"

# ---------------------------------------------------------------------------------------------
# Runs. Each writes one JSON line to $WORK/results.jsonl with the server's CPU over the run.
RES="$WORK/results.jsonl"
: > "$RES"
record() { # server kind extra-json load-json cpu-ticks wall
    python3 - "$@" >>"$RES" <<'PY'
import json, sys
server, kind, extra, load, ticks, wall = sys.argv[1:7]
d = json.loads(load) if load.strip().startswith("{") else {"error": load.strip()[-400:]}
d.update(json.loads(extra))
d.update({"server": server, "kind": kind, "run_server_cpu_s": int(ticks) / 100.0, "run_wall_s": float(wall)})
print(json.dumps(d))
PY
}
now() { date +%s.%N; }
# After each run: does the server still answer (a run with no answers is then the machine's doing,
# e.g. a stall, not a dead server)?
alive_json() {
    local first
    first=$(head -1 "$WORK/names.txt")
    if answers "${NS[$1]}" "${first% *}" "${first#* }"; then echo '{"alive_after": true}'; else echo '{"alive_after": false}'; fi
}
# One line about the last result, for the progress log.
read -r -d '' SHOW_PY <<'PY' || true
import json, sys
d = json.loads(sys.stdin.read())
g = lambda k: d.get(k) if d.get(k) is not None else float("nan")
if "error" in d:
    print("FAILED: " + d["error"])
elif sys.argv[1] == "capacity":
    print(f"{g('qps'):,.0f} qps, loss {g('loss_pct'):.2f}%, server {g('server_util'):.0%} of its core (core busy {g('core_busy_frac'):.0%}, irq+softirq {g('core_irq_frac'):.0%}), window waiting at the server {g('server_queue_share'):.0%}, drops {d.get('server_sock_drops')}/{d.get('gen_sock_drops')}")
elif sys.argv[1] == "latency":
    print(f"p50 {g('p50_us'):.0f} us, p99 {g('p99_us'):.0f} us, p99.9 {g('p999_us'):.0f} us, loss {g('loss_pct'):.2f}% (socket drops server/generator {d.get('server_sock_drops')}/{d.get('gen_sock_drops')}), server {g('server_util'):.0%} of its core (core busy {g('core_busy_frac'):.0%})")
else:
    print(f"{g('qps'):,.0f} qps, loss {g('loss_pct'):.2f}%, avg {g('avg_latency_us'):.0f} us, dnsperf CPU {g('loadgen_cpu_s') / max(g('loadgen_wall_s'), 1e-9):.0%}")
PY
show_last() { tail -1 "$RES" | python3 -c "$SHOW_PY" "$1"; }

dnsload_run() { # server kind args...
    local s=$1 kind=$2; shift 2
    local c0 c1 t0 t1 out
    c0=$(cpu_ticks "${PID[$s]}"); t0=$(now)
    out=$(timeout 60 nsenter --net="${NS[$s]}" -- taskset -c "$LOAD_CPU" "$DNSLOAD" \
        --names "$WORK/names.txt" --sockets "$SOCKETS" --batch "$BATCH" --duration "$DURATION" \
        --server-pid "${PID[$s]}" --server-cpu "$SERVER_CPU" "$@" 2>&1) || true
    t1=$(now); c1=$(cpu_ticks "${PID[$s]}")
    record "$s" "$kind" "$(alive_json "$s")" "$out" "$((c1 - c0))" "$(python3 -c "print($t1 - $t0)")"
}

dnsperf_run() { # server
    local s=$1 c0 c1 t0 t1 out
    c0=$(cpu_ticks "${PID[$s]}"); t0=$(now)
    # rusage of dnsperf itself (nsenter and taskset exec it): is the load generator saturated?
    out=$(timeout 60 python3 - "${NS[$s]}" "$LOAD_CPU" "$WORK/queries.txt" "$DURATION" <<'PY'
import json, re, resource, subprocess, sys, time
ns, cpu, queries, dur = sys.argv[1:5]
t = time.time()
p = subprocess.run(["nsenter", f"--net={ns}", "--", "taskset", "-c", cpu, "dnsperf", "-s", "127.0.0.11",
                    "-d", queries, "-l", dur, "-c", "1", "-T", "1", "-q", "256"],
                   capture_output=True, text=True, timeout=60)
wall = time.time() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
o = p.stdout
def num(pat):
    m = re.search(pat, o)
    return float(m.group(1)) if m else None
sent = num(r"Queries sent:\s+(\d+)")
lost = num(r"Queries lost:\s+(\d+)")
print(json.dumps({
    "qps": num(r"Queries per second:\s+([\d.]+)"),
    "sent": sent, "completed": num(r"Queries completed:\s+(\d+)"), "lost": lost,
    "loss_pct": (100.0 * lost / sent) if sent else None,
    "noerror_pct": num(r"NOERROR \d+ \(([\d.]+)%\)"),
    "avg_latency_us": (num(r"Average Latency \(s\):\s+([\d.]+)") or 0) * 1e6,
    "latency_stddev_us": (num(r"Latency StdDev \(s\):\s+([\d.]+)") or 0) * 1e6,
    "loadgen_cpu_s": ru.ru_utime + ru.ru_stime, "loadgen_wall_s": wall,
    "rc": p.returncode, "stderr": p.stderr[-300:]}))
PY
    ) || true
    t1=$(now); c1=$(cpu_ticks "${PID[$s]}")
    record "$s" dnsperf "$(alive_json "$s")" "$out" "$((c1 - c0))" "$(python3 -c "print($t1-$t0)")"
}

log "capacity: $ROUNDS interleaved rounds, dnsload window $WINDOW over $SOCKETS sockets, ${DURATION}s each"
for r in $(seq "$ROUNDS"); do
    for s in $SERVERS; do
        dnsload_run "$s" capacity --window "$WINDOW"
        log "  round $r $s: $(show_last capacity)"
    done
done

log "latency: each server at half its median capacity (open loop)"
for s in $SERVERS; do
    half=$(python3 - "$RES" "$s" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cap = [r for r in rows if r["server"] == sys.argv[2] and r["kind"] == "capacity" and r.get("qps")]
# Runs where the server was the bottleneck, as in the summary; all runs if none was.
good = [r for r in cap if (r.get("server_queue_share") or 0) >= 0.6] or cap
print(int(statistics.median([r["qps"] for r in good]) / 2) if good else 1000)
PY
)
    dnsload_run "$s" half-rate --rate "$half"
    log "  $s at $half qps: $(show_last latency)"
done
# Everyone at half of netd's capacity too, so the latencies compare at one load.
common=$(python3 - "$RES" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(next((int(r["rate"]) for r in rows if r["server"] == "netd" and r["kind"] == "half-rate"), 1000))
PY
)
log "latency: every server at $common qps (half of netd's capacity)"
for s in $PEERS; do
    dnsload_run "$s" netd-half-rate --rate "$common"
done

log "dnsperf: one process, one thread, 256 outstanding, ${DURATION}s"
for s in $SERVERS; do
    dnsperf_run "$s"
    log "  $s: $(show_last dnsperf)"
done

# ---------------------------------------------------------------------------------------------
# Summary: the table and bench-out/dns.json.
python3 - "$RES" "$OUT_JSON" "$SERVERS" "$NAMES" "$WINDOW" "$SOCKETS" "$DURATION" "$ROUNDS" \
    "$SERVER_CPU" "$LOAD_CPU" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, statistics, sys
res, out, servers, names, window, sockets, dur, rounds, scpu, lcpu, ncpu, load = sys.argv[1:13]
servers = servers.split()
rows = [json.loads(l) for l in open(res)]
# A capacity run counts when the server was the bottleneck — most of the window waited at its
# socket (bytes queued there ÷ bytes queued at both sides, over the 10 ms samples, >= 0.6) —
# nothing was lost and every answer checked out. Otherwise the generator (or the machine) was.
SERVER_SHARE = 0.6
summary = {}
for s in servers:
    cap = [r for r in rows if r["server"] == s and r["kind"] == "capacity" and r.get("qps")]
    for r in cap:
        cpu = r.get("server_cpu_s") or 0
        r["qps_per_core"] = r["answered"] / cpu if cpu else None
        r["cpu_s_per_mq"] = cpu / max(r["answered"], 1) * 1e6 if cpu else None
        why = []
        share = r.get("server_queue_share") or 0
        if share < SERVER_SHARE:
            why.append(f"server not the bottleneck: {share:.0%} of the queued window waited at the server, "
                       f"the rest at the load generator (server {r.get('server_util') or 0:.0%} of core {scpu}, "
                       f"core busy {r.get('core_busy_frac') or 0:.0%})")
        if r["loss_pct"] >= 1.0:
            why.append(f"loss {r['loss_pct']:.2f}%")
        if r["invalid"]:
            why.append(f"{r['invalid']} invalid answers")
        r["valid_run"] = not why
        r["why_not"] = "; ".join(why)
    good = [r for r in cap if r["valid_run"]] or cap
    med = lambda k: statistics.median([r[k] for r in good if r.get(k) is not None] or [None]) if good else None
    half = next((r for r in rows if r["server"] == s and r["kind"] == "half-rate"), {})
    nhalf = half if s == "netd" else next((r for r in rows if r["server"] == s and r["kind"] == "netd-half-rate"), {})
    perf = next((r for r in rows if r["server"] == s and r["kind"] == "dnsperf"), {})
    if perf.get("loadgen_wall_s"):
        perf["loadgen_util"] = perf["loadgen_cpu_s"] / perf["loadgen_wall_s"]
        perf["server_util"] = perf["run_server_cpu_s"] / max(perf["run_wall_s"], 1e-9)
        perf["server_cpu_s_per_mq"] = perf["run_server_cpu_s"] / max(perf.get("completed") or 1, 1) * 1e6
        perf["loadgen_saturated"] = perf["loadgen_util"] > 0.9
    summary[s] = {
        "capacity_qps": med("qps"), "capacity_qps_per_core": med("qps_per_core"),
        "cpu_s_per_million": med("cpu_s_per_mq"), "server_util": med("server_util"),
        "core_busy": med("core_busy_frac"),
        "generator_idle": med("idle_frac"), "loss_pct": med("loss_pct"),
        "valid_runs": sum(1 for r in cap if r["valid_run"]), "runs": len(cap),
        "why_not": sorted({r["why_not"] for r in cap if not r["valid_run"]}),
        "half_rate": {k: half.get(k) for k in ("rate", "qps", "p50_us", "p99_us", "p999_us", "loss_pct", "invalid", "server_util", "core_busy_frac")},
        "at_netd_half_rate": {k: nhalf.get(k) for k in ("rate", "qps", "p50_us", "p99_us", "p999_us", "loss_pct", "server_util", "core_busy_frac")},
        "dnsperf": {k: perf.get(k) for k in ("qps", "loss_pct", "avg_latency_us", "latency_stddev_us",
                                             "loadgen_util", "loadgen_saturated", "server_util", "server_cpu_s_per_mq")},
    }
ratio = {}
base = summary.get("unbound")
for s in servers:
    me = summary[s]
    if s == "unbound" or not base:
        continue
    if me["valid_runs"] and base["valid_runs"] and me["capacity_qps_per_core"] and base["capacity_qps_per_core"]:
        ratio[s] = me["capacity_qps_per_core"] / base["capacity_qps_per_core"]
    else:
        ratio[s] = None
doc = {"config": {"names": int(names), "window": int(window), "sockets": int(sockets),
                  "duration_s": float(dur), "rounds": int(rounds), "server_cpu": int(scpu),
                  "load_cpu": int(lcpu), "cpus": int(ncpu), "loadavg_at_end": load},
       "summary": summary, "ratio_qps_per_core_vs_unbound": ratio, "runs": rows}
json.dump(doc, open(out, "w"), indent=2)

f = lambda x, spec: "-" if x is None else format(x, spec)
print()
print(f"DNS, {names} names, server on CPU {scpu}, load on CPU {lcpu} (load average at the end: {load})")
print(f"{'server':8} | {'capacity qps':>12} | {'qps/core':>9} | {'vs unbound':>10} | {'CPU-s/Mq':>8} | "
      f"{'p50/p99 us @half':>17} | {'p50/p99 us @netd/2':>18} | {'dnsperf qps':>11} | {'loss':>5} | {'avg us':>6} | note")
for s in servers:
    m = summary[s]
    r = ratio.get(s)
    rtxt = "1.00" if s == "unbound" else ("n/a" if r is None else f"{r:.2f}x")
    h, nh, p = m["half_rate"], m["at_netd_half_rate"], m["dnsperf"]
    notes = []
    if (m["core_busy"] or 0) - (m["server_util"] or 0) > 0.2:
        notes.append(f"core {scpu} shared: server {m['server_util']:.0%}, other work {m['core_busy'] - m['server_util']:.0%}")
    bad = [r["kind"] for r in rows if r["server"] == s and r.get("alive_after") is False]
    if bad:
        notes.append(f"did not answer dig after: {', '.join(bad)}")
    empty = [r["kind"] for r in rows if r["server"] == s and r.get("qps") == 0]
    if empty:
        notes.append(f"no answers at all in: {', '.join(empty)} (answered again afterwards: {not bad})")
    if (h.get("loss_pct") or 0) >= 1.0:
        notes.append(f"open-loop loss {h['loss_pct']:.1f}% at half rate")
    if m["valid_runs"] < m["runs"]:
        notes.append(f"{m['runs'] - m['valid_runs']}/{m['runs']} capacity runs invalid, e.g. {m['why_not'][0]}")
    if p.get("loadgen_saturated"):
        notes.append(f"dnsperf saturated its core ({p['loadgen_util']:.0%}): its qps is a floor")
    print(f"{s:8} | {f(m['capacity_qps'], ',.0f'):>12} | {f(m['capacity_qps_per_core'], ',.0f'):>9} | {rtxt:>10} | "
          f"{f(m['cpu_s_per_million'], '.2f'):>8} | {f(h.get('p50_us'), '.0f') + '/' + f(h.get('p99_us'), '.0f'):>17} | "
          f"{f(nh.get('p50_us'), '.0f') + '/' + f(nh.get('p99_us'), '.0f'):>18} | {f(p.get('qps'), ',.0f'):>11} | "
          f"{f(p.get('loss_pct'), '.2f'):>5} | {f(p.get('avg_latency_us'), '.0f'):>6} | {'; '.join(notes)}")
shared = [s for s in servers if (summary[s]["core_busy"] or 0) - (summary[s]["server_util"] or 0) > 0.2]
if shared:
    # Other processes took the server core: rates, latencies and losses measure the machine,
    # not the servers. Only CPU-s per million queries (each server's own CPU time) compares.
    print(f"\nVERDICT: the machine was the bottleneck (core {scpu} busy with other work during the runs of "
          f"{', '.join(shared)}; load average {load}): capacity, qps/core ratios and latencies are not "
          f"comparable; CPU-s/Mq (own CPU time) is. Rerun on a quiet machine.")
elif ratio.get("netd") is None:
    print("\nVERDICT: no valid capacity run for netd (the load generator was the bottleneck): no ratio reported.")
else:
    print(f"\nVERDICT: netd {ratio['netd']:.2f}x unbound's queries/s per core (target 1.2x).")
print(f"\nresults: {out}")
PY
