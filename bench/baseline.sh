#!/usr/bin/env bash
# Baseline for manta-bench: the same guest booted and reached by hand, with no Manta code.
#
# Inside a private network namespace that holds only lo and one tap (no uplink, no route, so
# nothing a guest sends can leave the machine), each of BOOTS boots:
#   1. copies rootfs.ext4 (cp --sparse=always)                 -> phase "rootfs"
#   2. makes the tap with `ip tuntap` and a static ARP entry   -> phase "network"
#   3. starts QEMU -M microvm with the arguments Manta uses and waits until an OpenSSH
#      ControlMaster has logged in                             -> "create" (the hand boot)
#   4. runs `true` EXECS times through that master             -> "exec" (raw SSH exec)
#   5. closes the master, kills QEMU, removes tap and disk     -> "destroy"
# The clock for the hand boot starts just before QEMU is started, as Manta's boot_to_ssh does
# after its own rootfs and network steps.
#
# The QEMU arguments (seccomp and -runas included), kernel command line, tap flags, addresses
# and MAC mirror what Manta uses for its first sandbox slot (src/vmm/qemu.rs args(),
# src/network/mod.rs Slot); keep them in step. bench/run-stage.sh checks that the command lines
# match.
#
# stdout: one JSON document in manta-bench's shape, with kind "baseline". stderr: progress.
# Exit status 1 if any boot or exec failed. Needs root.
set -euo pipefail
export LC_ALL=C # EPOCHREALTIME must use '.' as its decimal separator.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO_ROOT/bench/baseline.sh"

ARTIFACTS_DIR="${ARTIFACTS_DIR:-$REPO_ROOT/guest-artifacts}"
QEMU="${QEMU:-qemu-system-x86_64}"
ACCEL="${ACCEL:-auto}"
VCPUS="${VCPUS:-1}"
MEM_MIB="${MEM_MIB:-256}"
BOOTS="${BOOTS:-10}"
EXECS="${EXECS:-20}"
WARMUP="${WARMUP:-1}"
BOOT_TIMEOUT_S="${BOOT_TIMEOUT_S:-60}"
# As MANTA_VMM_USER: QEMU drops to this user after opening its files; "root" keeps root.
VMM_USER="${VMM_USER:-nobody}"
WORK_PARENT="${WORK_PARENT:-${TMPDIR:-/tmp}}"
KEEP_TMP="${KEEP_TMP:-0}"

# As in Manta's guest::wait_ready: one TCP connect attempt may take 150 ms, then 10 ms pause.
PROBE_TIMEOUT_S=0.15
RETRY_PAUSE_S=0.01
# Manta's first slot (index 1): 172.31.0.4/30, host .5 on the tap, guest .6.
TAP=mt1
HOST_IP=172.31.0.5
GUEST_IP=172.31.0.6
NETMASK=255.255.255.252
GUEST_MAC=06:00:ac:1f:00:01
BOOT_ARGS="console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/sbin/manta-init"
BOOT_ARGS+=" ip=$GUEST_IP::$HOST_IP:$NETMASK::eth0:off"

log() { printf '[baseline] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 2
}

# ---------------------------------------------------------------------------------------------
# Outer part: checks, the namespace, and cleanup. The measuring part runs inside the namespace
# as a second invocation of this script, so that no `ip netns exec` sits inside a timed step.

outer() {
    log "settings:"
    for knob in ARTIFACTS_DIR QEMU ACCEL VCPUS MEM_MIB BOOTS EXECS WARMUP BOOT_TIMEOUT_S \
        VMM_USER WORK_PARENT KEEP_TMP; do
        log "  $knob=${!knob}"
    done
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespace, tap device)"
    for tool in ip "$QEMU" ssh cp jq timeout git; do
        command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
    done
    for artifact in vmlinux rootfs.ext4 sandbox_key ssh_host_ed25519_key.pub; do
        [[ -f $ARTIFACTS_DIR/$artifact ]] ||
            die "missing $ARTIFACTS_DIR/$artifact (build it with guest/build-all.sh)"
    done
    for n in VCPUS MEM_MIB BOOTS EXECS WARMUP BOOT_TIMEOUT_S; do
        [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a whole number (got '${!n}')"
    done
    ((BOOTS >= 1)) || die "BOOTS must be at least 1"
    [[ $VMM_USER == root ]] || id "$VMM_USER" >/dev/null 2>&1 ||
        die "VMM_USER=$VMM_USER: no such user (use root to keep QEMU as root)"

    NETNS="manta-baseline-$$"
    WORK="$(mktemp -d "$WORK_PARENT/manta-baseline.XXXXXX")"
    export NETNS WORK
    trap outer_cleanup EXIT
    trap 'exit 130' INT TERM

    ip netns add "$NETNS" || die "cannot create network namespace $NETNS"
    ip -n "$NETNS" link set lo up
    log "network namespace $NETNS (lo only; the tap is made per boot), work dir $WORK"

    # In the background so that a signal to this script is handled at once (bash runs traps
    # only after a foreground child ends); the trap passes it on to the inner part.
    local rc=0
    ip netns exec "$NETNS" env BASELINE_INNER=1 bash "$SELF" &
    inner_pid=$!
    wait "$inner_pid" || rc=$?
    inner_pid=""
    exit "$rc"
}

inner_pid=""

outer_cleanup() {
    local rc=$?
    if [[ -n $inner_pid ]]; then
        kill -TERM "$inner_pid" 2>/dev/null || true
        wait "$inner_pid" 2>/dev/null || true
    fi
    # The inner part cleans up after itself; this catches what a killed inner part left: any
    # process whose command line names our private work dir (QEMU, the SSH master) is ours.
    local cmdline pid
    for cmdline in /proc/[0-9]*/cmdline; do
        pid="${cmdline#/proc/}"
        pid="${pid%/cmdline}"
        [[ $pid != "$$" ]] || continue
        if tr '\0' ' ' 2>/dev/null <"$cmdline" | grep -qF "$WORK/"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    ip netns del "$NETNS" 2>/dev/null || true
    if [[ $KEEP_TMP == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}

# ---------------------------------------------------------------------------------------------
# Inner part: runs inside the namespace.

qemu_pid=""
inner_cleanup() {
    local rc=$?
    close_master
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill -9 "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    ip link del "$TAP" 2>/dev/null || true
    exit "$rc"
}

# Times are microseconds since the epoch, read inline as ${EPOCHREALTIME/./} so that no timed
# step pays for a fork just to read the clock.

# The median of microsecond samples, in ms (for the progress line only).
median_ms() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {printf "%.1f", v[int((NR + 1) / 2)] / 1000}'; }

ssh_common() {
    ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -i "$WORK/sandbox_key" \
        -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$WORK/known_hosts" \
        -o GlobalKnownHostsFile=/dev/null -o HostKeyAlgorithms=ssh-ed25519 \
        -o LogLevel=ERROR -o ControlPath="$WORK/ssh-control" "$@"
}

# Opens the ControlMaster; returns once it has logged in (-f backgrounds it after auth). Its
# command line names $WORK, which lets the outer cleanup recognise it as ours.
open_master() {
    ssh_common -o ControlMaster=yes -o ConnectTimeout=10 -o ServerAliveInterval=1 \
        -o ServerAliveCountMax=3 -fN "root@$GUEST_IP" >/dev/null 2>&1
}

close_master() { ssh_common -O exit "root@$GUEST_IP" >/dev/null 2>&1 || true; }

# Returns once TCP port 22 of the guest accepts a connection, or fails after one attempt.
probe_ssh_port() {
    timeout "$PROBE_TIMEOUT_S" bash -c "exec 3<>/dev/tcp/$GUEST_IP/22" 2>/dev/null
}

inner() {
    trap inner_cleanup EXIT
    trap 'exit 130' INT TERM

    local accel cpu vmm
    if [[ $ACCEL == auto ]]; then
        # Manta's rule: KVM when the CPU has vmx/svm and /dev/kvm exists.
        if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -e /dev/kvm ]]; then ACCEL=kvm; else ACCEL=tcg; fi
    fi
    case "$ACCEL" in
        kvm) accel=kvm cpu=host vmm=qemu-kvm ;;
        tcg) accel=tcg cpu=max vmm=qemu-tcg ;;
        *) die "ACCEL must be auto, kvm or tcg (got '$ACCEL')" ;;
    esac

    printf '%s %s\n' "$GUEST_IP" "$(cut -d' ' -f1,2 "$ARTIFACTS_DIR/ssh_host_ed25519_key.pub")" \
        >"$WORK/known_hosts"
    install -m 600 "$ARTIFACTS_DIR/sandbox_key" "$WORK/sandbox_key"

    # Manta's hardening: QEMU's seccomp filter, and with a VMM user, -runas (which needs set*id
    # left allowed in the filter).
    local elevate=allow
    local -a runas=(-runas "$VMM_USER")
    if [[ $VMM_USER == root ]]; then elevate=deny runas=(); fi

    local disk="$WORK/rootfs.ext4"
    # shellcheck disable=SC2054 # QEMU option values are comma-separated lists.
    local -a qemu_args=(
        -sandbox "on,obsolete=deny,elevateprivileges=$elevate,spawn=deny,resourcecontrol=deny"
        "${runas[@]}"
        -name manta-baseline
        -M microvm,x-option-roms=off,acpi=off
        -accel "$accel" -cpu "$cpu" -smp "$VCPUS" -m "${MEM_MIB}M"
        -nodefaults -no-user-config -display none -no-reboot
        -serial "file:$WORK/console.log"
        -kernel "$ARTIFACTS_DIR/vmlinux"
        -append "$BOOT_ARGS"
        -drive "id=root,file=$disk,format=raw,if=none"
        -device virtio-blk-device,drive=root
        -netdev "tap,id=net0,ifname=$TAP,script=no,downscript=no"
        -device "virtio-net-device,netdev=net0,mac=$GUEST_MAC"
    )
    log "accelerator $accel; $WARMUP warm-up boot(s), then $BOOTS boots x $EXECS execs of 'true'"

    local -a boot_us=() exec_us=() destroy_us=() cycle_us=() rootfs_us=() network_us=()
    local -a total_us=() errors=()
    local ok=0 failed=0 warmup_failed=0 measured_started=""
    local total=$((WARMUP + BOOTS)) k
    for ((k = 0; k < total; k++)); do
        local warm=0 label="boot $((k - WARMUP + 1))/$BOOTS"
        if ((k < WARMUP)); then warm=1 label="warm-up boot $((k + 1))/$WARMUP"; fi
        if ((k == WARMUP)); then measured_started=${EPOCHREALTIME/./}; fi
        local error="" t0 cycle_start r_us n_us b_us d_us c_us j
        local -a these_execs=()

        cycle_start=${EPOCHREALTIME/./}
        t0=${EPOCHREALTIME/./}
        cp --sparse=always "$ARTIFACTS_DIR/rootfs.ext4" "$disk"
        r_us=$((${EPOCHREALTIME/./} - t0))

        t0=${EPOCHREALTIME/./}
        ip tuntap add dev "$TAP" mode tap vnet_hdr
        ip addr add "$HOST_IP/30" dev "$TAP"
        ip link set "$TAP" up
        # Manta adds the same permanent ARP entry, so neither waits on ARP during the boot.
        ip neigh replace "$GUEST_IP" lladdr "$GUEST_MAC" dev "$TAP" nud permanent
        n_us=$((${EPOCHREALTIME/./} - t0))

        : >"$WORK/console.log"
        t0=${EPOCHREALTIME/./}
        "$QEMU" "${qemu_args[@]}" >"$WORK/vmm.log" 2>&1 &
        qemu_pid=$!
        local deadline=$((t0 + BOOT_TIMEOUT_S * 1000000))
        while :; do
            if ! kill -0 "$qemu_pid" 2>/dev/null; then
                error="QEMU exited before SSH answered: $(tail -c 300 "$WORK/vmm.log" | tr '\n' ' ')"
                break
            fi
            if ((${EPOCHREALTIME/./} >= deadline)); then
                error="no SSH login within ${BOOT_TIMEOUT_S} s; console: $(tail -c 300 "$WORK/console.log" | tr '\n' ' ')"
                break
            fi
            if probe_ssh_port && open_master; then
                break
            fi
            sleep "$RETRY_PAUSE_S"
        done
        b_us=$((${EPOCHREALTIME/./} - t0))

        if [[ -z $error ]]; then
            for ((j = 0; j < EXECS; j++)); do
                t0=${EPOCHREALTIME/./}
                if ! ssh_common -o ControlMaster=no "root@$GUEST_IP" true; then
                    error="exec $((j + 1)) of 'true' over the ControlMaster failed"
                    break
                fi
                these_execs+=("$((${EPOCHREALTIME/./} - t0))")
            done
        fi

        t0=${EPOCHREALTIME/./}
        close_master
        kill -9 "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
        ip link del "$TAP"
        rm -f "$disk"
        d_us=$((${EPOCHREALTIME/./} - t0))
        c_us=$((${EPOCHREALTIME/./} - cycle_start))
        qemu_pid=""

        if [[ -n $error ]]; then
            errors+=("$label: $error")
            if ((warm)); then warmup_failed=$((warmup_failed + 1)); else failed=$((failed + 1)); fi
            log "[$label] FAILED: $error"
            continue
        fi
        log "[$label] copy $((r_us / 1000)) ms, tap $((n_us / 1000)) ms, boot to SSH" \
            "$((b_us / 1000)) ms, exec median $(median_ms "${these_execs[@]}") ms of" \
            "${#these_execs[@]}, destroy $((d_us / 1000)) ms"
        if ((warm)); then continue; fi
        ok=$((ok + 1))
        boot_us+=("$b_us")
        rootfs_us+=("$r_us")
        network_us+=("$n_us")
        total_us+=("$((r_us + n_us + b_us))")
        exec_us+=("${these_execs[@]}")
        destroy_us+=("$d_us")
        cycle_us+=("$c_us")
    done
    local now=${EPOCHREALTIME/./}
    local wall_us=$((now - ${measured_started:-$now}))

    report "$vmm" "$accel" "$wall_us" "$ok" "$failed" "$warmup_failed" \
        "$(json_us "${boot_us[@]}")" "$(json_us "${exec_us[@]}")" \
        "$(json_us "${destroy_us[@]}")" "$(json_us "${cycle_us[@]}")" \
        "$(json_us "${rootfs_us[@]}")" "$(json_us "${network_us[@]}")" \
        "$(json_us "${total_us[@]}")" \
        "$(json_strings "${errors[@]}")" "$(json_strings "${qemu_args[@]}")"
    ((failed + warmup_failed == 0))
}

# Microsecond integers -> a JSON array of milliseconds rounded to 10 µs.
json_us() {
    if (($#)); then printf '%s\n' "$@" | jq -s 'map(. / 1000 * 100 | round / 100)'; else echo '[]'; fi
}

# Strings (without newlines) -> a JSON array. (jq 1.6 reads "--args -name" as an option.)
json_strings() {
    if (($#)); then printf '%s\n' "$@" | jq -R . | jq -s .; else echo '[]'; fi
}

# Writes the document. The percentile is the nearest rank, computed in integers exactly as
# manta-bench does (src/bench/stats.rs), so the two documents are comparable figure by figure.
report() {
    local vmm=$1 accel=$2 wall_us=$3 ok=$4 failed=$5 warmup_failed=$6
    local cores kernel kvm cpu_model mem_kib rev dirty qemu_version
    cores="$(nproc)"
    kernel="$(uname -r)"
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -e /dev/kvm ]]; then
        kvm="$(grep -owE 'vmx|svm' /proc/cpuinfo | head -1)"
    elif [[ -e /dev/kvm && -d /sys/module/kvm_pvm ]]; then
        kvm=pvm
    else
        kvm=none
    fi
    cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    mem_kib="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    rev="$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    dirty=null
    if [[ $rev != unknown ]]; then
        if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
            dirty=true
        else
            dirty=false
        fi
    fi
    qemu_version="$("$QEMU" --version | head -1)"

    jq -n \
        --arg timestamp "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        --arg rev "$rev" --argjson dirty "$dirty" --arg vmm "$vmm" \
        --argjson cores "$cores" --arg kernel "$kernel" --arg kvm "$kvm" \
        --arg cpu_model "$cpu_model" --argjson mem_mib "$((mem_kib / 1024))" \
        --arg accel "$accel" --arg qemu_version "$qemu_version" \
        --argjson wall_s "$(jq -n "$wall_us / 1000000 * 1000 | round / 1000")" \
        --argjson ok "$ok" --argjson failed "$failed" --argjson warmup_failed "$warmup_failed" \
        --argjson create "$7" --argjson exec "$8" --argjson destroy "$9" \
        --argjson cycle "${10}" --argjson rootfs "${11}" --argjson network "${12}" \
        --argjson total "${13}" --argjson errors "${14}" --argjson qemu_args "${15}" \
        --argjson boots "$BOOTS" --argjson execs "$EXECS" --argjson warmup "$WARMUP" \
        --argjson vcpus "$VCPUS" --argjson mem "$MEM_MIB" --arg vmm_user "$VMM_USER" '
        def rank($sorted; $p):
            ($sorted | length) as $n | (($p * $n + 99) / 100 | floor) as $r
            | $sorted[(if $r < 1 then 1 else $r end) - 1];
        def summary:
            if length == 0 then null
            else sort as $s
                | { n: ($s | length), min: $s[0], p50: rank($s; 50), p95: rank($s; 95),
                    p99: rank($s; 99), max: $s[-1],
                    mean: (($s | add) / ($s | length) * 100 | round / 100) }
            end;
        {
            schema: "manta-bench/1",
            kind: "baseline",
            timestamp: $timestamp,
            git_rev: $rev,
            git_dirty: $dirty,
            vmm: $vmm,
            host: { cores: $cores, kernel: $kernel, kvm: $kvm, cpu_model: $cpu_model,
                    mem_total_mib: $mem_mib },
            flags: { boots: $boots, execs_per_boot: $execs, warmup: $warmup, cmd: "true",
                     concurrency: 1, vcpus: $vcpus, mem_mib: $mem, accel: $accel,
                     vmm_user: $vmm_user,
                     qemu: $qemu_version, qemu_args: $qemu_args,
                     create_is: "QEMU start until an OpenSSH ControlMaster has logged in",
                     exec_is: "ssh -o ControlMaster=no ... true over that master" },
            wall_s: $wall_s,
            iterations: { requested: $boots, ok: $ok, failed: $failed, warmup: $warmup,
                          warmup_failed: $warmup_failed },
            latency_ms: { create: ($create | summary), exec: ($exec | summary),
                          destroy: ($destroy | summary), cycle: ($cycle | summary),
                          create_overhead: null },
            create_phases_ms: { rootfs: ($rootfs | summary), network: ($network | summary),
                                vmm_start: null, boot_to_ssh: ($create | summary),
                                total: ($total | summary) },
            errors: { count: ($errors | length), first: $errors[:5] },
            server_memory: null,
            interrupted: false,
            samples_ms: { create: $create, exec: $exec, destroy: $destroy, cycle: $cycle,
                          create_overhead: [] }
        }'
}

if [[ ${BASELINE_INNER:-0} == 1 ]]; then
    inner
else
    outer
fi
