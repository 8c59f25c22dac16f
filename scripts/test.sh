#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, contract suites on the fake and the real
# kernel, the multi-node network-namespace tests, then the kernel VM lane (the same kinds of tests
# inside Debian's stock kernel under qemu, where IPVS exists). Needs root for the privileged
# tests, which fail (not skip) when SWARMNET_REQUIRE_PRIVILEGED or CI is set.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export SWARMNET_REQUIRE_PRIVILEGED=1
export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (binaries the netns tests run)"
cargo build --workspace --locked
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${SWARMNET_TEST_THREADS:-2}"
echo "== kernel VM lane (docs/vm-lane.md)"
./scripts/vm-lane.sh
