#!/usr/bin/env bash
# Build every guest artifact that is missing or stale, in order:
#   1. host packages   2. kernel (vmlinux)   3. rootfs.ext4 + SSH keys   4. Firecracker
# Finished artifact sets are kept in $MANTA_CACHE_DIR/artifacts-<key>/, where
# key hashes the build inputs; a later run (or a fresh clone) with the same
# inputs copies them from there instead of building. Needs root.
set -euo pipefail

MANTA_LOG_TAG=build-all
# shellcheck source=guest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ARTIFACTS_DIR="$(repo_path "${ARTIFACTS_DIR:-guest-artifacts}")"
MANTA_CACHE_DIR="${MANTA_CACHE_DIR:-/var/cache/manta}"
AUTO_INSTALL_DEPS="${AUTO_INSTALL_DEPS:-1}"
KERNEL_VERSION="${KERNEL_VERSION:-6.1}"
DISTRO="${DISTRO:-debian}"
ROOTFS_SIZE_MB="${ROOTFS_SIZE_MB:-1024}"
EXTRA_PACKAGES="${EXTRA_PACKAGES:-}"
SKIP_FIRECRACKER="${SKIP_FIRECRACKER:-0}"
CACHE_KEEP_SETS="${CACHE_KEEP_SETS:-3}"
export ARTIFACTS_DIR MANTA_CACHE_DIR AUTO_INSTALL_DEPS KERNEL_VERSION DISTRO ROOTFS_SIZE_MB \
    EXTRA_PACKAGES

GUEST_DIR="$MANTA_REPO_ROOT/guest"
# What a complete artifact set holds (the private host key is kept so that a
# rebuild of the image keeps the same host key).
ARTIFACTS=(vmlinux vmlinux.config vmlinux.inputs rootfs.ext4 rootfs.inputs
    sandbox_key sandbox_key.pub ssh_host_ed25519_key ssh_host_ed25519_key.pub)

log "settings:"
for knob in ARTIFACTS_DIR MANTA_CACHE_DIR AUTO_INSTALL_DEPS KERNEL_VERSION DISTRO \
    ROOTFS_SIZE_MB EXTRA_PACKAGES SKIP_FIRECRACKER CACHE_KEEP_SETS; do
    show_knob "$knob"
done

started=$(date +%s)
require_root "building the guest artifacts"

# ---------------------------------------------------------------------------
log "step 1/4: host packages"
ensure_tools make:make gcc:gcc flex:flex bison:bison bc:bc libelf-dev:/usr/include/gelf.h \
    libssl-dev:/usr/include/openssl/ssl.h xz-utils:xz binutils:readelf cpio:cpio perl:perl \
    debootstrap:debootstrap e2fsprogs:mkfs.ext4 openssh-client:ssh-keygen \
    qemu-system-x86:qemu-system-x86_64 iproute2:ip python3:python3 curl:curl

# ---------------------------------------------------------------------------
# Cache key over the inputs: scripts, kernel fragment, init, sshd config, and
# the knobs and source package that change the output.

source_version="$(dpkg-query -W -f='${Version}' "linux-source-$KERNEL_VERSION" 2>/dev/null || echo none)"
cache_key="$(
    {
        sha256_of "$GUEST_DIR/build-all.sh" "$GUEST_DIR/build-kernel.sh" "$GUEST_DIR/build-rootfs.sh" \
            "$GUEST_DIR/lib.sh" "$GUEST_DIR/kernel.config" "$GUEST_DIR/manta-init" \
            "$GUEST_DIR/manta-poweroff" "$GUEST_DIR/sshd_config" "$GUEST_DIR/init.fstab"
        printf '%s\n' "$KERNEL_VERSION" "$source_version" "$DISTRO" "$ROOTFS_SIZE_MB" "$EXTRA_PACKAGES"
    } | sha256sum | cut -c1-32
)"
cache_dir="$MANTA_CACHE_DIR/artifacts-$cache_key"
log "cache key $cache_key"

have_all() {
    local dir="$1" name
    for name in "${ARTIFACTS[@]}"; do [[ -f $dir/$name ]] || return 1; done
}

copy_set() {
    local from="$1" to="$2" name
    for name in "${ARTIFACTS[@]}"; do
        cp --sparse=always --reflink=auto -p "$from/$name" "$to/$name.tmp"
        mv "$to/$name.tmp" "$to/$name"
    done
}

mkdir -p "$ARTIFACTS_DIR"
if ! have_all "$ARTIFACTS_DIR" && have_all "$cache_dir"; then
    if [[ -f $ARTIFACTS_DIR/sandbox_key ]] &&
        ! cmp -s "$ARTIFACTS_DIR/sandbox_key" "$cache_dir/sandbox_key"; then
        log "cached set $cache_dir uses other SSH keys than $ARTIFACTS_DIR; building instead"
    else
        log "restoring artifacts from $cache_dir"
        copy_set "$cache_dir" "$ARTIFACTS_DIR"
    fi
fi

# ---------------------------------------------------------------------------
log "step 2/4: kernel"
"$GUEST_DIR/build-kernel.sh"

log "step 3/4: root filesystem and SSH keys"
"$GUEST_DIR/build-rootfs.sh"

if ! have_all "$cache_dir"; then
    log "storing artifacts in $cache_dir"
    (
        umask 077
        mkdir -p "$MANTA_CACHE_DIR"
        rm -rf "$cache_dir.tmp"
        mkdir "$cache_dir.tmp"
    )
    copy_set "$ARTIFACTS_DIR" "$cache_dir.tmp"
    rm -rf "$cache_dir"
    mv "$cache_dir.tmp" "$cache_dir"
fi
touch "$cache_dir"

# Keep only the most recently used sets (each is about 150 MB on disk).
# (Set names are hex keys, so ls output is safe to read; "*[0-9a-f]" skips .tmp.)
# shellcheck disable=SC2012
mapfile -t old_sets < <(ls -1dt "$MANTA_CACHE_DIR"/artifacts-*[0-9a-f] 2>/dev/null |
    tail -n +"$((CACHE_KEEP_SETS + 1))")
for old in "${old_sets[@]}"; do
    log "removing old cached set $old"
    rm -rf "$old"
done

# ---------------------------------------------------------------------------
if [[ $SKIP_FIRECRACKER == 1 ]]; then
    log "step 4/4: Firecracker skipped (SKIP_FIRECRACKER=1)"
else
    log "step 4/4: Firecracker"
    "$GUEST_DIR/fetch-firecracker.sh"
fi

log "artifacts in $ARTIFACTS_DIR:"
log "  vmlinux      $(file_sizes "$ARTIFACTS_DIR/vmlinux")"
log "  rootfs.ext4  $(file_sizes "$ARTIFACTS_DIR/rootfs.ext4")"
log "total time $(($(date +%s) - started)) s"
