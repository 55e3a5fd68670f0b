# shellcheck shell=bash
# Sourced, never executed: the isolated network namespace that Manta's demo and benchmark
# servers run in. The same recipe as tests/common/mod.rs (TestNet).
#
# The namespace's uplink `up0` (192.0.2.1/24, default route via it) is one end of a veth pair
# whose other end sits alone in a second, empty "sink" namespace: guest traffic NATed out of
# `up0` has nowhere to go, so nothing a guest sends can leave the machine.

# isolated_netns_up NETNS SINK: creates both namespaces and the veth pair.
isolated_netns_up() {
    local ns="$1" sink="$2"
    ip netns add "$ns"
    ip netns add "$sink"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add up0 type veth peer name sink0 netns "$sink"
    ip -n "$ns" addr add 192.0.2.1/24 dev up0
    ip -n "$ns" link set up0 up
    ip -n "$sink" link set sink0 up
    ip -n "$ns" route add default via 192.0.2.254 dev up0
}

# isolated_netns_down NETNS SINK: removes both namespaces (fine if they are gone already).
isolated_netns_down() {
    ip netns del "$1" 2>/dev/null || true
    ip netns del "$2" 2>/dev/null || true
}
