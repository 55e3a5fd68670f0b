#!/usr/bin/env bash
# Build the Manta guest root filesystem: $ARTIFACTS_DIR/rootfs.ext4 (sparse ext4
# with journal), plus the SSH keys the server uses to reach the guest:
#   sandbox_key / sandbox_key.pub   client key, the only key root accepts
#   ssh_host_ed25519_key(.pub)      the guest's host key, baked into the image
# Both keys are generated once and kept. The tree is built in a directory and
# turned into an image with `mkfs.ext4 -d` (no loop mount). Needs root.
set -euo pipefail

MANTA_LOG_TAG=build-rootfs
# shellcheck source=guest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

default_mirror() {
    # The host's own Debian mirror (deb822 or one-line sources), else deb.debian.org.
    local uri
    uri="$(
        {
            grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
            grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; break}}'
        } | grep -E '/debian/?$' | sed -n 1p || true
    )"
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

DISTRO="${DISTRO:-debian}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-$(default_mirror)}"
SSH_SERVER="${SSH_SERVER:-dropbear}"
ALPINE_MIRROR="${ALPINE_MIRROR:-https://dl-cdn.alpinelinux.org/alpine}"
ALPINE_BRANCH="${ALPINE_BRANCH:-v3.20}"
ALPINE_ARCH="${ALPINE_ARCH:-x86_64}"
ROOTFS_SIZE_MB="${ROOTFS_SIZE_MB:-1024}"
ARTIFACTS_DIR="$(repo_path "${ARTIFACTS_DIR:-guest-artifacts}")"
MANTA_CACHE_DIR="${MANTA_CACHE_DIR:-/var/cache/manta}"
BUILD_DIR="${BUILD_DIR:-$MANTA_CACHE_DIR/build}"
EXTRA_PACKAGES="${EXTRA_PACKAGES:-}"
AUTO_INSTALL_DEPS="${AUTO_INSTALL_DEPS:-1}"
FORCE_REBUILD="${FORCE_REBUILD:-0}"

# Bump when the image layout changes in a way the server may care about.
MANTA_GUEST_VERSION=1

GUEST_DIR="$MANTA_REPO_ROOT/guest"
ROOTFS="$ARTIFACTS_DIR/rootfs.ext4"
STAMP="$ARTIFACTS_DIR/rootfs.inputs"

log "settings:"
for knob in DISTRO SUITE MIRROR SSH_SERVER ALPINE_MIRROR ALPINE_BRANCH ALPINE_ARCH ROOTFS_SIZE_MB \
    ARTIFACTS_DIR BUILD_DIR EXTRA_PACKAGES AUTO_INSTALL_DEPS FORCE_REBUILD; do
    show_knob "$knob"
done

started=$(date +%s)
require_root "building the root filesystem (debootstrap, file ownership in the image)"
[[ $ROOTFS_SIZE_MB =~ ^[0-9]+$ && $ROOTFS_SIZE_MB -ge 256 ]] ||
    die "ROOTFS_SIZE_MB must be a number of MiB >= 256 (got '$ROOTFS_SIZE_MB')"

ensure_tools openssh-client:ssh-keygen e2fsprogs:mkfs.ext4 coreutils:truncate util-linux:flock
case "$DISTRO" in
    debian) ensure_tools debootstrap:debootstrap ;;
    alpine) ensure_tools curl:curl ;;
    *) die "DISTRO must be debian or alpine (got '$DISTRO')" ;;
esac
case "$SSH_SERVER" in
    dropbear | openssh) ;;
    *) die "SSH_SERVER must be dropbear or openssh (got '$SSH_SERVER')" ;;
esac
mkfs_version="$(mkfs.ext4 -V 2>&1 | sed -n 1p)"
mkfs_usage="$(mkfs.ext4 2>&1 || true)"
[[ $mkfs_usage == *"-d root-directory"* ]] || die "mkfs.ext4 has no -d option ($mkfs_version); e2fsprogs >= 1.43 is needed"

# ---------------------------------------------------------------------------
# Keys (generated once, kept across rebuilds).

mkdir -p "$ARTIFACTS_DIR"
if [[ ! -f $ARTIFACTS_DIR/sandbox_key ]]; then
    log "generating the sandbox client key (ed25519)"
    ssh-keygen -q -t ed25519 -N '' -C manta-sandbox -f "$ARTIFACTS_DIR/sandbox_key"
fi
if [[ ! -f $ARTIFACTS_DIR/ssh_host_ed25519_key ]]; then
    log "generating the guest host key (ed25519)"
    ssh-keygen -q -t ed25519 -N '' -C manta-guest-host -f "$ARTIFACTS_DIR/ssh_host_ed25519_key"
fi
chmod 600 "$ARTIFACTS_DIR/sandbox_key" "$ARTIFACTS_DIR/ssh_host_ed25519_key"
for key in sandbox_key ssh_host_ed25519_key; do
    if [[ ! -f $ARTIFACTS_DIR/$key.pub ]]; then
        log "re-deriving the missing $key.pub from $key"
        ssh-keygen -y -f "$ARTIFACTS_DIR/$key" >"$ARTIFACTS_DIR/$key.pub" ||
            die "$ARTIFACTS_DIR/$key is not a readable private key without passphrase"
    fi
    ssh-keygen -l -f "$ARTIFACTS_DIR/$key.pub" >/dev/null ||
        die "$ARTIFACTS_DIR/$key.pub is not a valid public key"
done

# dropbear starts (and forks per connection) several times faster than OpenSSH's
# sshd on an emulated CPU; openssh-sftp-server gives it an SFTP subsystem.
guest_packages=(bash coreutils procps iproute2 python3)
case "$DISTRO-$SSH_SERVER" in
    debian-dropbear) guest_packages+=(dropbear-bin openssh-sftp-server) ;;
    debian-openssh) guest_packages+=(openssh-server) ;;
    alpine-dropbear) guest_packages+=(dropbear dropbear-convert openssh-sftp-server) ;;
    alpine-openssh) guest_packages+=(openssh-server) ;;
esac
read -ra extra_packages <<<"$EXTRA_PACKAGES"
guest_packages+=("${extra_packages[@]}")

# ---------------------------------------------------------------------------
# Skip when nothing changed.

inputs_key="$(
    {
        printf '%s\n' "$DISTRO" "$SUITE" "$MIRROR" "$SSH_SERVER" "$ALPINE_BRANCH" "$ALPINE_ARCH" \
            "$ROOTFS_SIZE_MB" "$EXTRA_PACKAGES" "$MANTA_GUEST_VERSION"
        sha256_of "$GUEST_DIR/build-rootfs.sh" "$GUEST_DIR/lib.sh" "$GUEST_DIR/manta-init" \
            "$GUEST_DIR/manta-poweroff" "$GUEST_DIR/sshd_config" "$GUEST_DIR/init.fstab" \
            "$ARTIFACTS_DIR/sandbox_key.pub" "$ARTIFACTS_DIR/ssh_host_ed25519_key.pub"
    } | sha256sum | cut -d' ' -f1
)"
if [[ $FORCE_REBUILD != 1 && -f $ROOTFS && -f $STAMP ]] && [[ $(cat "$STAMP") == "$inputs_key" ]]; then
    log "rootfs is up to date ($ROOTFS, inputs $inputs_key); set FORCE_REBUILD=1 to rebuild"
    exit 0
fi

# ---------------------------------------------------------------------------
# Base tree: a cached debootstrap (or apk) result, reused while the distro,
# mirror and package list stay the same.

mkdir -p "$BUILD_DIR"
# One image build at a time (they share the cached base trees).
exec 9>"$BUILD_DIR/rootfs.lock"
if ! flock -n 9; then
    log "another rootfs build is running; waiting for it"
    flock 9
fi

# Half-built trees and images of this run go away on any exit.
stage="$BUILD_DIR/rootfs-stage-$$"
base=""
cleanup() {
    [[ -z $base ]] || rm -rf "$base.tmp" "$base.tmp.apk"
    rm -rf "$stage" "$ROOTFS.tmp"
}
trap cleanup EXIT

build_debian_base() {
    local tree="$1" log_file="$2" include
    include="$(printf '%s\n' "${guest_packages[@]}" | paste -sd, -)"
    mkdir -p "$BUILD_DIR/debootstrap-cache"
    log "debootstrap $SUITE (minbase + $include) from $MIRROR (a few minutes)"
    if ! debootstrap --variant=minbase --include="$include" \
        --cache-dir="$BUILD_DIR/debootstrap-cache" \
        "$SUITE" "$tree" "$MIRROR" >"$log_file" 2>&1; then
        tail -n 30 "$log_file" >&2
        [[ -f $tree/debootstrap/debootstrap.log ]] && tail -n 30 "$tree/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (log: $log_file)"
    fi
}

build_alpine_base() {
    local tree="$1" log_file="$2" repo="$ALPINE_MIRROR/$ALPINE_BRANCH/main" index apk_pkg
    log "checking that the Alpine mirror answers ($repo, 5 s timeout)"
    index="$(curl -fsS --connect-timeout 5 --max-time 10 "$repo/$ALPINE_ARCH/" 2>/dev/null)" ||
        die "Alpine mirror $ALPINE_MIRROR is unreachable from this machine; use DISTRO=debian or set ALPINE_MIRROR to a reachable mirror"
    apk_pkg="$(printf '%s\n' "$index" | grep -oE 'apk-tools-static-[0-9][^"]*\.apk' | sed -n 1p)"
    [[ -n $apk_pkg ]] || die "no apk-tools-static package listed at $repo/$ALPINE_ARCH/"
    log "installing Alpine $ALPINE_BRANCH with $apk_pkg"
    mkdir -p "$tree.apk"
    curl -fsS --max-time 120 "$repo/$ALPINE_ARCH/$apk_pkg" | tar -xz -C "$tree.apk" 2>/dev/null ||
        die "could not fetch $apk_pkg"
    mkdir -p "$tree/etc/apk"
    printf '%s\n' "$repo" "$ALPINE_MIRROR/$ALPINE_BRANCH/community" >"$tree/etc/apk/repositories"
    "$tree.apk/sbin/apk.static" --root "$tree" --initdb --allow-untrusted \
        --repositories-file "$tree/etc/apk/repositories" --arch "$ALPINE_ARCH" \
        add alpine-baselayout busybox "${guest_packages[@]}" >"$log_file" 2>&1 || {
        tail -n 30 "$log_file" >&2
        die "apk failed (log: $log_file)"
    }
    rm -rf "$tree.apk"
}

base_key="$(printf '%s\n' "$DISTRO" "$SUITE" "$MIRROR" "$ALPINE_MIRROR" "$ALPINE_BRANCH" \
    "$ALPINE_ARCH" "${guest_packages[*]}" | sha256sum | cut -c1-16)"
base="$BUILD_DIR/rootfs-base-$DISTRO-$base_key"
if [[ ! -f $base/.manta-base-complete ]]; then
    rm -rf "$base" "$base.tmp"
    mkdir -p "$base.tmp"
    base_started=$(date +%s)
    case "$DISTRO" in
        debian) build_debian_base "$base.tmp" "$base.log" ;;
        alpine) build_alpine_base "$base.tmp" "$base.log" ;;
    esac
    touch "$base.tmp/.manta-base-complete"
    mv "$base.tmp" "$base"
    log "base tree ready in $(($(date +%s) - base_started)) s"
else
    log "reusing cached base tree $base"
fi

# ---------------------------------------------------------------------------
# Image tree: a copy of the base with Manta's init, SSH setup and trimming.

log "preparing the image tree in $stage"
rm -rf "$stage"
cp -a "$base" "$stage"
rm -f "$stage/.manta-base-complete"

install -m 0755 "$GUEST_DIR/manta-init" "$stage/sbin/manta-init"
install -m 0755 "$GUEST_DIR/manta-poweroff" "$stage/sbin/manta-poweroff"
install -D -m 0644 "$GUEST_DIR/init.fstab" "$stage/etc/manta/init.fstab"
# Links that a fresh devtmpfs lacks; manta-init copies them into /dev.
install -d -m 0755 "$stage/usr/lib/manta/dev"
ln -sfn /proc/self/fd "$stage/usr/lib/manta/dev/fd"
for n in 0:stdin 1:stdout 2:stderr; do
    ln -sfn "/proc/self/fd/${n%%:*}" "$stage/usr/lib/manta/dev/${n#*:}"
done
for name in poweroff reboot halt; do
    [[ -e $stage/sbin/$name || -L $stage/sbin/$name ]] || ln -s manta-poweroff "$stage/sbin/$name"
done

# SSH: our host key only, root login with the sandbox key only.
rm -f "$stage"/etc/ssh/ssh_host_*
install -d -m 0700 "$stage/root/.ssh"
rm -f "$stage/root/.ssh/authorized_keys"
if [[ $SSH_SERVER == openssh ]]; then
    install -m 0600 "$ARTIFACTS_DIR/ssh_host_ed25519_key" "$stage/etc/ssh/ssh_host_ed25519_key"
    install -m 0644 "$ARTIFACTS_DIR/ssh_host_ed25519_key.pub" "$stage/etc/ssh/ssh_host_ed25519_key.pub"
    install -m 0644 "$GUEST_DIR/sshd_config" "$stage/etc/ssh/sshd_config"
    rm -rf "$stage/etc/ssh/sshd_config.d"
    install -m 0600 "$ARTIFACTS_DIR/sandbox_key.pub" "$stage/etc/ssh/manta_authorized_keys"
else
    # dropbear reads only its own key format and ~/.ssh/authorized_keys; manta-init
    # starts it with password logins off and logins limited to the root group.
    install -d -m 0700 "$stage/etc/dropbear"
    rm -f "$stage"/etc/dropbear/*
    install -m 0600 "$ARTIFACTS_DIR/ssh_host_ed25519_key" "$stage/etc/dropbear/openssh_ed25519_host_key"
    convert=""
    for candidate in /usr/lib/dropbear/dropbearconvert /usr/bin/dropbearconvert; do
        [[ -x $stage$candidate ]] && convert="$candidate" && break
    done
    [[ -n $convert ]] || die "dropbearconvert is missing from the image tree"
    chroot "$stage" "$convert" openssh dropbear /etc/dropbear/openssh_ed25519_host_key \
        /etc/dropbear/dropbear_ed25519_host_key >/dev/null 2>&1 ||
        die "dropbearconvert could not convert the host key"
    rm -f "$stage/etc/dropbear/openssh_ed25519_host_key"
    install -m 0600 "$ARTIFACTS_DIR/sandbox_key.pub" "$stage/root/.ssh/authorized_keys"
    # Some clients look for the OpenSSH path of the SFTP server.
    if [[ ! -e $stage/usr/lib/sftp-server && -e $stage/usr/lib/openssh/sftp-server ]]; then
        ln -s openssh/sftp-server "$stage/usr/lib/sftp-server"
    fi
fi
# "*" = no password, but not a locked account: OpenSSH refuses "!" accounts.
sed -i -E 's/^root:[^:]*:/root:*:/' "$stage/etc/shadow"

# Identity and name resolution; no network config (the kernel applies `ip=`).
echo manta-sandbox >"$stage/etc/hostname"
cat >"$stage/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	manta-sandbox
HOSTS
: >"$stage/etc/resolv.conf"
cat >"$stage/etc/fstab" <<'FSTAB'
# Mounted by the kernel (root=/dev/vda rw) and /sbin/manta-init; pass 0 = never fsck.
/dev/vda	/	ext4	rw,relatime	0	0
FSTAB
rm -f "$stage/etc/network/interfaces" "$stage/etc/systemd/network/"* 2>/dev/null || true
: >"$stage/etc/machine-id"
cat >"$stage/etc/manta-guest" <<INFO
MANTA_GUEST_VERSION=$MANTA_GUEST_VERSION
MANTA_GUEST_DISTRO=$DISTRO-$SUITE
MANTA_GUEST_SSH_SERVER=$SSH_SERVER
MANTA_GUEST_BUILD=${inputs_key:0:16}
MANTA_GUEST_BUILT_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
INFO

# Trim: package caches and indexes, docs, man pages, locales, logs.
rm -rf "$stage"/var/cache/apt/* "$stage"/var/lib/apt/lists/* "$stage"/var/cache/debconf/*-old \
    "$stage"/usr/share/doc/* "$stage"/usr/share/man/* "$stage"/usr/share/info/* \
    "$stage"/usr/share/lintian "$stage"/usr/share/linda "$stage"/var/log/* \
    "$stage"/debootstrap "$stage"/tmp/* "$stage"/var/tmp/*
# Login records that dropbear/sshd write for terminal sessions.
install -m 0664 -g 43 /dev/null "$stage/var/log/wtmp" 2>/dev/null || : >"$stage/var/log/wtmp"
install -m 0664 -g 43 /dev/null "$stage/var/log/lastlog" 2>/dev/null || : >"$stage/var/log/lastlog"
install -m 0660 -g 43 /dev/null "$stage/var/log/btmp" 2>/dev/null || : >"$stage/var/log/btmp"
if [[ -d $stage/usr/share/locale ]]; then
    find "$stage/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
fi
if [[ -d $stage/etc/dpkg/dpkg.cfg.d ]]; then
    cat >"$stage/etc/dpkg/dpkg.cfg.d/01-manta-nodoc" <<'NODOC'
# Keep the sandbox image small: no docs, man pages or translations.
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
NODOC
fi

ssh_daemon=/usr/sbin/sshd
[[ $SSH_SERVER == dropbear ]] && ssh_daemon=/usr/sbin/dropbear
for required in /sbin/manta-init "$ssh_daemon" /bin/bash /usr/bin/python3 /bin/ps /sbin/ip; do
    [[ -e $stage$required || -L $stage$required ]] || die "image tree lacks $required"
done

# ---------------------------------------------------------------------------
# Image: sparse file, ext4 with journal, filled from the tree.

tree_mb=$(($(du -sm "$stage" | cut -f1) + 1))
((tree_mb * 10 < ROOTFS_SIZE_MB * 9)) ||
    die "the tree needs ${tree_mb} MiB, too close to ROOTFS_SIZE_MB=$ROOTFS_SIZE_MB; raise ROOTFS_SIZE_MB"
log "creating ${ROOTFS_SIZE_MB} MiB ext4 image from a ${tree_mb} MiB tree"
rm -f "$ROOTFS.tmp"
truncate -s "${ROOTFS_SIZE_MB}M" "$ROOTFS.tmp"
if ! mkfs.ext4 -q -F -L manta-root -m 0 -E lazy_itable_init=0,lazy_journal_init=1 \
    -d "$stage" "$ROOTFS.tmp" >"$BUILD_DIR/mkfs.log" 2>&1; then
    cat "$BUILD_DIR/mkfs.log" >&2
    die "mkfs.ext4 -d failed"
fi
e2fsck -fn "$ROOTFS.tmp" >"$BUILD_DIR/e2fsck.log" 2>&1 || {
    cat "$BUILD_DIR/e2fsck.log" >&2
    die "the new image fails e2fsck"
}
mv "$ROOTFS.tmp" "$ROOTFS"
printf '%s\n' "$inputs_key" >"$STAMP"

log "done: $ROOTFS ($(file_sizes "$ROOTFS"))"
log "keys: $ARTIFACTS_DIR/sandbox_key(.pub), host key $ARTIFACTS_DIR/ssh_host_ed25519_key.pub"
log "total time $(($(date +%s) - started)) s"
