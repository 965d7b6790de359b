#!/usr/bin/env bash
# The Debian packages some tests and tools need, installed with apt-get: a real SLURM (`slurm-wlm`, `munge`) for
# tests/test_slurm.py, a headless browser (`chromium`) for tests/test_report_html.py, and a daemonless image
# builder (`buildah`, with `debootstrap` for a locally made base) for scripts/build_image.sh. Training never needs
# them.
#
# Usage: bash scripts/install_system_packages.sh [slurm] [chromium] [buildah]     (no argument: slurm chromium)
#
# Idempotent: a set whose programs are already on PATH is skipped, and nothing runs apt-get then. One lock
# (/tmp/attent-apt.lock) serialises every caller: .ci/run starts this script in the background while the main
# job runs, and scripts/slurm/local_cluster.sh and scripts/install_chromium.sh call it too, so a test that needs a
# package waits for the background install instead of racing it for apt's lock.
#
# Environment knobs (optional):
#   ATTENT_APT_LOG   apt-get output   [/tmp/attent-apt.log]
set -euo pipefail

APT_LOG="${ATTENT_APT_LOG:-/tmp/attent-apt.log}"
LOCK="/tmp/attent-apt.lock"

log() { printf '[install-system-packages] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The programs that prove a set is installed, and the Debian packages that bring them.
programs_of() {
  case "$1" in
    slurm) echo "slurmctld slurmd munged sinfo sbatch scontrol" ;;
    chromium) echo "chromium" ;;
    buildah) echo "buildah debootstrap" ;;
    *) die "unknown package set '$1' (expected slurm, chromium or buildah)" ;;
  esac
}
packages_of() {
  case "$1" in
    slurm) echo "slurm-wlm munge" ;;
    chromium) echo "chromium fonts-dejavu-core" ;;
    # No runtime (crun/runc) or fuse-overlayfs: build_image.sh runs buildah as root with chroot isolation and vfs.
    buildah) echo "buildah debootstrap debian-archive-keyring" ;;
  esac
}

installed() {
  local program
  for program in $(programs_of "$1"); do
    command -v "${program}" >/dev/null 2>&1 || [[ -x "/usr/sbin/${program}" ]] || return 1
  done
}

sets=("$@")
((${#sets[@]})) || sets=(slurm chromium)
for set in "${sets[@]}"; do programs_of "${set}" >/dev/null; done # reject unknown names before waiting

exec 9>"${LOCK}"
flock 9
missing=()
for set in "${sets[@]}"; do
  if installed "${set}"; then
    log "${set}: already installed"
  else
    missing+=("${set}")
  fi
done
((${#missing[@]})) || exit 0

[[ "$(id -u)" == 0 ]] || die "missing ${missing[*]} and not root: install the packages $(for s in "${missing[@]}"; do packages_of "${s}"; done | xargs)"
command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"

packages=()
for set in "${missing[@]}"; do
  read -r -a names <<<"$(packages_of "${set}")"
  packages+=("${names[@]}")
done
log "installing ${packages[*]} with apt-get (one-off, a minute or two)..."
# Keep the packages' maintainer scripts from starting system services (munge, slurm): tests start their own.
policy=/usr/sbin/policy-rc.d
tmp_policy=0
if [[ ! -e "${policy}" ]]; then
  printf '#!/bin/sh\nexit 101\n' >"${policy}"
  chmod +x "${policy}"
  tmp_policy=1
fi
start=${SECONDS}
rc=0
{
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends "${packages[@]}"
} >"${APT_LOG}" 2>&1 || rc=$?
if [[ "${tmp_policy}" == 1 ]]; then rm -f "${policy}"; fi
if [[ "${rc}" != 0 ]]; then
  tail -n 30 "${APT_LOG}" >&2 || true
  die "apt-get install ${packages[*]} failed (rc=${rc}); full log in ${APT_LOG}"
fi
for set in "${missing[@]}"; do
  installed "${set}" || die "apt-get installed $(packages_of "${set}") but $(programs_of "${set}") are not all on PATH"
done
log "installed ${packages[*]} in $((SECONDS - start)) s"
