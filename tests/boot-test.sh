#!/usr/bin/env bash
# Boot test for the Manta guest artifacts (vmlinux + rootfs.ext4 + keys).
#
# Boots a copy of rootfs.ext4 under QEMU `-M microvm` inside a private network
# namespace (tap only, no route anywhere else), reaches the guest over SSH with
# the sandbox key and a pinned host key, runs a few commands, kills the VMM
# with SIGKILL, boots the same disk again to prove it survives an unclean
# power-off, then powers the guest off from inside. Needs root.
#
# Last line of output: "N passed, N failed".
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARTIFACTS_DIR="${ARTIFACTS_DIR:-$REPO_ROOT/guest-artifacts}"
case "$ARTIFACTS_DIR" in /*) ;; *) ARTIFACTS_DIR="$REPO_ROOT/$ARTIFACTS_DIR" ;; esac
QEMU="${QEMU:-qemu-system-x86_64}"
ACCEL="${ACCEL:-auto}"
MEM_MB="${MEM_MB:-256}"
VCPUS="${VCPUS:-1}"
BOOT_TIMEOUT_S="${BOOT_TIMEOUT_S:-60}"
SSHD_READY_MAX_MS="${SSHD_READY_MAX_MS:-1000}"
TAP_NAME="${TAP_NAME:-mtboot0}"
HOST_IP="${HOST_IP:-172.31.255.1}"
GUEST_IP="${GUEST_IP:-172.31.255.2}"
NETMASK="${NETMASK:-255.255.255.252}"
KEEP_TMP="${KEEP_TMP:-0}"

log() { printf '[boot-test] %s\n' "$*" >&2; }

log "settings:"
for knob in ARTIFACTS_DIR QEMU ACCEL MEM_MB VCPUS BOOT_TIMEOUT_S SSHD_READY_MAX_MS TAP_NAME HOST_IP GUEST_IP \
    NETMASK KEEP_TMP; do
    log "  $knob=${!knob}"
done

passed=0
failed=0
summary() { echo "$passed passed, $failed failed"; }

# A setup problem: nothing was tested, so it counts as one failed check.
setup_error() {
    log "error: $*"
    failed=$((failed + 1))
    summary
    exit 1
}

[[ $(id -u) -eq 0 ]] || setup_error "needs root (network namespaces, tap devices)"
for tool in ip "$QEMU" ssh ssh-keygen cp; do
    command -v "$tool" >/dev/null 2>&1 || setup_error "missing tool: $tool"
done
for artifact in vmlinux rootfs.ext4 sandbox_key ssh_host_ed25519_key.pub; do
    [[ -f $ARTIFACTS_DIR/$artifact ]] ||
        setup_error "missing $ARTIFACTS_DIR/$artifact (run guest/build-all.sh first)"
done

if [[ $ACCEL == auto ]]; then
    if grep -qE '\b(vmx|svm)\b' /proc/cpuinfo && [[ -w /dev/kvm ]]; then ACCEL=kvm; else ACCEL=tcg; fi
fi
case "$ACCEL" in
    kvm) cpu_args=(-accel kvm -cpu host) ;;
    tcg) cpu_args=(-accel tcg -cpu max) ;;
    *) setup_error "ACCEL must be auto, kvm or tcg (got '$ACCEL')" ;;
esac
log "accelerator: $ACCEL"

# ---------------------------------------------------------------------------
# Private resources, all removed by the trap.

NETNS="manta-boot-$$"
TMP_DIR="$(mktemp -d /tmp/manta-boot-test.XXXXXX)"
DISK="$TMP_DIR/rootfs.ext4"
qemu_pid=""
serial_log=""
netns_created=0

cleanup() {
    local rc=$?
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill -9 "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    # Deleting the namespace also deletes the tap inside it.
    [[ $netns_created == 0 ]] || ip netns del "$NETNS" 2>/dev/null || true
    if [[ $KEEP_TMP == 1 ]]; then
        log "kept $TMP_DIR"
    else
        rm -rf "$TMP_DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() { ip netns exec "$NETNS" "$@"; }

ip netns add "$NETNS" || setup_error "cannot create network namespace $NETNS"
netns_created=1
in_ns ip link set lo up
in_ns ip tuntap add dev "$TAP_NAME" mode tap || setup_error "cannot create tap $TAP_NAME in $NETNS"
in_ns ip addr add "$HOST_IP/30" dev "$TAP_NAME"
in_ns ip link set "$TAP_NAME" up
# Retry ARP every 100 ms so the first SSH attempt after boot is not delayed.
in_ns sh -c "echo 100 >/proc/sys/net/ipv4/neigh/$TAP_NAME/retrans_time_ms" || true
log "network namespace $NETNS: $TAP_NAME $HOST_IP/30, no other interface, no default route"

log "copying rootfs.ext4 (sparse)"
cp --sparse=always "$ARTIFACTS_DIR/rootfs.ext4" "$DISK"

# Host-key pinning: known_hosts holds only the key baked into the image.
printf '%s %s\n' "$GUEST_IP" "$(cut -d' ' -f1,2 "$ARTIFACTS_DIR/ssh_host_ed25519_key.pub")" \
    >"$TMP_DIR/known_hosts"
cp "$ARTIFACTS_DIR/sandbox_key" "$TMP_DIR/sandbox_key"
chmod 600 "$TMP_DIR/sandbox_key"

ssh_opts=(-F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o ConnectTimeout=3
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$TMP_DIR/known_hosts"
    -o GlobalKnownHostsFile=/dev/null -o HostKeyAlgorithms=ssh-ed25519 -o LogLevel=ERROR
    -o ServerAliveInterval=5 -o ServerAliveCountMax=3)

# guest_ssh [ssh options...] -- command: run a command in the guest as root.
guest_ssh() {
    local extra=()
    while [[ $# -gt 0 && $1 != -- ]]; do
        extra+=("$1")
        shift
    done
    shift
    # ssh keeps the first value of an option, so the caller's come first.
    in_ns ssh "${extra[@]}" "${ssh_opts[@]}" -i "$TMP_DIR/sandbox_key" "root@$GUEST_IP" "$@" </dev/null
}

pass() {
    passed=$((passed + 1))
    log "PASS $*"
}
fail() {
    failed=$((failed + 1))
    log "FAIL $*"
}

show_serial_tail() {
    if [[ -n $serial_log && -f $serial_log ]]; then
        log "last lines of the serial console ($serial_log):"
        tail -n 40 "$serial_log" >&2
    fi
}

fatal() {
    fail "$*"
    show_serial_tail
    summary
    exit 1
}

now() { date +%s.%N; }
elapsed_ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", (b - a) * 1000 }'; }

# boot NAME: start QEMU on $DISK inside the namespace, wait until SSH answers.
boot() {
    local name="$1" deadline ready_seen="" t_ready_line t_ssh line
    serial_log="$TMP_DIR/serial-$name.log"
    : >"$serial_log"
    local cmdline="console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/sbin/manta-init"
    cmdline+=" ip=$GUEST_IP::$HOST_IP:$NETMASK::eth0:off"
    log "boot '$name': starting QEMU"
    t_qemu=$(now)
    # Started directly (not through a shell function) so that $! is QEMU itself:
    # `ip netns exec` replaces itself with QEMU.
    ip netns exec "$NETNS" "$QEMU" -M microvm,x-option-roms=off,acpi=off "${cpu_args[@]}" \
        -nodefaults -no-user-config -nographic -monitor none -no-reboot \
        -m "$MEM_MB" -smp "$VCPUS" \
        -kernel "$ARTIFACTS_DIR/vmlinux" -append "$cmdline" \
        -drive id=root,file="$DISK",format=raw,if=none \
        -device virtio-blk-device,drive=root \
        -netdev tap,id=net0,ifname="$TAP_NAME",script=no,downscript=no \
        -device virtio-net-device,netdev=net0 \
        -serial file:"$serial_log" \
        </dev/null >"$TMP_DIR/qemu-$name.out" 2>&1 &
    qemu_pid=$!
    for _ in $(seq 50); do
        [[ $(readlink "/proc/$qemu_pid/exe" 2>/dev/null) == *qemu* ]] && break
        sleep 0.02
    done

    deadline=$(($(date +%s) + BOOT_TIMEOUT_S))
    while :; do
        if ! kill -0 "$qemu_pid" 2>/dev/null; then
            cat "$TMP_DIR/qemu-$name.out" >&2 || true
            fatal "boot '$name': QEMU exited early"
        fi
        if [[ -z $ready_seen ]] && grep -q 'manta-init: sshd ready' "$serial_log"; then
            ready_seen=1
            t_ready_line=$(now)
        fi
        if [[ -n $ready_seen ]] && guest_ssh -o ConnectTimeout=2 -- true 2>/dev/null; then
            t_ssh=$(now)
            break
        fi
        (($(date +%s) < deadline)) || fatal "boot '$name': SSH not ready within ${BOOT_TIMEOUT_S} s"
        sleep 0.05
    done

    log "boot '$name': QEMU start -> sshd-ready line on console: $(elapsed_ms "$t_qemu" "$t_ready_line") ms"
    log "boot '$name': QEMU start -> first successful SSH command: $(elapsed_ms "$t_qemu" "$t_ssh") ms"

    # Guest clock: the kernel's timestamp when it starts init ("Run ... as init
    # process", printk time) and the uptime manta-init logs once sshd listens.
    line="$(grep -m1 'manta-init: sshd ready' "$serial_log" | tr -d '\r')"
    handover="$(sed -n 's/^\[ *\([0-9.]*\)\] Run .* as init process.*/\1/p' "$serial_log" | sed -n 1p)"
    log "boot '$name': guest says: ${line#*manta-init: }"
    if [[ $line =~ uptime\ ([0-9.]+)s ]] && [[ -n $handover ]]; then
        local up="${BASH_REMATCH[1]}" handover_ms
        handover_ms=$(awk -v a="$handover" -v b="$up" 'BEGIN { printf "%d", (b - a) * 1000 }')
        log "boot '$name': kernel start -> init: ${handover} s; kernel start -> sshd ready: ${up} s"
        if ((handover_ms <= SSHD_READY_MAX_MS)); then
            pass "boot '$name': sshd listening ${handover_ms} ms after the kernel started init (<= $SSHD_READY_MAX_MS ms)"
        else
            fail "boot '$name': sshd listening only ${handover_ms} ms after the kernel started init (> $SSHD_READY_MAX_MS ms)"
        fi
    else
        fail "boot '$name': no kernel 'Run ... as init process' line or no parsable 'sshd ready' line"
    fi
    pass "boot '$name': SSH answers with the pinned host key"
}

# check NAME EXPECTED -- command: run a guest command, compare its stdout.
check_output() {
    local name="$1" expected="$2" got
    shift 3
    if got="$(guest_ssh -- "$@" 2>"$TMP_DIR/stderr")" && [[ $got == "$expected" ]]; then
        pass "$name"
    else
        fail "$name: expected '$expected', got '$got' (stderr: $(head -c 300 "$TMP_DIR/stderr"))"
    fi
}

# ---------------------------------------------------------------------------
# First boot

boot first

kernel_release="$(guest_ssh -- uname -r 2>/dev/null || true)"
if [[ -n $kernel_release ]]; then
    pass "uname -r: $kernel_release"
else
    fail "uname -r printed nothing"
fi
check_output "echo hello" hello -- echo hello
check_output "/etc/manta-guest has a version line" 1 -- \
    'sed -n "s/^MANTA_GUEST_VERSION=//p" /etc/manta-guest'
# shellcheck disable=SC2016 # the awk program runs in the guest
check_output "root filesystem is mounted read-write" rw -- \
    'awk '\''$2 == "/" { split($4, o, ","); print o[1] }'\'' /proc/mounts'
check_output "eth0 got its address from ip=" "$GUEST_IP/30" -- \
    "ip -o -4 addr show dev eth0 | awk '{print \$4}'"
check_output "hostname is set by manta-init" manta-sandbox -- hostname
check_output "python3 runs" 42 -- "python3 -c 'print(6 * 7)'"

# Exit status, stdout and stderr come back separately.
set +e
out="$(guest_ssh -- 'echo to-stdout; echo to-stderr >&2; exit 7' 2>"$TMP_DIR/stderr")"
rc=$?
set -e
err="$(cat "$TMP_DIR/stderr")"
if [[ $rc == 7 && $out == to-stdout && $err == to-stderr ]]; then
    pass "exec returns exit status 7, stdout and stderr separately"
else
    fail "exec separation: rc=$rc stdout='$out' stderr='$err'"
fi

# Only the sandbox key is accepted.
ssh-keygen -q -t ed25519 -N '' -f "$TMP_DIR/other_key"
if in_ns ssh "${ssh_opts[@]}" -i "$TMP_DIR/other_key" "root@$GUEST_IP" true </dev/null 2>/dev/null; then
    fail "a key other than sandbox_key was accepted"
else
    pass "a key other than sandbox_key is rejected"
fi

# Host-key pinning is enforced: a known_hosts with another key refuses the guest.
ssh-keygen -q -t ed25519 -N '' -f "$TMP_DIR/fake_host_key"
printf '%s %s\n' "$GUEST_IP" "$(cut -d' ' -f1,2 "$TMP_DIR/fake_host_key.pub")" >"$TMP_DIR/wrong_known_hosts"
if guest_ssh -o UserKnownHostsFile="$TMP_DIR/wrong_known_hosts" -- true 2>/dev/null; then
    fail "SSH connected although known_hosts pins a different host key"
else
    pass "SSH refuses a guest whose host key does not match the pin"
fi

# PID 1 reaps orphans: leave a short-lived orphan behind, then look for zombies.
guest_ssh -- 'sh -c "sleep 0.3 &" ; true' >/dev/null 2>&1 || true
sleep 2
check_output "no zombie processes after an orphan exits" 0 -- \
    "ps -eo stat= | grep -c '^Z' || true"

# Data written and synced before the crash must be there after it.
check_output "write a marker file and sync" ok -- \
    'echo survived >/root/manta-marker && sync && echo ok'

log "killing QEMU with SIGKILL (unclean power-off)"
kill -9 "$qemu_pid"
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=""

# ---------------------------------------------------------------------------
# Second boot of the same disk

boot after-kill
check_output "marker file survived the unclean power-off" survived -- cat /root/manta-marker
check_output "echo hello after the unclean power-off" hello -- echo hello
if grep -qE 'EXT4-fs \(vda\): (recovery complete|orphan cleanup)' "$serial_log"; then
    log "ext4 replayed its journal on the second boot"
fi

# Orderly power-off from inside: QEMU (started with -no-reboot) must exit.
log "powering off from inside the guest"
guest_ssh -- poweroff >/dev/null 2>&1 || true
deadline=$(($(date +%s) + 30))
while kill -0 "$qemu_pid" 2>/dev/null && (($(date +%s) < deadline)); do sleep 0.2; done
if kill -0 "$qemu_pid" 2>/dev/null; then
    fail "guest poweroff: QEMU still running after 30 s"
    show_serial_tail
else
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
    pass "guest poweroff makes the VMM exit"
fi

((failed == 0)) || show_serial_tail
summary
((failed == 0))
