#!/usr/bin/env python3
"""Helper for bench/foundation.sh: intent generation, netd step timing, the naive `ip` peer's
scripts, timed command runs and the final report. Standard library only.

Topology of one run (names are the shell's; see foundation.sh):
- networks bn1..bnN, VNI 5000+i, subnet 10.<20+i//256>.<i%256>.0/24, gateway .1;
- local tasks t<i>-<j> (j = 1..M) on node n1 at .<j+1>, argv `sleep infinity`;
- one remote task r<i> per network on node n2 at .250 (.251 after the change), MAC derived from
  the IP (02:42 + IP), which is exactly netd's default, so the peer and netd program the same
  FDB and neighbour entries.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

N1_ADDR = "198.18.0.1"
N2_ADDR = "198.18.0.2"
VXLAN_PORT = 4789
GW_SUBNET = "172.30.0.0/16"
UNDERLAY_MTU = 1500
OVERLAY_MTU = UNDERLAY_MTU - 50


def subnet_base(i):
    return f"10.{20 + i // 256}.{i % 256}"


def default_mac(ip):
    a = [int(x) for x in ip.split(".")]
    return "02:42:" + ":".join(f"{x:02x}" for x in a)


def remote_ip(i, changed):
    return f"{subnet_base(i)}.{251 if changed else 250}"


# --- intent -----------------------------------------------------------------------------------

def make_intent(n, m, variant):
    """variant: full | changed (network 1's remote endpoint moved) | empty."""
    spec = {
        "version": 1,
        "nodes": [{"id": "n1", "addr": N1_ADDR}, {"id": "n2", "addr": N2_ADDR}],
        "networks": [],
        "services": [],
        "tasks": [],
    }
    if variant == "empty":
        return spec
    for i in range(1, n + 1):
        net = f"bn{i}"
        spec["networks"].append({"name": net, "subnet": f"{subnet_base(i)}.0/24", "vni": 5000 + i})
        spec["services"].append({"name": f"s{i}", "networks": [{"network": net}]})
        for j in range(1, m + 1):
            spec["tasks"].append({
                "id": f"t{i}-{j}", "service": f"s{i}", "slot": j, "node": "n1",
                "argv": ["sleep", "infinity"],
                "networks": [{"network": net, "ip": f"{subnet_base(i)}.{j + 1}"}],
            })
        spec["tasks"].append({
            "id": f"r{i}", "service": f"s{i}", "slot": m + 1, "node": "n2",
            "argv": ["sleep", "infinity"],
            "networks": [{"network": net, "ip": remote_ip(i, variant == "changed" and i == 1)}],
        })
    return spec


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


# --- netd step ----------------------------------------------------------------------------------

def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def proc_cpu(pid):
    """(self utime+stime, reaped children cutime+cstime) in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    tck = os.sysconf("SC_CLK_TCK")
    # fields[0] is field 3 (state); utime = field 14 → index 11.
    ut, st, cut, cst = (int(x) for x in fields[11:15])
    return (ut + st) / tck, (cut + cst) / tck


def proc_status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    return None


def cmd_netd_step(a):
    status_path = os.path.join(a.run_dir, "status.json")
    netns_dir = os.path.join(a.run_dir, "netns")
    text = json.dumps(make_intent(a.networks, a.sandboxes, a.variant), indent=1)
    load_start = loadavg()
    cpu0, ccpu0 = proc_cpu(a.pid)
    last_stamp = None
    st = {}
    first_round = None
    t0 = time.monotonic()
    if not a.no_write:
        write_atomic(a.intent, text)
    deadline = t0 + a.timeout
    ok = False
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{a.pid}"):
            break
        try:
            s = os.stat(status_path)
            stamp = (s.st_mtime_ns, s.st_ino, s.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != last_stamp:
            last_stamp = stamp
            try:
                with open(status_path) as f:
                    st = json.load(f)
            except (OSError, ValueError):
                st = {}
            if st.get("intent_generation") == a.generation and first_round is None:
                first_round = st.get("round")
        if st.get("intent_generation") == a.generation and st.get("converged"):
            if not a.wait_empty or not os.listdir(netns_dir):
                ok = True
                break
        time.sleep(0.005)
    t1 = time.monotonic()
    cpu1, ccpu1 = proc_cpu(a.pid) if os.path.exists(f"/proc/{a.pid}") else (cpu0, ccpu0)
    bad = {k: v for k, v in (st.get("objects") or {}).items() if v.get("state") != "ok"}
    out = {
        "ok": ok,
        "seconds": round(t1 - t0, 4),
        "netd_cpu_s": round(cpu1 - cpu0, 3),
        "netd_children_cpu_s": round(ccpu1 - ccpu0, 3),
        "rounds": (st.get("round", 0) - first_round + 1) if first_round is not None else None,
        "final_round": st.get("round"),
        "not_ok_objects": dict(list(bad.items())[:5]),
        "not_ok_count": len(bad),
        "loadavg_at_start": load_start,
        "intent_error": st.get("intent_error"),
        "underlay_error": st.get("underlay_error"),
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("ok", "seconds", "netd_cpu_s", "rounds", "not_ok_count")}))
    return 0 if ok else 1


def cmd_write_intent(a):
    write_atomic(a.out, json.dumps(make_intent(a.networks, a.sandboxes, a.variant), indent=1))


def cmd_netd_idle(a):
    cpu0, ccpu0 = proc_cpu(a.pid)
    time.sleep(a.seconds)
    cpu1, ccpu1 = proc_cpu(a.pid)
    out = {"seconds": a.seconds, "netd_cpu_s": round(cpu1 - cpu0, 3), "netd_children_cpu_s": round(ccpu1 - ccpu0, 3),
           "core_percent": round(100 * ((cpu1 - cpu0) + (ccpu1 - ccpu0)) / a.seconds, 1)}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


def cmd_netd_mem(a):
    out = {
        "vm_hwm_kb": proc_status(a.pid, "VmHWM"),
        "vm_rss_kb": proc_status(a.pid, "VmRSS"),
        "threads": proc_status(a.pid, "Threads"),
    }
    cpu, ccpu = proc_cpu(a.pid)
    out["cpu_total_s"] = round(cpu, 3)
    out["children_cpu_total_s"] = round(ccpu, 3)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


# --- peer scripts ---------------------------------------------------------------------------------

def firewall_text():
    # The same table netd renders (netd/src/firewall.rs) for n1 with n2 as the only other VTEP.
    return f"""table inet swarmnet
delete table inet swarmnet
table inet swarmnet {{
\tset vteps {{
\t\ttype ipv4_addr
\t\telements = {{ {N2_ADDR} }}
\t}}
\tchain input {{
\t\ttype filter hook input priority filter - 5; policy accept;
\t\tudp dport {VXLAN_PORT} ip saddr != @vteps counter drop comment "VXLAN only from known nodes"
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter - 5; policy accept;
\t\tiifname "sng*" udp dport {VXLAN_PORT} counter drop comment "no VXLAN from sandboxes"
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr {GW_SUBNET} oifname != "sngw0" masquerade comment "sandbox egress"
\t}}
}}
"""


class Peer:
    """Names and addresses of the naive peer's objects."""

    def __init__(self, prefix, n, m):
        self.p, self.n, self.m = prefix, n, m

    def net_ns(self, i):
        return f"{self.p}-net{i}"

    def sb_ns(self, i, j):
        return f"{self.p}-sb{i}-{j}"

    @staticmethod
    def host_if(i, j):
        return f"snv{i:04x}{j:04x}"  # 3 + 8 = 11 bytes

    @staticmethod
    def gw_if(i, j):
        return f"sng{i:04x}{j:04x}"

    @staticmethod
    def gw_ip(i, j, m):
        k = (i - 1) * m + j + 1  # 172.30.0.1 is the bridge
        return f"172.30.{k // 256}.{k % 256}"

    def all_ns(self):
        for i in range(1, self.n + 1):
            yield self.net_ns(i)
            for j in range(1, self.m + 1):
                yield self.sb_ns(i, j)


SYSCTL_NS = "net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0"


def peer_scripts(a):
    P = Peer(a.prefix, a.networks, a.sandboxes)
    n, m = a.networks, a.sandboxes
    d = a.dir
    os.makedirs(d, exist_ok=True)
    pids = os.path.join(d, "peer-sleep.pids")
    fw = os.path.join(d, "peer-fw.nft")
    with open(fw, "w") as f:
        f.write(firewall_text())
    hdr = "#!/bin/bash\n# generated by bench/foundation_helper.py; run inside the peer node namespace\nset -e\n"
    has_v6 = os.path.isdir("/proc/sys/net/ipv6")

    def ns_sysctl(ns):
        return f"nsenter --net=/run/netns/{ns} sysctl -qw {SYSCTL_NS}\n" if has_v6 else ""

    # ---- plain: one command per object, the way it is usually typed ----
    up = [hdr]
    up.append("ip link add sngw0 type bridge\n")
    if has_v6:
        up.append("sysctl -qw net.ipv6.conf.sngw0.accept_ra=0\n")
    up.append("ip link set sngw0 up\nip addr add 172.30.0.1/16 dev sngw0\nsysctl -qw net.ipv4.ip_forward=1\n")
    up.append(f"nft -f {fw}\n")
    for i in range(1, n + 1):
        ns, vni, base = P.net_ns(i), 5000 + i, subnet_base(i)
        vx = f"snvx{vni}"
        up.append(f"ip netns add {ns}\n{ns_sysctl(ns)}")
        up.append(f"ip -n {ns} link add br0 mtu {OVERLAY_MTU} type bridge\n")
        up.append(f"ip -n {ns} link set br0 up\n")
        up.append(f"ip -n {ns} addr add {base}.1/24 dev br0\n")
        up.append(f"ip link add {vx} mtu {OVERLAY_MTU} type vxlan id {vni} local {N1_ADDR} dstport {VXLAN_PORT} "
                  f"dev ul0 nolearning proxy\n")
        up.append(f"ip link set {vx} netns {ns}\n")
        up.append(f"ip -n {ns} link set {vx} master br0 up\n")
        rip = remote_ip(i, False)
        up.append(f"bridge -n {ns} fdb add {default_mac(rip)} dev {vx} dst {N2_ADDR} self permanent\n")
        up.append(f"ip -n {ns} neigh add {rip} lladdr {default_mac(rip)} dev {vx} nud permanent\n")
        for j in range(1, m + 1):
            sb, ip = P.sb_ns(i, j), f"{base}.{j + 1}"
            h, g = P.host_if(i, j), P.gw_if(i, j)
            up.append(f"ip netns add {sb}\n{ns_sysctl(sb)}ip -n {sb} link set lo up\n")
            up.append(f"ip -n {ns} link add {h} mtu {OVERLAY_MTU} type veth peer name eth0 mtu {OVERLAY_MTU} "
                      f"address {default_mac(ip)} netns {sb}\n")
            up.append(f"ip -n {ns} link set {h} master br0 up\n")
            up.append(f"ip -n {sb} link set eth0 up\nip -n {sb} addr add {ip}/24 dev eth0\n")
            up.append(f"ip link add {g} mtu {UNDERLAY_MTU} type veth peer name eth1 mtu {UNDERLAY_MTU} netns {sb}\n")
            if has_v6:
                up.append(f"sysctl -qw net.ipv6.conf.{g}.accept_ra=0\n")
            up.append(f"ip link set {g} master sngw0 up\n")
            up.append(f"ip -n {sb} link set eth1 up\nip -n {sb} addr add {P.gw_ip(i, j, m)}/16 dev eth1\n")
            up.append(f"ip -n {sb} route add default via 172.30.0.1 dev eth1\n")
            up.append(f"ip netns exec {sb} sleep infinity </dev/null >/dev/null 2>&1 &\necho $! >> {pids}\n")
    write(os.path.join(d, "peer-up-plain.sh"), "".join(up))

    # ---- batch: ip -batch / bridge -batch wherever iproute2 allows it ----
    # Node namespace: every `netns add`, every link created from here (moved with `netns`),
    # then one batch per network namespace and one per sandbox for what must be done inside.
    bd = os.path.join(d, "batch")
    os.makedirs(bd, exist_ok=True)
    node = ["link add sngw0 type bridge\n", "link set sngw0 up\n", "addr add 172.30.0.1/16 dev sngw0\n"]
    for ns in P.all_ns():
        node.append(f"netns add {ns}\n")
    for i in range(1, n + 1):
        ns, vni = P.net_ns(i), 5000 + i
        vx = f"snvx{vni}"
        node.append(f"link add {vx} mtu {OVERLAY_MTU} type vxlan id {vni} local {N1_ADDR} dstport {VXLAN_PORT} "
                    f"dev ul0 nolearning proxy\n")
        node.append(f"link set {vx} netns {ns}\n")
        for j in range(1, m + 1):
            sb, ip = P.sb_ns(i, j), f"{subnet_base(i)}.{j + 1}"
            h, g = P.host_if(i, j), P.gw_if(i, j)
            node.append(f"link add {h} mtu {OVERLAY_MTU} netns {ns} type veth peer name eth0 mtu {OVERLAY_MTU} "
                        f"address {default_mac(ip)} netns {sb}\n")
            node.append(f"link add {g} mtu {UNDERLAY_MTU} type veth peer name eth1 mtu {UNDERLAY_MTU} netns {sb}\n")
            node.append(f"link set {g} master sngw0 up\n")
    write(os.path.join(bd, "node.ip"), "".join(node))
    ub = [hdr, f"ip -batch {bd}/node.ip\n"]
    if has_v6:
        sysctls = ["net.ipv6.conf.sngw0.accept_ra=0"] + [
            f"net.ipv6.conf.{P.gw_if(i, j)}.accept_ra=0" for i in range(1, n + 1) for j in range(1, m + 1)]
        ub.append(f"sysctl -qw net.ipv4.ip_forward=1 {' '.join(sysctls)}\n")
    else:
        ub.append("sysctl -qw net.ipv4.ip_forward=1\n")
    ub.append(f"nft -f {fw}\n")
    for i in range(1, n + 1):
        ns, vni, base = P.net_ns(i), 5000 + i, subnet_base(i)
        vx = f"snvx{vni}"
        rip = remote_ip(i, False)
        lines = [f"link add br0 mtu {OVERLAY_MTU} type bridge\n", "link set br0 up\n",
                 f"addr add {base}.1/24 dev br0\n", f"link set {vx} master br0 up\n"]
        lines += [f"link set {P.host_if(i, j)} master br0 up\n" for j in range(1, m + 1)]
        lines.append(f"neigh add {rip} lladdr {default_mac(rip)} dev {vx} nud permanent\n")
        write(os.path.join(bd, f"net{i}.ip"), "".join(lines))
        write(os.path.join(bd, f"net{i}.bridge"),
              f"fdb add {default_mac(rip)} dev {vx} dst {N2_ADDR} self permanent\n")
        ub.append(ns_sysctl(ns))
        ub.append(f"ip -n {ns} -batch {bd}/net{i}.ip\nbridge -n {ns} -batch {bd}/net{i}.bridge\n")
        for j in range(1, m + 1):
            sb, ip = P.sb_ns(i, j), f"{base}.{j + 1}"
            write(os.path.join(bd, f"sb{i}-{j}.ip"),
                  f"link set lo up\nlink set eth0 up\naddr add {ip}/24 dev eth0\nlink set eth1 up\n"
                  f"addr add {P.gw_ip(i, j, m)}/16 dev eth1\nroute add default via 172.30.0.1 dev eth1\n")
            ub.append(ns_sysctl(sb))
            ub.append(f"ip -n {sb} -batch {bd}/sb{i}-{j}.ip\n")
            ub.append(f"ip netns exec {sb} sleep infinity </dev/null >/dev/null 2>&1 &\necho $! >> {pids}\n")
    write(os.path.join(d, "peer-up-batch.sh"), "".join(ub))

    # ---- change: network 1's remote endpoint moves from .250 to .251 (new MAC) ----
    old, new = remote_ip(1, False), remote_ip(1, True)
    ns, vx = P.net_ns(1), "snvx5001"
    write(os.path.join(d, "peer-change-plain.sh"), hdr +
          f"bridge -n {ns} fdb del {default_mac(old)} dev {vx} dst {N2_ADDR} self\n"
          f"bridge -n {ns} fdb add {default_mac(new)} dev {vx} dst {N2_ADDR} self permanent\n"
          f"ip -n {ns} neigh del {old} dev {vx}\n"
          f"ip -n {ns} neigh add {new} lladdr {default_mac(new)} dev {vx} nud permanent\n")
    write(os.path.join(bd, "change.bridge"),
          f"fdb del {default_mac(old)} dev {vx} dst {N2_ADDR} self\n"
          f"fdb add {default_mac(new)} dev {vx} dst {N2_ADDR} self permanent\n")
    write(os.path.join(bd, "change.ip"),
          f"neigh del {old} dev {vx}\nneigh add {new} lladdr {default_mac(new)} dev {vx} nud permanent\n")
    write(os.path.join(d, "peer-change-batch.sh"), hdr +
          f"bridge -n {ns} -batch {bd}/change.bridge\nip -n {ns} -batch {bd}/change.ip\n")

    # ---- teardown: stop the tasks (and wait for them), delete sandboxes, VXLANs, networks, node objects ----
    kill = (f"pids=$(cat {pids})\nkill -TERM $pids\n"
            "for p in $pids; do while [ -e /proc/$p ]; do sleep 0.01; done; done\n"
            f"rm -f {pids}\n")
    down = [hdr, kill]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            down.append(f"ip netns del {P.sb_ns(i, j)}\n")
    for i in range(1, n + 1):
        down.append(f"ip -n {P.net_ns(i)} link del snvx{5000 + i}\nip netns del {P.net_ns(i)}\n")
    down.append("ip link del sngw0\nnft delete table inet swarmnet\n")
    write(os.path.join(d, "peer-down-plain.sh"), "".join(down))
    db = [f"netns del {P.sb_ns(i, j)}\n" for i in range(1, n + 1) for j in range(1, m + 1)]
    db += [f"netns del {P.net_ns(i)}\n" for i in range(1, n + 1)]
    db.append("link del sngw0\n")
    write(os.path.join(bd, "down.ip"), "".join(db))
    downb = [hdr, kill]
    # The VXLANs go first, as netd does, so their VNIs are free at once.
    for i in range(1, n + 1):
        downb.append(f"ip -n {P.net_ns(i)} link del snvx{5000 + i}\n")
    downb.append(f"ip -batch {bd}/down.ip\nnft delete table inet swarmnet\n")
    write(os.path.join(d, "peer-down-batch.sh"), "".join(downb))
    with open(os.path.join(d, "peer-namespaces.txt"), "w") as f:
        f.write("\n".join(P.all_ns()) + "\n")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def cmd_peer_scripts(a):
    peer_scripts(a)
    for v in ("plain", "batch"):
        for s in ("up", "change", "down"):
            p = os.path.join(a.dir, f"peer-{s}-{v}.sh")
            with open(p) as f:
                cmds = sum(1 for line in f if line.strip() and not line.startswith("#") and line.strip() != "set -e")
            print(f"{os.path.basename(p)}: {cmds} lines")


# --- timed run --------------------------------------------------------------------------------------

def cmd_run(a):
    load_start = loadavg()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(a.log, "ab") as log:
        try:
            p = subprocess.run(a.cmd, stdout=log, stderr=log, timeout=a.timeout, start_new_session=False)
            rc, timed_out = p.returncode, False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    t1 = time.monotonic()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {
        "ok": rc == 0,
        "rc": rc,
        "timed_out": timed_out,
        "seconds": round(t1 - t0, 4),
        "cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 3),
        "loadavg_at_start": load_start,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


# --- report -----------------------------------------------------------------------------------------

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cmd_report(a):
    d = a.dir
    steps = [("bring-up", "up"), ("change one endpoint", "change"), ("teardown", "down")]
    start = load(os.path.join(d, "netd-start.json")) or {}
    res = {
        "benchmark": "foundation",
        "networks": a.networks,
        "sandboxes_per_network": a.sandboxes,
        "sandboxes": a.networks * a.sandboxes,
        "machine": {"nproc": os.cpu_count(), "kernel": os.uname().release,
                    "loadavg_at_end": open("/proc/loadavg").read().split()[:3]},
        "netd_binary": a.netd_bin,
        "steps": {},
        "netd": load(os.path.join(d, "netd-mem.json")),
        "netd_idle_all_up": load(os.path.join(d, "netd-idle.json")),
        "checks": load(os.path.join(d, "checks.json")),
    }
    lines = []
    hdr = f"{'step':<22} | {'swarmnet':>10} | {'ip plain':>10} | {'ratio':>6} | {'ip -batch':>10} | {'ratio':>6} | {'netd CPU':>8} | {'ip CPU':>8}"
    lines.append(hdr)
    lines.append("-" * len(hdr))

    def fmt(x):
        return f"{x:.3f} s" if isinstance(x, (int, float)) else "n/a"

    def ratio(x, y):
        return f"{x / y:.2f}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y > 0 else "n/a"

    for label, key in steps:
        sw = load(os.path.join(d, f"netd-{key}.json")) or {}
        pl = load(os.path.join(d, f"peer-{key}-plain.json")) or {}
        bt = load(os.path.join(d, f"peer-{key}-batch.json")) or {}
        s = sw.get("seconds") if sw.get("ok") else None
        p = pl.get("seconds") if pl.get("ok") else None
        b = bt.get("seconds") if bt.get("ok") else None
        cpu = sw.get("netd_cpu_s") if sw else None
        ipcpu = f"{pl['cpu_s']:.2f} s" if pl.get("cpu_s") is not None else "n/a"
        res["steps"][key] = {
            "swarmnet": sw, "ip_plain": pl, "ip_batch": bt,
            "ratio_swarmnet_over_ip_plain": (s / p) if s and p else None,
            "ratio_swarmnet_over_ip_batch": (s / b) if s and b else None,
        }
        lines.append(f"{label:<22} | {fmt(s):>10} | {fmt(p):>10} | {ratio(s, p):>6} | {fmt(b):>10} | {ratio(s, b):>6} | "
                     f"{(f'{cpu:.2f} s' if cpu is not None else 'n/a'):>8} | {ipcpu:>8}")
    lines.append("")
    lines.append("ratio = swarmnet time / ip time (below 1: swarmnet faster). netd CPU = netd's own utime+stime;")
    lines.append("ip CPU = every waited-for process of the plain peer script (not the sleeps). 'children' below =")
    lines.append("netd's reaped children: nft, and the task processes (their pre-exec setup) once reaped at teardown.")
    loads = [f"{k}/{side}={res['steps'][k][side].get('loadavg_at_start')}" for _, k in steps
             for side in ("swarmnet", "ip_plain", "ip_batch") if res["steps"][k][side]]
    lines.append(f"1-min load average at step start ({os.cpu_count()} cores; higher = busier machine, noisier times):")
    lines.append("  " + " ".join(loads))
    mem = res["netd"] or {}
    if mem:
        lines.append(f"netd peak RSS (VmHWM): {mem.get('vm_hwm_kb', 0) / 1024:.1f} MiB; "
                     f"CPU total: {mem.get('cpu_total_s')} s own + {mem.get('children_cpu_total_s')} s children")
    for label, key in steps:
        sw = res["steps"][key]["swarmnet"] or {}
        if sw:
            lines.append(f"  {label}: netd CPU {sw.get('netd_cpu_s')} s own + {sw.get('netd_children_cpu_s')} s "
                         f"children, {sw.get('rounds')} rounds" + ("" if sw.get("ok") else
                                                                   f"  NOT CONVERGED: {sw.get('not_ok_count')} objects, e.g. {sw.get('not_ok_objects')}"))
    idle = res["netd_idle_all_up"]
    if idle:
        lines.append(f"  idle with everything up: {idle['core_percent']} % of one core "
                     f"(netd CPU over {idle['seconds']} s, no intent change)")
    if start:
        res["netd_start_empty_intent"] = start
    if res["checks"]:
        lines.append(f"checks: {json.dumps(res['checks'])}")
    text = "\n".join(lines)
    print(text)
    res["table"] = text
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nresults: {a.out}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("netd-step")
    s.add_argument("--networks", type=int, required=True)
    s.add_argument("--sandboxes", type=int, required=True)
    s.add_argument("--variant", choices=["full", "changed", "empty"], required=True)
    s.add_argument("--intent", required=True)
    s.add_argument("--run-dir", required=True)
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--generation", type=int, required=True)
    s.add_argument("--wait-empty", action="store_true")
    s.add_argument("--no-write", action="store_true", help="only wait (the intent is already in place)")
    s.add_argument("--timeout", type=float, default=600)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_netd_step)
    s = sub.add_parser("write-intent")
    s.add_argument("--networks", type=int, required=True)
    s.add_argument("--sandboxes", type=int, required=True)
    s.add_argument("--variant", choices=["full", "changed", "empty"], required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_write_intent)
    s = sub.add_parser("netd-idle")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--seconds", type=float, default=5)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_netd_idle)
    s = sub.add_parser("netd-mem")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_netd_mem)
    s = sub.add_parser("peer-scripts")
    s.add_argument("--networks", type=int, required=True)
    s.add_argument("--sandboxes", type=int, required=True)
    s.add_argument("--prefix", required=True)
    s.add_argument("--dir", required=True)
    s.set_defaults(fn=cmd_peer_scripts)
    s = sub.add_parser("run")
    s.add_argument("--timeout", type=float, default=600)
    s.add_argument("--out", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("cmd", nargs="+")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("report")
    s.add_argument("--dir", required=True)
    s.add_argument("--networks", type=int, required=True)
    s.add_argument("--sandboxes", type=int, required=True)
    s.add_argument("--netd-bin", default="")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_report)
    a = ap.parse_args()
    sys.exit(a.fn(a) or 0)


if __name__ == "__main__":
    main()
