#!/usr/bin/env python3
"""Intent to data plane: the time from `swarmnet service scale` returning until every node's
load balancer and DNS reflect the new replica count. Driven by bench/intent.sh (see there and
bench/README.md); runs against a lab made by `swarmnet lab up`.

For each change, one thread per node polls every POLL_MS (default 20 ms):
- LB: the node's namespace of network `app` (`<run_dir>/netns/net-app`), `nft list table ip
  swarmnet-lb`, counting the slots of the service's VIP on port 80 (one per backend);
- DNS: `tasks.web` (type A) at 127.0.0.11 from the node's `probe` task (a global service, so
  every node has a sandbox on the network), counting the answers. The polling thread enters
  the sandbox's network namespace itself (setns) and queries over one UDP socket there: a
  `dig` process per poll cost more CPU than the change being measured on 2 cores, and made
  each poll 20-30 ms coarse.
A node is done when both equal the new count; the change is done when every node is. Prints
p50/p99/max over the changes, and the split between LB and DNS.
"""

import ctypes
import itertools
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

SWARMNET = os.environ.get("SWARMNET_BIN", "swarmnet")
LAB = os.environ.get("LAB", "ibench")
CHANGES = int(os.environ.get("CHANGES", "50"))
LOW, HIGH = 3, 6
TIMEOUT = 15.0
# Pause between two polls of a node (the resolution of the figures).
POLL = float(os.environ.get("POLL_MS", "20")) / 1000


def cli(*args, fmt=None):
    cmd = [SWARMNET]
    if fmt:
        cmd += ["--format", fmt]
    cmd += list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


def nsenter(ns, *argv):
    r = subprocess.run(["nsenter", f"--net={ns}", *argv], capture_output=True, text=True,
                       timeout=5)
    return r.stdout if r.returncode == 0 else ""


def lb_backends(ns, vip):
    text = nsenter(ns, "nft", "list", "table", "ip", "swarmnet-lb")
    return text.count(f"{vip} . tcp . 80 . ")


CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)
QUERY_IDS = itertools.count(1)


def enter_netns(path):
    """Moves the calling thread (only) into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if LIBC.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def dns_socket():
    """A UDP socket to the resolver of the namespace the calling thread is in."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.11", 53))
    s.settimeout(1.0)
    return s


def dns_answers(sock):
    """The number of A records for tasks.web (0 on an error answer, -1 on no answer)."""
    qid = next(QUERY_IDS) & 0xFFFF
    sock.send(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
              + b"\x05tasks\x03web\x00" + struct.pack(">HH", 1, 1))
    try:
        while True:
            data = sock.recv(4096)
            if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid:
                break
    except socket.timeout:
        return -1
    if data[3] & 0x0F:
        return 0
    return struct.unpack(">H", data[6:8])[0]


def wait_node(node, want, vip, start, out):
    # This thread lives in the node's probe sandbox from here on (it ends with the change).
    enter_netns(node["dns_ns"])
    sock = dns_socket()
    lb_at = dns_at = None
    while time.monotonic() - start < TIMEOUT:
        now_lb = lb_at is None and lb_backends(node["lb_ns"], vip) == want
        if now_lb:
            lb_at = time.monotonic() - start
        if dns_at is None and dns_answers(sock) == want:
            dns_at = time.monotonic() - start
        if lb_at is not None and dns_at is not None:
            break
        # Each LB poll is an `nft` process: polling without a pause kept both cores busy
        # with the observers (three of them) and slowed the very netd being measured.
        time.sleep(POLL)
    sock.close()
    out[node["id"]] = (lb_at, dns_at)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    lab = json.load(open(f"/run/swarmnet-lab/{LAB}/lab.json"))
    cli("network", "create", "app")
    cli("service", "create", "--name", "probe", "--mode", "global", "--network", "app",
        "--", "sleep", "inf")
    cli("service", "create", "--name", "web", "--replicas", str(LOW), "--network", "app",
        "-p", "30080:80", "--", "sleep", "inf")
    web = next(s for s in json.loads(cli("service", "ls", fmt="json")) if s["name"] == "web")
    vips = web.get("vips") or {}
    vip = vips.get("app") if isinstance(vips, dict) else None
    if vip is None:
        sys.exit(f"no VIP of web on app in {web}")
    vip = vip.split("/")[0]
    probes = json.loads(cli("service", "ps", "probe", fmt="json"))
    nodes = []
    for n in lab["nodes"]:
        task = next((t for t in probes if t.get("node") == n["id"]), None)
        if task is None:
            sys.exit(f"no probe task on {n['id']}: {probes}")
        run = n["run_dir"]
        nodes.append({"id": n["id"], "lb_ns": f"{run}/netns/net-app",
                      "dns_ns": f"{run}/netns/sb-{task['id']}"})
    # The starting point settled everywhere.
    for node in nodes:
        out = {}
        # In a thread of its own: wait_node enters the node's sandbox namespace.
        t = threading.Thread(target=wait_node, args=(node, LOW, vip, time.monotonic(), out))
        t.start()
        t.join()
        if None in out[node["id"]]:
            sys.exit(f"{node['id']} never showed {LOW} backends of web (vip {vip})")
    total, lb, dns, up, down = [], [], [], [], []
    want = LOW
    for i in range(CHANGES):
        want = HIGH if want == LOW else LOW
        cli("service", "scale", f"web={want}", "--detach")
        start = time.monotonic()
        out = {}
        threads = [threading.Thread(target=wait_node, args=(n, want, vip, start, out))
                   for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(None in v for v in out.values()):
            sys.exit(f"change {i} (web={want}) not reflected within {TIMEOUT}s: {out}")
        lb.append(max(v[0] for v in out.values()))
        dns.append(max(v[1] for v in out.values()))
        total.append(max(max(v) for v in out.values()))
        # Scale-ups wait for the new tasks to start and be reported running; scale-downs only
        # for the leaving tasks to be withdrawn (they drain afterwards).
        (up if want == HIGH else down).append(total[-1])
        if os.environ.get("VERBOSE"):
            print(f"change {i}: web={want} " + " ".join(
                f"{n}: lb {v[0]*1000:.0f} dns {v[1]*1000:.0f}" for n, v in sorted(out.items())),
                file=sys.stderr)
        # Let the removed tasks finish draining before the next change, so that each change
        # is measured on its own.
        time.sleep(0.2)
    ms = lambda x: x * 1000
    print(f"{'what':<34} {'p50_ms':>8} {'p99_ms':>8} {'max_ms':>8}")
    for name, xs in [("every node LB + DNS (ours)", total), ("  LB only", lb),
                     ("  DNS only", dns), (f"  scale up {LOW}->{HIGH}", up),
                     (f"  scale down {HIGH}->{LOW}", down)]:
        print(f"{name:<34} {ms(pct(xs, 0.5)):8.0f} {ms(pct(xs, 0.99)):8.0f} {ms(max(xs)):8.0f}")
    print(f"{'target p50':<34} {200:8d}")
    print(f"{'kubernetes nftables (published, 100 nodes)':<34} {1520:8d} {6800:8d}")
    print(json.dumps({"changes": CHANGES, "nodes": len(nodes),
                      "p50_ms": round(ms(pct(total, 0.5)), 1),
                      "p99_ms": round(ms(pct(total, 0.99)), 1)}))


if __name__ == "__main__":
    main()
