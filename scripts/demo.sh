#!/usr/bin/env bash
# The swarmnet demo (the README's first command): installs what it needs, builds, and runs
# `swarmnet lab demo`: a 3-node cluster in network namespaces on this machine (one Raft manager,
# netd on every node following it), an overlay network, a `web` service of 3 replicas of the
# demo server published on 8080, and a client task; it shows `web` and `tasks.web` resolved at
# 127.0.0.11 inside the client, requests through the VIP reaching every replica, and the
# published port answering on every node, including the one that runs no web task.
#
#   sudo ./scripts/demo.sh          # build, run, show; the lab stays up to explore
#   sudo ./scripts/demo.sh --down   # ... and remove it afterwards
#
# Nothing in the machine's root network namespace is changed: the nodes, their underlay and
# every overlay live in namespaces the lab creates; underlay addresses come from 198.18.0.0/15.
# `swarmnet lab down` removes every namespace, mount, cgroup and process it made.
set -euo pipefail
cd "$(dirname "$0")/.."
down=()
case "${1:-}" in
  --down) down=(--down) ;;
  "") ;;
  *) echo "usage: $0 [--down]" >&2; exit 2 ;;
esac

./scripts/install-deps.sh
command -v cargo >/dev/null || { echo "cargo is needed (https://rustup.rs)" >&2; exit 1; }
echo "== building (release)"
cargo build --release --locked -q -p swarmnet-netd -p swarmnet-cli -p swarmnet-orchestrator
swarmnet=$PWD/target/release/swarmnet

# A lab left up by an earlier run of this script is replaced.
"$swarmnet" lab down >/dev/null 2>&1 || true
"$swarmnet" lab demo "${down[@]}"
