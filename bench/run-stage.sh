#!/usr/bin/env bash
# One stage's numbers in one command:
#   bench/run-stage.sh STAGE_NAME
# builds release, snapshots the guest artifacts, starts manta-server inside a private network
# namespace, and writes to RESULTS_DIR:
#   STAGE.json           manta-bench, ITERATIONS iterations, concurrency 1, --cmd "echo hello"
#   STAGE-true.json      manta-bench, --cmd true, EXEC_PER_SANDBOX execs in each of
#                        EXEC_ITERATIONS sandboxes (the exec ratio's Manta side)
#   STAGE-c4.json        manta-bench --concurrency 4 --iterations 40
#   baseline.json        bench/baseline.sh: the same guest booted and reached by hand
#   STAGE-compare.txt    provenance, the QEMU command line check, and manta-bench compare
# Every manta-bench run samples the server's memory (--server-pid). Everything it creates
# (namespaces, server, VMs, work dir) is removed on exit, also on failure or Ctrl-C.
#
# Server settings: MANTA_* variables in the caller's environment are passed to the server (for
# instance MANTA_DISK_POOL=0 for creates that copy the disk), except those that place it, which
# this script sets. MANTA_VMM_USER is also given to the baseline, so both run QEMU alike.
#
# Network safety: the server's uplink up0 is a veth whose peer sits alone in a "sink"
# namespace, so guest traffic NATed out of up0 goes nowhere; the bench talks to the server on
# the namespace's loopback; the baseline's namespace has no uplink at all.
set -euo pipefail
export LC_ALL=C

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/isolated-netns.sh
source "$REPO_ROOT/scripts/isolated-netns.sh"
STAGE="${1:-}"

ITERATIONS="${ITERATIONS:-50}"
WARMUP="${WARMUP:-1}"
EXEC_ITERATIONS="${EXEC_ITERATIONS:-10}"
EXEC_PER_SANDBOX="${EXEC_PER_SANDBOX:-20}"
C4_CONCURRENCY="${C4_CONCURRENCY:-4}"
C4_ITERATIONS="${C4_ITERATIONS:-40}"
BASELINE_BOOTS="${BASELINE_BOOTS:-10}"
BASELINE_EXECS="${BASELINE_EXECS:-20}"
RESULTS_DIR="${RESULTS_DIR:-$REPO_ROOT/results}"
ARTIFACTS_DIR="${ARTIFACTS_DIR:-$REPO_ROOT/guest-artifacts}"
PORT="${PORT:-18480}"
MANTA_VMM="${MANTA_VMM:-auto}"
WORK_PARENT="${WORK_PARENT:-${TMPDIR:-/tmp}}"
KEEP_WORK="${KEEP_WORK:-0}"

log() { printf '[run-stage] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 2
}

[[ $STAGE =~ ^[A-Za-z0-9._-]+$ ]] ||
    die "usage: bench/run-stage.sh STAGE_NAME (letters, digits, '.', '_', '-'), e.g. stage1-naive"
# Caller's server settings; those that place the server are this script's.
server_env=()
for name in $(compgen -e | grep '^MANTA_' || true); do
    case "$name" in
        MANTA_LISTEN_ADDR | MANTA_HOST_IFACE | MANTA_WORK_DIR | MANTA_KERNEL_PATH | \
            MANTA_ROOTFS_PATH | MANTA_SSH_KEY_PATH | MANTA_SSH_HOST_KEY_PATH | MANTA_VMM) ;;
        *) server_env+=("$name=${!name}") ;;
    esac
done

log "stage $STAGE; settings:"
for knob in ITERATIONS WARMUP EXEC_ITERATIONS EXEC_PER_SANDBOX C4_CONCURRENCY C4_ITERATIONS \
    BASELINE_BOOTS BASELINE_EXECS RESULTS_DIR ARTIFACTS_DIR PORT MANTA_VMM WORK_PARENT KEEP_WORK; do
    log "  $knob=${!knob}"
done
for setting in "${server_env[@]}"; do
    case "$setting" in
        MANTA_API_TOKEN=*) log "  server: MANTA_API_TOKEN=<hidden>" ;;
        *) log "  server: $setting" ;;
    esac
done
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, taps, iptables, VMs)"
for tool in cargo ip iptables curl jq ssh sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done
for artifact in vmlinux rootfs.ext4 sandbox_key ssh_host_ed25519_key.pub; do
    [[ -f $ARTIFACTS_DIR/$artifact ]] ||
        die "missing $ARTIFACTS_DIR/$artifact (build it with guest/build-all.sh)"
done

log "building release binaries"
(cd "$REPO_ROOT" && cargo build --release --bins) || die "cargo build --release failed"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO_ROOT/$TARGET_DIR" ;; esac
SERVER_BIN="$TARGET_DIR/release/manta-server"
BENCH_BIN="$TARGET_DIR/release/manta-bench"

# ---------------------------------------------------------------------------------------------
# Private resources, all removed by the trap.

NETNS="manta-bench-$$"
SINK="$NETNS-sink"
WORK="$(mktemp -d "$WORK_PARENT/manta-bench.XXXXXX")"
SNAPSHOT="$WORK/artifacts"
SERVER_LOG="$WORK/server.log"
URL="http://127.0.0.1:$PORT"
server_pid=""

stop_server() {
    [[ -n $server_pid ]] || return 0
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 1200; i++)); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$server_pid" 2>/dev/null; then
            log "server $server_pid did not stop within 120 s of SIGTERM; killing it"
            kill -9 "$server_pid" 2>/dev/null || true
        fi
    fi
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

# Pids of processes whose command line names our work dir: our VMs (and nothing else's).
pids_in_work() {
    local cmdline pid
    for cmdline in /proc/[0-9]*/cmdline; do
        pid="${cmdline#/proc/}"
        pid="${pid%/cmdline}"
        [[ $pid != "$$" ]] || continue
        if tr '\0' ' ' 2>/dev/null <"$cmdline" | grep -qF "$WORK/"; then echo "$pid"; fi
    done
}

cleanup() {
    local rc=$?
    stop_server
    local pid
    for pid in $(pids_in_work); do
        log "killing leftover process $pid ($(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | cut -c1-80))"
        kill -9 "$pid" 2>/dev/null || true
    done
    isolated_netns_down "$NETNS" "$SINK"
    if ((rc != 0)) && [[ -f $SERVER_LOG ]]; then
        log "server log tail ($SERVER_LOG):"
        tail -n 20 "$SERVER_LOG" >&2 || true
    fi
    if [[ $KEEP_WORK == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() { ip netns exec "$NETNS" "$@"; }

# Snapshot the artifacts, so that a rebuild of guest-artifacts during the run cannot change
# what is measured, and Manta and the baseline boot exactly the same files.
log "snapshotting guest artifacts into $SNAPSHOT"
mkdir -p "$SNAPSHOT"
cp --sparse=always "$ARTIFACTS_DIR/rootfs.ext4" "$SNAPSHOT/"
cp "$ARTIFACTS_DIR"/{vmlinux,ssh_host_ed25519_key.pub} "$SNAPSHOT/"
install -m 600 "$ARTIFACTS_DIR/sandbox_key" "$SNAPSHOT/sandbox_key"

log "network namespace $NETNS with uplink up0 -> sink namespace $SINK"
isolated_netns_up "$NETNS" "$SINK"

log "starting manta-server on $URL (log $SERVER_LOG)"
# `ip netns exec` and `env` both exec in place, so $! is the server's own pid.
ip netns exec "$NETNS" env -i PATH="$PATH" RUST_LOG=info \
    MANTA_LISTEN_ADDR="127.0.0.1:$PORT" MANTA_HOST_IFACE=up0 MANTA_VMM="$MANTA_VMM" \
    MANTA_WORK_DIR="$WORK/server" \
    MANTA_KERNEL_PATH="$SNAPSHOT/vmlinux" MANTA_ROOTFS_PATH="$SNAPSHOT/rootfs.ext4" \
    MANTA_SSH_KEY_PATH="$SNAPSHOT/sandbox_key" \
    MANTA_SSH_HOST_KEY_PATH="$SNAPSHOT/ssh_host_ed25519_key.pub" \
    "${server_env[@]}" "$SERVER_BIN" >"$SERVER_LOG" 2>&1 &
server_pid=$!
for ((i = 0; ; i++)); do
    kill -0 "$server_pid" 2>/dev/null || die "manta-server exited at start"
    if in_ns curl -sf --max-time 1 "$URL/healthz" >/dev/null 2>&1; then break; fi
    ((i < 200)) || die "manta-server did not answer $URL/healthz within 20 s"
    sleep 0.1
done
[[ $(cat "/proc/$server_pid/comm") == manta-server ]] ||
    die "pid $server_pid is not manta-server; cannot sample its memory"
log "server pid $server_pid, $(in_ns curl -sf "$URL/healthz")"

mkdir -p "$RESULTS_DIR"
failures=0
# The host is shared; the load average beside each step says how noisy its numbers may be.
loads=()
note_load() { loads+=("$1: $(cut -d' ' -f1-3 /proc/loadavg)"); }

# bench_run NAME FLAGS...: one manta-bench run into RESULTS_DIR/NAME.json.
bench_run() {
    local name=$1
    shift
    log "manta-bench $* -> $RESULTS_DIR/$name.json"
    local rc=0
    in_ns "$BENCH_BIN" --url "$URL" --server-pid "$server_pid" "$@" \
        >"$RESULTS_DIR/$name.json" || rc=$?
    if ((rc != 0)); then
        log "manta-bench for $name exited with $rc (failed iterations are in the JSON)"
        failures=$((failures + 1))
    fi
}

note_load "before $STAGE.json"
bench_run "$STAGE" --iterations "$ITERATIONS" --warmup "$WARMUP"
note_load "before $STAGE-true.json"
bench_run "$STAGE-true" --iterations "$EXEC_ITERATIONS" --execs-per-sandbox "$EXEC_PER_SANDBOX" \
    --cmd true
note_load "before $STAGE-c4.json"
bench_run "$STAGE-c4" --concurrency "$C4_CONCURRENCY" --iterations "$C4_ITERATIONS"

# The QEMU command line Manta uses, for the check against the baseline's.
log "recording the QEMU command line of one Manta sandbox"
manta_qemu_args="$WORK/manta-qemu-args"
# The token, if the server has one, goes through a header file so it is not on a command line.
printf 'Content-Type: application/json\n' >"$WORK/headers"
[[ -z ${MANTA_API_TOKEN:-} ]] ||
    printf 'Authorization: Bearer %s\n' "$MANTA_API_TOKEN" >>"$WORK/headers"
created="$(in_ns curl -sf --max-time 120 -X POST -H "@$WORK/headers" -d '{}' "$URL/create")" ||
    die "create for the command line check failed"
sandbox_id="$(jq -r .sandbox_id <<<"$created")"
for pid in $(pids_in_work); do
    if tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | grep -qx "manta-$sandbox_id"; then
        tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | tail -n +2 >"$manta_qemu_args"
    fi
done
in_ns curl -sf --max-time 60 -X POST -H "@$WORK/headers" \
    -d "{\"sandbox_id\":\"$sandbox_id\"}" "$URL/destroy" >/dev/null ||
    die "destroy of $sandbox_id for the command line check failed"

log "stopping manta-server"
stop_server
leftovers="$(pids_in_work)"
[[ -z $leftovers ]] || die "processes left after the server stopped: $leftovers"

log "baseline: $BASELINE_BOOTS boots x $BASELINE_EXECS execs by hand"
note_load "before baseline.json"
baseline_rc=0
ARTIFACTS_DIR="$SNAPSHOT" BOOTS="$BASELINE_BOOTS" EXECS="$BASELINE_EXECS" WORK_PARENT="$WORK" \
    VMM_USER="${MANTA_VMM_USER:-nobody}" "$REPO_ROOT/bench/baseline.sh" >"$RESULTS_DIR/baseline.json" || baseline_rc=$?
if ((baseline_rc != 0)); then
    log "baseline exited with $baseline_rc"
    failures=$((failures + 1))
fi
note_load "at the end"

# Paths, the VM's name and the directory part of files differ by design; the rest must not.
normalize_args() { sed -E -e 's#/[^,= ]*/##g' -e 's#^manta-(sb-[0-9a-f]+|baseline)$#NAME#'; }
compare_txt="$RESULTS_DIR/$STAGE-compare.txt"
{
    echo "stage $STAGE, $(date -u +%Y-%m-%dT%H:%M:%SZ), bench/run-stage.sh"
    echo "  vmlinux sha256 $(sha256sum "$SNAPSHOT/vmlinux" | cut -d' ' -f1)"
    echo "  rootfs.ext4 inputs: $(cat "$ARTIFACTS_DIR/rootfs.inputs" 2>/dev/null || echo unknown)"
    echo "  load average (1/5/15 min, $(nproc) cores):"
    printf '    %s\n' "${loads[@]}"
    if [[ -s $manta_qemu_args ]] &&
        diff <(normalize_args <"$manta_qemu_args") \
            <(jq -r '.flags.qemu_args[]' "$RESULTS_DIR/baseline.json" | normalize_args) \
            >"$WORK/qemu-args.diff"; then
        echo "  QEMU command line: Manta's and the baseline's match (paths and VM name aside)"
    else
        echo "  QEMU command line: Manta's and the baseline's DIFFER:"
        sed 's/^/    /' "$WORK/qemu-args.diff" 2>/dev/null || echo "    (Manta's was not captured)"
        failures=$((failures + 1))
    fi
    echo
    "$BENCH_BIN" compare "$RESULTS_DIR/baseline.json" "$RESULTS_DIR/$STAGE.json" \
        "$RESULTS_DIR/$STAGE-true.json" "$RESULTS_DIR/$STAGE-c4.json"
} >"$compare_txt" || failures=$((failures + 1))
cat "$compare_txt" >&2

log "wrote $RESULTS_DIR/{$STAGE.json,$STAGE-true.json,$STAGE-c4.json,baseline.json,$STAGE-compare.txt}"
if ((failures > 0)); then
    log "$failures step(s) reported failures; see above"
    exit 1
fi
log "done"
