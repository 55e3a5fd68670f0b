# shellcheck shell=bash
# Shared helpers for the guest build scripts. Sourced, never executed.
# Callers set `set -euo pipefail` themselves.

# Repository root, resolved from this file's location so scripts work from any cwd.
MANTA_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '[%s] %s\n' "${MANTA_LOG_TAG:-manta}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${MANTA_LOG_TAG:-manta}" "$*" >&2; exit 1; }

# Print one knob as "NAME=value" so every run shows the settings it used.
show_knob() { log "  $1=${!1}"; }

require_root() {
    [[ $(id -u) -eq 0 ]] || die "$1 needs root (run it as root or with sudo)"
}

# ensure_tools "apt-pkg:cmd ..." installs the packages of missing commands with
# apt-get when AUTO_INSTALL_DEPS=1, else fails naming the missing command.
ensure_tools() {
    local missing_pkgs=() missing_cmds=() pair pkg cmd
    for pair in "$@"; do
        pkg="${pair%%:*}"
        cmd="${pair#*:}"
        if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! -e $cmd ]]; then
            missing_pkgs+=("$pkg")
            missing_cmds+=("$cmd")
        fi
    done
    [[ ${#missing_pkgs[@]} -eq 0 ]] && return 0
    if [[ ${AUTO_INSTALL_DEPS:-1} != 1 ]]; then
        die "missing tools: ${missing_cmds[*]} (install: apt-get install ${missing_pkgs[*]}, or set AUTO_INSTALL_DEPS=1)"
    fi
    require_root "installing ${missing_pkgs[*]}"
    log "installing missing packages: ${missing_pkgs[*]}"
    apt_install "${missing_pkgs[@]}"
}

# apt_install PKG... installs packages, refreshing the index once if needed.
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -q --no-install-recommends "$@" || die "apt-get install $* failed"
    fi
}

# Absolute form of a path that may be relative to the repo root.
repo_path() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$MANTA_REPO_ROOT/$1" ;;
    esac
}

# Content hash of several files (paths are not part of it, so clones agree).
sha256_of() {
    local f
    for f in "$@"; do sha256sum <"$f"; done | sha256sum | cut -d' ' -f1
}

# Human readable "apparent / on-disk" size of a file.
file_sizes() {
    local apparent ondisk
    apparent=$(du -h --apparent-size "$1" | cut -f1)
    ondisk=$(du -h "$1" | cut -f1)
    printf '%s apparent, %s on disk' "$apparent" "$ondisk"
}
