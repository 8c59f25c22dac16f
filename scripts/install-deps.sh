#!/usr/bin/env bash
# Installs the system packages swarmnet's lab, tests and benchmarks use (Debian 12, as root).
# Idempotent: skips apt when everything is there already.
set -euo pipefail
pkgs=(protobuf-compiler iproute2 nftables conntrack iputils-ping netcat-openbsd socat util-linux procps dnsutils knot-dnsutils iperf3 curl python3 ca-certificates)
# The kernel VM lane (scripts/vm-lane.sh): qemu, Debian's stock kernel with its modules (IPVS),
# a static busybox for the VM's init, and modprobe to order the modules.
pkgs+=(qemu-system-x86 linux-image-amd64 busybox-static kmod)
# bench/ipvs-sync.sh's peer (ipvsadm -R), run inside the VM.
pkgs+=(ipvsadm)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust 1.95 or newer (rustup) first" >&2
  exit 1
fi
