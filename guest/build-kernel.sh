#!/usr/bin/env bash
# Build the Manta guest kernel: an uncompressed x86_64 ELF vmlinux that boots
# under Firecracker and under QEMU `-M microvm` (via its PVH entry point).
#
# Config = `make tinyconfig` + guest/kernel.config, every fragment option
# verified in the final .config. Skips the build when the inputs are unchanged.
set -euo pipefail

MANTA_LOG_TAG=build-kernel
# shellcheck source=guest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KERNEL_VERSION="${KERNEL_VERSION:-6.1}"
ARTIFACTS_DIR="$(repo_path "${ARTIFACTS_DIR:-guest-artifacts}")"
MANTA_CACHE_DIR="${MANTA_CACHE_DIR:-/var/cache/manta}"
BUILD_DIR="${BUILD_DIR:-$MANTA_CACHE_DIR/build}"
JOBS="${JOBS:-$(nproc)}"
PREFER_CONTAINER_BUILD="${PREFER_CONTAINER_BUILD:-auto}"
CONTAINER_IMAGE="${CONTAINER_IMAGE:-debian:bookworm}"
AUTO_INSTALL_DEPS="${AUTO_INSTALL_DEPS:-1}"
KERNEL_GIT_URL="${KERNEL_GIT_URL:-https://git.kernel.org/pub/scm/linux/kernel/git/stable/linux.git}"
FORCE_REBUILD="${FORCE_REBUILD:-0}"

FRAGMENT="$MANTA_REPO_ROOT/guest/kernel.config"
SCRIPT="$MANTA_REPO_ROOT/guest/build-kernel.sh"
VMLINUX="$ARTIFACTS_DIR/vmlinux"
STAMP="$ARTIFACTS_DIR/vmlinux.inputs"

log "settings:"
for knob in KERNEL_VERSION ARTIFACTS_DIR BUILD_DIR JOBS PREFER_CONTAINER_BUILD \
    CONTAINER_IMAGE AUTO_INSTALL_DEPS KERNEL_GIT_URL FORCE_REBUILD; do
    show_knob "$knob"
done

started=$(date +%s)

# ---------------------------------------------------------------------------
# Container build: re-run this script inside a Debian container when an engine
# is actually running; otherwise build on the host.

container_engine() {
    local engine
    for engine in podman docker; do
        if command -v "$engine" >/dev/null 2>&1 &&
            timeout 20 "$engine" info >/dev/null 2>&1; then
            printf '%s\n' "$engine"
            return 0
        fi
    done
    return 1
}

if [[ ${MANTA_IN_CONTAINER:-0} != 1 ]]; then
    case "$PREFER_CONTAINER_BUILD" in
        never) engine="" ;;
        auto)
            engine="$(container_engine || true)"
            [[ -n $engine ]] || log "no container engine running, building on the host"
            ;;
        always)
            engine="$(container_engine)" ||
                die "PREFER_CONTAINER_BUILD=always but no container engine (podman/docker) is running"
            ;;
        *) die "PREFER_CONTAINER_BUILD must be auto, always or never (got '$PREFER_CONTAINER_BUILD')" ;;
    esac
    if [[ -n $engine ]]; then
        log "building inside a $CONTAINER_IMAGE container with $engine"
        mkdir -p "$ARTIFACTS_DIR" "$BUILD_DIR"
        exec "$engine" run --rm \
            -v "$MANTA_REPO_ROOT:/manta:ro" \
            -v "$ARTIFACTS_DIR:/manta-artifacts" \
            -v "$BUILD_DIR:/manta-build" \
            -e MANTA_IN_CONTAINER=1 -e AUTO_INSTALL_DEPS=1 \
            -e ARTIFACTS_DIR=/manta-artifacts -e BUILD_DIR=/manta-build \
            -e KERNEL_VERSION="$KERNEL_VERSION" -e JOBS="$JOBS" \
            -e KERNEL_GIT_URL="$KERNEL_GIT_URL" -e FORCE_REBUILD="$FORCE_REBUILD" \
            "$CONTAINER_IMAGE" bash /manta/guest/build-kernel.sh
    fi
fi

# ---------------------------------------------------------------------------
# Tools

ensure_tools make:make gcc:gcc flex:flex bison:bison bc:bc libelf-dev:/usr/include/gelf.h \
    libssl-dev:/usr/include/openssl/ssl.h xz-utils:xz binutils:readelf cpio:cpio \
    perl:perl util-linux:flock

# ---------------------------------------------------------------------------
# Kernel source: Debian's linux-source package, or a git ref.

case "$KERNEL_VERSION" in
    git:*)
        ref="${KERNEL_VERSION#git:}"
        ensure_tools git:git
        src_id="git-$ref"
        src_dir="$BUILD_DIR/src-git-${ref//\//_}"
        if [[ ! -f $src_dir/Makefile ]]; then
            log "looking up tag/branch $ref at $KERNEL_GIT_URL (30 s timeout)"
            rm -rf "$src_dir"
            mkdir -p "$BUILD_DIR"
            if ! timeout 30 git ls-remote --exit-code "$KERNEL_GIT_URL" "$ref" >/dev/null 2>&1; then
                die "cannot reach $KERNEL_GIT_URL or it has no tag/branch '$ref' (no network to the git host?); use KERNEL_VERSION=6.1 to build Debian's linux-source package instead"
            fi
            log "cloning $ref (shallow)"
            git clone --quiet --depth 1 --branch "$ref" "$KERNEL_GIT_URL" "$src_dir" || {
                rm -rf "$src_dir"
                die "git clone of $ref from $KERNEL_GIT_URL failed"
            }
        fi
        src_id="git-$(git -C "$src_dir" rev-parse HEAD)"
        ;;
    [0-9]*)
        pkg="linux-source-$KERNEL_VERSION"
        tarball="/usr/src/$pkg.tar.xz"
        if [[ ! -f $tarball ]]; then
            [[ $AUTO_INSTALL_DEPS == 1 ]] ||
                die "$tarball missing (apt-get install $pkg, or set AUTO_INSTALL_DEPS=1)"
            require_root "installing $pkg"
            candidate="$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: //p')"
            if [[ -z $candidate || $candidate == "(none)" ]]; then
                apt-get update -qq || die "apt-get update failed"
                candidate="$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: //p')"
            fi
            [[ -n $candidate && $candidate != "(none)" ]] ||
                die "$pkg is not available from the configured apt sources; KERNEL_VERSION=6.1 works with Debian 12's default sources"
            log "installing $pkg $candidate"
            apt_install "$pkg"
            [[ -f $tarball ]] || die "$pkg is installed but $tarball is missing"
        fi
        pkg_version="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || stat -c %Y "$tarball")"
        src_id="debian-$pkg-$pkg_version"
        src_dir="$BUILD_DIR/src-$pkg-$pkg_version"
        if [[ ! -f $src_dir/.manta-extracted ]]; then
            log "extracting $tarball into $src_dir (about a minute)"
            rm -rf "$src_dir" "$src_dir.tmp"
            mkdir -p "$src_dir.tmp"
            tar -xJf "$tarball" -C "$src_dir.tmp" --strip-components=1
            touch "$src_dir.tmp/.manta-extracted"
            mv "$src_dir.tmp" "$src_dir"
        fi
        ;;
    *) die "KERNEL_VERSION must be a version such as 6.1 / 6.12 or git:<ref> (got '$KERNEL_VERSION')" ;;
esac

# ---------------------------------------------------------------------------
# Skip when nothing changed: key = source id + fragment + this script + compiler.

inputs_key="$(
    {
        printf '%s\n' "$src_id"
        sha256sum <"$FRAGMENT"
        sha256sum <"$SCRIPT"
        sha256sum <"$MANTA_REPO_ROOT/guest/lib.sh"
        gcc --version 2>&1 | sed -n 1p
    } | sha256sum | cut -d' ' -f1
)"
if [[ $FORCE_REBUILD != 1 && -f $VMLINUX && -f $STAMP ]] &&
    [[ $(cat "$STAMP") == "$inputs_key" ]]; then
    log "vmlinux is up to date ($VMLINUX, inputs $inputs_key); set FORCE_REBUILD=1 to rebuild"
    exit 0
fi

# ---------------------------------------------------------------------------
# Configure: tinyconfig, merge the fragment, resolve, then verify.

obj_dir="$BUILD_DIR/obj-${src_id//\//_}"
mkdir -p "$obj_dir" "$ARTIFACTS_DIR"
# One build per object tree at a time.
exec 9>"$obj_dir.lock"
if ! flock -n 9; then
    log "another build is using $obj_dir; waiting for it"
    flock 9
fi
log "configuring in $obj_dir (tinyconfig + guest/kernel.config)"
make -s -C "$src_dir" O="$obj_dir" tinyconfig >/dev/null
(
    cd "$obj_dir"
    "$src_dir/scripts/kconfig/merge_config.sh" -m -O "$obj_dir" "$obj_dir/.config" "$FRAGMENT" >/dev/null
)
make -s -C "$src_dir" O="$obj_dir" olddefconfig >/dev/null

# Whether the kernel source defines a Kconfig symbol (CONFIG_ prefix included).
kconfig_has() {
    grep -rqE --include='Kconfig*' "^[[:space:]]*(menu)?config ${1#CONFIG_}[[:space:]]*$" "$src_dir"
}

optional=" $(sed -n 's/^# manta-optional://p' "$FRAGMENT" | tr '\n' ' ') "
bad=0
checked=0
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        opt="${BASH_REMATCH[1]}"
        want="${BASH_REMATCH[2]}"
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        opt="${BASH_REMATCH[1]}"
        want=""
    else
        continue
    fi
    if [[ $optional == *" $opt "* ]] && ! kconfig_has "$opt"; then
        log "config check: $opt does not exist in this kernel version (optional, skipped)"
        continue
    fi
    checked=$((checked + 1))
    got="$(sed -n "s/^$opt=//p" "$obj_dir/.config")"
    if [[ $got != "$want" ]]; then
        log "config check: $opt wanted '${want:-not set}', final .config has '${got:-not set}'"
        bad=1
    fi
done <"$FRAGMENT"
[[ $bad == 0 ]] || die "kernel config is missing options of guest/kernel.config (a dependency is probably not listed)"
if grep -qE '^CONFIG_MODULES=y' "$obj_dir/.config"; then
    die "CONFIG_MODULES ended up enabled; the guest must be module-free"
fi
log "config verified: all $checked options of guest/kernel.config are as requested"

# ---------------------------------------------------------------------------
# Build

log "building vmlinux with $JOBS jobs (several minutes)"
build_started=$(date +%s)
if ! make -C "$src_dir" O="$obj_dir" -j"$JOBS" vmlinux >"$obj_dir/build.log" 2>&1; then
    tail -n 40 "$obj_dir/build.log" >&2
    die "kernel build failed; full log: $obj_dir/build.log"
fi
log "compiled in $(($(date +%s) - build_started)) s"

# Firecracker loads the ELF directly; QEMU needs the PVH note (Xen owner).
file_type="$(readelf -h "$obj_dir/vmlinux" | awk '/Class:/ {print $2} /Machine:/ {print $2}' | tr '\n' ' ')"
[[ $file_type == "ELF64 Advanced "* ]] || die "built vmlinux is not an x86_64 ELF64 image ($file_type)"
notes="$(readelf -n "$obj_dir/vmlinux")"
[[ $notes == *$'\n  Xen '* ]] ||
    die "built vmlinux has no PVH (Xen) ELF note; QEMU cannot boot it"

cp "$obj_dir/vmlinux" "$VMLINUX.tmp"
cp "$obj_dir/.config" "$ARTIFACTS_DIR/vmlinux.config"
mv "$VMLINUX.tmp" "$VMLINUX"
printf '%s\n' "$inputs_key" >"$STAMP"

release="$(cat "$obj_dir/include/config/kernel.release" 2>/dev/null || echo unknown)"
log "done: $VMLINUX (kernel $release, $(file_sizes "$VMLINUX"))"
log "total time $(($(date +%s) - started)) s"
