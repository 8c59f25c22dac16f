#!/usr/bin/env python3
"""Writes the peers' inputs for bench/lb-sync.sh: kube-proxy's two ways of syncing the same
load balancer (10k services x 10 backends, +1 service, one endpoint flip).

nftables mode (kube-proxy pkg/proxy/nftables): the table rendered as text and fed to `nft -f`;
per service a chain with `numgen random mod N vmap { ... }` of endpoint chains, a verdict map
`service-ips` dispatching to the service chains. Incremental syncs send only the changed
objects, but every `nft -f` call still makes nft read the kernel's ruleset first.

iptables mode (pkg/proxy/iptables): KUBE-SERVICES -> KUBE-SVC-<h> (statistic random
probabilities) -> KUBE-SEP-<h> (DNAT); full sync = `iptables-restore` of the whole nat table;
partial sync (kube-proxy >= 1.28) = `iptables-restore --noflush` of the changed chains.

Usage: lb_sync_peers.py OUTDIR SERVICES
"""
import hashlib
import ipaddress
import os
import sys

out, n = sys.argv[1], int(sys.argv[2])
B = 10
VIP0 = int(ipaddress.IPv4Address("10.60.0.0"))
BE0 = int(ipaddress.IPv4Address("10.64.0.0"))


def ip(x):
    return str(ipaddress.IPv4Address(x))


def vip(i):
    return ip(VIP0 + i)


def backends(i):
    return [ip(BE0 + i * B + j) for j in range(B)]


FLIP = n // 2
FLIP_OLD = backends(FLIP)
FLIP_NEW = FLIP_OLD[1:] + [ip(int(ipaddress.IPv4Address("10.126.0.0")))]


# ---- nftables (kube-proxy nftables mode) ----
def nft_service(i, bes):
    t = "ip kube-proxy"
    lines = []
    for j, b in enumerate(bes):
        lines.append(f"add chain {t} endpoint-{i}-{b}")
        lines.append(f"add rule {t} endpoint-{i}-{b} meta l4proto tcp dnat to {b}:8080")
    lines.append(f"add chain {t} service-{i}")
    vm = ", ".join(f"{j} : goto endpoint-{i}-{b}" for j, b in enumerate(bes))
    lines.append(f"add rule {t} service-{i} numgen random mod {len(bes)} vmap {{ {vm} }}")
    return lines


def write(name, lines):
    with open(os.path.join(out, name), "w") as f:
        f.write("\n".join(lines) + "\n")


t = "ip kube-proxy"
full = [
    f"add table {t}",
    f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}",
    f"add chain {t} nat-prerouting {{ type nat hook prerouting priority dstnat; }}",
    f"add rule {t} nat-prerouting ip daddr . meta l4proto . th dport vmap @service-ips",
    f"add chain {t} nat-output {{ type nat hook output priority -100; }}",
    f"add rule {t} nat-output ip daddr . meta l4proto . th dport vmap @service-ips",
]
elems = []
for i in range(n):
    full += nft_service(i, backends(i))
    elems.append(f"{vip(i)} . tcp . 80 : goto service-{i}")
for k in range(0, len(elems), 1000):
    full.append(f"add element {t} service-ips {{ {', '.join(elems[k:k + 1000])} }}")
write("kp-nft-full.nft", full)
write("kp-nft-add.nft", nft_service(n, backends(n)) +
      [f"add element {t} service-ips {{ {vip(n)} . tcp . 80 : goto service-{n} }}"])
# Flip as kube-proxy does it: new endpoint chain, service chain flushed and rewritten, the old
# endpoint chain deleted.
nb = FLIP_NEW[-1]
write("kp-nft-flip.nft", [
    f"add chain {t} endpoint-{FLIP}-{nb}",
    f"add rule {t} endpoint-{FLIP}-{nb} meta l4proto tcp dnat to {nb}:8080",
    f"flush chain {t} service-{FLIP}",
    f"add rule {t} service-{FLIP} numgen random mod {B} vmap {{ "
    + ", ".join(f"{j} : goto endpoint-{FLIP}-{b}" for j, b in enumerate(FLIP_NEW)) + " }",
    f"delete chain {t} endpoint-{FLIP}-{FLIP_OLD[0]}",
])


# ---- iptables (kube-proxy iptables mode) ----
def sep_name(i, b):
    # kube-proxy's form: a hash of the service and endpoint (chain names are < 29 chars).
    return "KUBE-SEP-" + hashlib.sha256(f"{i}/{b}".encode()).hexdigest()[:16].upper()


def sep_rules(i, b):
    sep = sep_name(i, b)
    return [f"-A {sep} -s {b}/32 -j KUBE-MARK-MASQ",
            f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {b}:8080"]


def ipt_service(i, bes):
    chains, rules = [], []
    svc = f"KUBE-SVC-{i:06d}"
    chains.append(f":{svc} - [0:0]")
    for j, b in enumerate(bes):
        sep = sep_name(i, b)
        chains.append(f":{sep} - [0:0]")
        rules += sep_rules(i, b)
        left = len(bes) - j
        if left > 1:
            rules.append(f"-A {svc} -m statistic --mode random --probability {1 / left:.11f} -j {sep}")
        else:
            rules.append(f"-A {svc} -j {sep}")
    svc_rule = f"-A KUBE-SERVICES -d {vip(i)}/32 -p tcp -m tcp --dport 80 -j {svc}"
    return chains, rules, svc_rule


head = ["*nat", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-POSTROUTING - [0:0]"]
base = ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES",
        "-A POSTROUTING -j KUBE-POSTROUTING",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE"]
chains, rules, svcs = [], [], []
for i in range(n):
    c, r, s = ipt_service(i, backends(i))
    chains += c
    rules += r
    svcs.append(s)
write("kp-ipt-full.txt", head + chains + base + svcs + rules + ["COMMIT"])
c, r, s = ipt_service(n, backends(n))
write("kp-ipt-add.txt", ["*nat"] + c + r + [s, "COMMIT"])
# --noflush partial sync: the service chain redeclared (which flushes it) and rewritten, the new
# endpoint's chain, the removed endpoint's chain flushed and deleted.
_, r, _ = ipt_service(FLIP, FLIP_NEW)
svc = f"KUBE-SVC-{FLIP:06d}"
old, new = sep_name(FLIP, FLIP_OLD[0]), sep_name(FLIP, FLIP_NEW[-1])
write("kp-ipt-flip.txt", ["*nat", f":{svc} - [0:0]", f":{new} - [0:0]", f":{old} - [0:0]"]
      + [x for x in r if x.startswith(f"-A {svc} ")] + sep_rules(FLIP, FLIP_NEW[-1])
      + [f"-X {old}", "COMMIT"])
