#!/usr/bin/env bash
# The test command: builds what is missing, then runs every test against real VMs.
#
#   sudo ./scripts/test.sh
#
# 1. unit tests and integration tests (`cargo test --release`): the real manta-server binary
#    in private network namespaces, real QEMU guests, real taps and iptables rules, and the
#    real Firecracker binary;
# 2. the guest boot test (tests/boot-test.sh).
# Nothing leaves the machine: every server and guest runs in a namespace whose uplink leads
# into an empty namespace.
set -euo pipefail

export MANTA_LOG_TAG="test"
# shellcheck source=guest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../guest/lib.sh"
cd "$MANTA_REPO_ROOT"

TEST_THREADS="${TEST_THREADS:-1}"
log "settings:"
show_knob TEST_THREADS
require_root "the tests (namespaces, taps, iptables, VMs)"

log "step 1/3: guest artifacts and Firecracker (skipped where already built)"
"$MANTA_REPO_ROOT/guest/build-all.sh"
ensure_tools iptables:iptables iproute2:ip qemu-system-x86:qemu-system-x86_64

log "step 2/3: cargo test --release"
cargo test --release -- --test-threads "$TEST_THREADS" --nocapture

log "step 3/3: guest boot test"
"$MANTA_REPO_ROOT/tests/boot-test.sh"
