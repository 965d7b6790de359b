#!/usr/bin/env bash
# Headless Chromium for the report.html browser test (tests/test_report_html.py): prints the browser's path,
# installing Debian's `chromium` package with apt-get on first use (as scripts/slurm/local_cluster.sh does for
# slurm). Nothing else uses a browser; training never needs it.
#
# Usage: bash scripts/install_chromium.sh          prints e.g. /usr/bin/chromium (exit 0), or why not (exit 1)
#
# Environment knobs (optional):
#   CHROMIUM_BIN        use this browser binary instead of searching PATH
#   CHROMIUM_APT_LOG    apt-get output                                   [/tmp/attent-chromium-apt.log]
#   CHROMIUM_NO_INSTALL=1  only look for a browser, never run apt-get
set -euo pipefail

APT_LOG="${CHROMIUM_APT_LOG:-/tmp/attent-chromium-apt.log}"

log() { printf '[install-chromium] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Prints the first runnable browser: $CHROMIUM_BIN, else Debian's chromium, else a Chrome on PATH.
find_browser() {
  local candidate
  if [[ -n "${CHROMIUM_BIN:-}" ]]; then
    [[ -x "${CHROMIUM_BIN}" ]] || command -v "${CHROMIUM_BIN}" >/dev/null 2>&1 || return 1
    command -v "${CHROMIUM_BIN}"
    return 0
  fi
  for candidate in chromium chromium-browser google-chrome-stable google-chrome; do
    if command -v "${candidate}" >/dev/null 2>&1; then
      command -v "${candidate}"
      return 0
    fi
  done
  return 1
}

if browser="$(find_browser)"; then
  echo "${browser}"
  exit 0
fi
[[ -z "${CHROMIUM_BIN:-}" ]] || die "CHROMIUM_BIN=${CHROMIUM_BIN} is not an executable"
[[ "${CHROMIUM_NO_INSTALL:-0}" != 1 ]] || die "no chromium on PATH (CHROMIUM_NO_INSTALL=1: not installing)"
command -v apt-get >/dev/null 2>&1 || die "no chromium on PATH and no apt-get to install it"
if [[ "$(id -u)" == 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  die "no chromium on PATH and not root (nor passwordless sudo): install the 'chromium' package"
fi

log "installing chromium with apt-get (one-off, a few minutes)..."
# A lock file keeps two test processes from running apt-get at once; the second waits, then finds the browser.
exec 9>"${APT_LOG}.lock"
flock 9
if browser="$(find_browser)"; then
  echo "${browser}"
  exit 0
fi
rc=0
{
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
      chromium fonts-dejavu-core >"${APT_LOG}" 2>&1
} || rc=$?
if [[ "${rc}" != 0 ]]; then
  tail -n 30 "${APT_LOG}" >&2 || true
  die "apt-get install chromium failed (rc=${rc}); full log in ${APT_LOG}"
fi
browser="$(find_browser)" || die "apt-get installed chromium but no chromium is on PATH"
log "installed: $("${browser}" --version 2>/dev/null || echo '?')"
echo "${browser}"
