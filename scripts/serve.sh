#!/usr/bin/env bash
# The one command that runs Manta: builds whatever is missing (host packages, guest
# artifacts, Firecracker, the release binaries), then starts manta-server in the foreground.
#
#   sudo ./scripts/serve.sh              serve on MANTA_LISTEN_ADDR (default 127.0.0.1:8080)
#   sudo ISOLATED=1 ./scripts/serve.sh   serve inside a private network namespace whose
#                                        uplink leads nowhere: guests cannot reach any other
#                                        machine. Talk to it with
#                                        `ip netns exec manta-demo curl ...`.
#
# Every MANTA_* variable the server reads passes through (see README.md). Ctrl-C (SIGINT)
# destroys every sandbox, then exits.
set -euo pipefail

export MANTA_LOG_TAG=serve
# shellcheck source=guest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../guest/lib.sh"
cd "$MANTA_REPO_ROOT"

ISOLATED="${ISOLATED:-0}"
NETNS="${NETNS:-manta-demo}"
BUILD_PROFILE="${BUILD_PROFILE:-release}"
AUTO_INSTALL_DEPS="${AUTO_INSTALL_DEPS:-1}"
log "settings:"
for knob in ISOLATED NETNS BUILD_PROFILE AUTO_INSTALL_DEPS; do
    show_knob "$knob"
done
require_root "manta-server (tap devices, iptables, VMs)"

log "step 1/3: guest artifacts and Firecracker (skipped where already built)"
"$MANTA_REPO_ROOT/guest/build-all.sh"

log "step 2/3: host tools and the manta binaries"
ensure_tools iptables:iptables iproute2:ip qemu-system-x86:qemu-system-x86_64
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) first"
cargo build --profile "$BUILD_PROFILE" --bins
bin="$MANTA_REPO_ROOT/target/$BUILD_PROFILE/manta-server"

log "step 3/3: starting manta-server"
if [[ $ISOLATED != 1 ]]; then
    exec "$bin"
fi

# shellcheck source=scripts/isolated-netns.sh
source "$MANTA_REPO_ROOT/scripts/isolated-netns.sh"
sink="$NETNS-sink"
for ns in "$NETNS" "$sink"; do
    if ip netns list | grep -qw -- "$ns"; then
        die "network namespace $ns already exists (another demo running?); remove it with 'ip netns del $ns' or pick another name with NETNS=..."
    fi
done
trap 'isolated_netns_down "$NETNS" "$sink"' EXIT
isolated_netns_up "$NETNS" "$sink"
log "isolated: namespace $NETNS, uplink up0 leads to the empty namespace $sink"
log "try: ip netns exec $NETNS curl -s -X POST localhost:8080/create"
MANTA_HOST_IFACE=up0 ip netns exec "$NETNS" "$bin" &
server=$!
trap 'kill -INT $server 2>/dev/null || true' INT TERM
wait "$server" || true
wait "$server" 2>/dev/null || true
