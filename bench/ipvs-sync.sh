#!/usr/bin/env bash
# IPVS rule-sync benchmark of issue 4, in the kernel VM lane (this machine's kernel has no
# IPVS): full program of N services x 10 backends (default 10,000), then +1 service, then one
# endpoint flip; swarmnet's IPVS backend (generic netlink, release build) beside the peer
# `ipvsadm -R` (ipvsadm's restore: one process, one netlink request per line) on the same load,
# both in scratch namespaces of the same VM run. Prints a table, writes bench-out/ipvs-sync.json.
#
#   sudo bench/ipvs-sync.sh [--services N]
#
# Needs what scripts/vm-lane.sh needs (qemu-system-x86, linux-image-amd64, busybox-static, kmod)
# plus ipvsadm on the host (the VM uses the host's /usr). Under TCG the guest runs several
# times slower than the host: compare the two columns, not the absolute figures with other runs.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVICES=10000
while [ $# -gt 0 ]; do
  case "$1" in
    --services) SERVICES="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v ipvsadm >/dev/null || { echo "missing ipvsadm (apt-get install ipvsadm)" >&2; exit 1; }
[ -x scripts/vm-lane.sh ] || { echo "missing scripts/vm-lane.sh (the kernel VM lane)" >&2; exit 1; }
mkdir -p bench-out

echo "== building (release)" >&2
exe=$(cargo test --release --locked -q -p swarmnet-netd --test lb_contract --no-run --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "lb_contract":
        print(m["executable"])')
[ -n "$exe" ] || { echo "cargo named no lb_contract binary" >&2; exit 1; }

out="$(mktemp -d /tmp/snipvsbench.XXXXXX)"
trap 'rm -rf "$out"' EXIT
echo "== kernel VM lane: $SERVICES services x 10 backends, ours and ipvsadm" >&2
scripts/vm-lane.sh --out "$out" --timeout 1500 --entry-timeout 1400 \
  --bin "ipvs-sync $exe SWARMNET_LB_BENCH_SERVICES=$SERVICES bench_ipvs_sync --exact --ignored --nocapture" >&2 || {
  echo "the VM lane failed; output in $out/results" >&2
  trap - EXIT
  exit 1
}
line=$(sed -n 's/^IPVSSYNC //p' "$out/results/ipvs-sync.out")
[ -n "$line" ] || { echo "the benchmark printed nothing" >&2; exit 1; }
echo "$line" >bench-out/ipvs-sync.json
python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
o, p = r["ours"], r["ipvsadm"]
print(f"IPVS sync, {r['services']} services x {r['backends_per_service']} backends (kernel VM lane, TCG)")
print(f"{'step':<22}{'swarmnet (netlink)':>22}{'ipvsadm -R':>14}")
print(f"{'full program':<22}{o['full_s']:>20.3f} s{p['full_s']:>12.3f} s")
print(f"{'+1 service':<22}{o['add_service_ms']:>19.3f} ms{p['add_service_ms']:>11.3f} ms")
print(f"{'endpoint flip':<22}{o['flip_ms']:>19.3f} ms{p['flip_ms']:>11.3f} ms")
print(f"messages: full {o['full_messages']}, +1 service {o['add_service_messages']}, flip {o['flip_messages']}")
PY
