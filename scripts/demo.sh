#!/usr/bin/env bash
# The swarmnet demo: a 3-node cluster in network namespaces on this machine, one netd per node,
# an overlay network, a `web` service with two replicas of the demo server (on n1 and n2) and a
# client task on n3, then requests across nodes through the overlay.
#
#   sudo ./scripts/demo.sh          # build, run, show, tear everything down
#   sudo ./scripts/demo.sh --keep   # leave the lab up (prints how to remove it)
#
# Nothing in the machine's root network namespace is changed: the nodes, their underlay and
# every overlay live in namespaces this script creates (prefix `sndemo`), underlay addresses come
# from 198.18.0.0/15.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1

./scripts/install-deps.sh
echo "== building"
cargo build --release -q -p swarmnet-netd -p swarmnet-cli
bin=$PWD/target/release

lab="sndemo$$"
run=/run/swarmnet-demo/$lab
cg_root=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
[ -n "$cg_root" ] || { echo "no cgroup2 mount found" >&2; exit 1; }
cg=$cg_root/swarmnet-demo/$lab
pids=()

cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  # Task processes: everything in the lab's cgroups.
  for d in "$cg"/*/; do [ -e "$d/cgroup.kill" ] && echo 1 > "$d/cgroup.kill"; done
  for f in "$run"/*/netns/*; do [ -e "$f" ] && umount -l "$f" 2>/dev/null; done
  for i in 1 2 3; do ip netns del "$lab-n$i" 2>/dev/null; done
  ip netns del "$lab-ul" 2>/dev/null
  sleep 0.5
  find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
  rmdir "$cg_root/swarmnet-demo" 2>/dev/null
  rm -rf "$run"
  rmdir /run/swarmnet-demo 2>/dev/null
  true
}
if [ $keep = 0 ]; then trap cleanup EXIT; fi

echo "== lab $lab: underlay and 3 nodes (198.18.100.1-3)"
mkdir -p "$run" "$cg"
ip netns add "$lab-ul"
ip -n "$lab-ul" link add ul0 type bridge
ip -n "$lab-ul" link set ul0 up
# The underlay namespace doubles as an outside client (a host on the nodes' network, no node).
ip -n "$lab-ul" addr add 198.18.100.250/24 dev ul0
for i in 1 2 3; do
  ip netns add "$lab-n$i"
  ip -n "$lab-n$i" link add eth0 type veth peer name "p$i" netns "$lab-ul"
  ip -n "$lab-n$i" addr add "198.18.100.$i/24" dev eth0
  ip -n "$lab-n$i" link set eth0 up
  ip -n "$lab-n$i" link set lo up
  ip -n "$lab-ul" link set "p$i" master ul0 up
done

cat > "$run/cluster.json" <<JSON
{
  "version": 1,
  "nodes": [
    {"id": "n1", "addr": "198.18.100.1", "ingress_ip": "10.255.0.101"},
    {"id": "n2", "addr": "198.18.100.2", "ingress_ip": "10.255.0.102"},
    {"id": "n3", "addr": "198.18.100.3", "ingress_ip": "10.255.0.103"}
  ],
  "networks": [
    {"name": "ingress", "subnet": "10.255.0.0/24", "vni": 4096, "ingress": true},
    {"name": "app", "subnet": "10.20.0.0/24", "vni": 4100}
  ],
  "services": [
    {"name": "web", "mode": {"replicated": {"replicas": 2}},
     "networks": [{"network": "app", "vip": "10.20.0.2", "aliases": ["www"]}, {"network": "ingress", "vip": "10.255.0.2"}],
     "ports": [{"name": "http", "target": 80, "published": 8080}]},
    {"name": "client", "networks": [{"network": "app"}]}
  ],
  "tasks": [
    {"id": "web1", "service": "web", "slot": 1, "node": "n1", "argv": ["$bin/swarmnet-whoami", "--port", "80"],
     "networks": [{"network": "app", "ip": "10.20.0.11"}, {"network": "ingress", "ip": "10.255.0.11"}]},
    {"id": "web2", "service": "web", "slot": 2, "node": "n2", "argv": ["$bin/swarmnet-whoami", "--port", "80"],
     "networks": [{"network": "app", "ip": "10.20.0.12"}, {"network": "ingress", "ip": "10.255.0.12"}]},
    {"id": "client1", "service": "client", "slot": 1, "node": "n3", "argv": ["sleep", "infinity"],
     "networks": [{"network": "app", "ip": "10.20.0.21"}]}
  ]
}
JSON

echo "== starting netd on n1 n2 n3"
for i in 1 2 3; do
  mkdir -p "$run/n$i"
  # nsenter --net only: netd's namespace bind mounts must live in the shared mount namespace.
  nsenter --net="/run/netns/$lab-n$i" "$bin/swarmnet-netd" --node-id "n$i" --intent "$run/cluster.json" \
    --run-dir "$run/n$i" --cgroup-dir "$cg/n$i" --full-reconcile-interval 5s >"$run/n$i/netd.log" 2>&1 &
  pids+=($!)
done

converged() {
  python3 - "$run" <<'PY'
import json, sys
for i in (1, 2, 3):
    try:
        s = json.load(open(f"{sys.argv[1]}/n{i}/status.json"))
    except Exception:
        sys.exit(1)
    if not (s["converged"] and s["intent_generation"] >= 1):
        sys.exit(1)
PY
}
for _ in $(seq 1 100); do converged && break; sleep 0.2; done
converged || { echo "the lab did not converge; logs in $run/n*/netd.log" >&2; tail -n 5 "$run"/n*/netd.log; exit 1; }
echo "   all three nodes converged"

client() { nsenter --net="$run/n3/netns/sb-client1" "$@"; }
# Like a task: its network namespace plus its resolv.conf (nameserver 127.0.0.11).
client_resolving() {
  nsenter --net="$run/n3/netns/sb-client1" unshare --mount sh -c \
    "mount --bind '$run/n3/tasks/client1.resolv.conf' /etc/resolv.conf && exec \"\$@\"" sh "$@"
}
wait_http() { for _ in $(seq 1 50); do client curl -s -m 1 -o /dev/null "http://$1/" && return 0; sleep 0.1; done; return 1; }

echo
echo "== from the client task on n3 (10.20.0.21):"
echo "-- ping web1 on n1 across the overlay"
client ping -c 2 -W 1 10.20.0.11 | sed 's/^/   /'
for ip in 10.20.0.11 10.20.0.12; do
  wait_http "$ip"
  echo "-- curl http://$ip/"
  client curl -s -m 2 "http://$ip/" | sed 's/^/   /'
done
echo
echo "== name resolution at 127.0.0.11 inside the client (the task's own resolv.conf)"
echo "-- getent hosts web            (the service's virtual IP)"
client_resolving getent ahostsv4 web | awk '{print $1}' | sort -u | sed 's/^/   /'
echo "-- dig +short tasks.web         (every replica)"
client dig +short +time=2 @127.0.0.11 tasks.web | sed 's/^/   /'
echo "-- dig +short web.1 (a task name) and www (an alias)"
client dig +short +time=2 @127.0.0.11 web.1 www | sed 's/^/   /'
echo "-- dig +short -x 10.20.0.12 and -x 10.20.0.2 (PTR of a task and of the VIP)"
client dig +short +time=2 @127.0.0.11 -x 10.20.0.12 -x 10.20.0.2 | sed 's/^/   /'
echo "-- dig SRV _http._tcp.web"
client dig +short +time=2 @127.0.0.11 SRV _http._tcp.web | sed 's/^/   /'
echo
echo "== load balancing through the VIP: 20 requests to http://web/ from the client on n3"
for _ in $(seq 20); do client_resolving curl -s -m 2 http://web/; done > "$run/vip.txt"
grep '^task' "$run/vip.txt" | sort | uniq -c | sed 's/^/   /'
echo "   every replica saw the client's own address: $(grep '^client' "$run/vip.txt" | cut -d' ' -f2 | cut -d: -f1 | sort -u | tr '\n' ' ')"
echo
echo "== the routing mesh: port 8080 published by web, from an outside host (198.18.100.250)"
outside() { nsenter --net="/run/netns/$lab-ul" "$@"; }
for i in 1 2 3; do
  for _ in $(seq 50); do outside curl -s -m 1 -o /dev/null "http://198.18.100.$i:8080/" && break; sleep 0.1; done
  for _ in $(seq 10); do outside curl -s -m 2 "http://198.18.100.$i:8080/" | grep '^task'; done | sort | uniq -c \
    | tr -s ' ' | sed "s/^ /   n$i (198.18.100.$i:8080$( [ $i = 3 ] && echo ', no web task here')): /"
done
echo
echo "== the overlay on n3: the remote endpoints as the kernel holds them"
nsenter --net="$run/n3/netns/net-app" bridge fdb show dev snvx4100 | grep dst | sed 's/^/   /'
nsenter --net="$run/n3/netns/net-app" ip neigh show dev snvx4100 | sed 's/^/   /'
echo
echo "== summary"
echo "   3 nodes, 1 overlay network (VXLAN 4100, MTU $(client ip -o link show eth0 | sed -n 's/.* mtu \([0-9]*\).*/\1/p')), 3 tasks; every request crossed nodes over VXLAN"
echo "   the web replicas saw the client's own address (10.20.0.21): no NAT on the overlay"
echo "   names resolved by netd's resolver at 127.0.0.11 inside the sandbox"
echo "   the service VIP load-balanced over replicas on two other nodes (nftables in n3's network namespace)"
echo "   the published port answered on every node, including n3 which runs no web task"
if [ $keep = 1 ]; then
  # A script that removes exactly this lab (the same steps as the automatic cleanup).
  down=/run/swarmnet-demo/$lab-down.sh
  {
    echo "#!/usr/bin/env bash"
    declare -p lab run cg cg_root pids
    declare -f cleanup
    echo "cleanup; rm -f '$down'; rmdir /run/swarmnet-demo 2>/dev/null; true"
  } > "$down"
  chmod +x "$down"
  echo
  echo "lab left up: namespaces $lab-*, state in $run, netd pids ${pids[*]}"
  echo "  a shell on node 3:     nsenter --net=/run/netns/$lab-n3 bash"
  echo "  a shell in the client: nsenter --net=$run/n3/netns/sb-client1 bash"
  echo "  remove it:             $down"
fi
