#!/usr/bin/env bash
# Headless Chromium for the report.html browser test (tests/test_report_html.py): prints the browser's path,
# installing Debian's `chromium` package with scripts/install_system_packages.sh on first use. Nothing else uses
# a browser; training never needs it.
#
# Usage: bash scripts/install_chromium.sh          prints e.g. /usr/bin/chromium (exit 0), or why not (exit 1)
#
# Environment knobs (optional):
#   CHROMIUM_BIN        use this browser binary instead of searching PATH
#   CHROMIUM_NO_INSTALL=1  only look for a browser, never run apt-get
set -euo pipefail

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
# The one installer of system packages: it waits for an install already under way (.ci/run starts one in the
# background), then installs chromium if it is still missing.
bash "$(dirname "${BASH_SOURCE[0]}")/install_system_packages.sh" chromium >&2 ||
  die "could not install chromium (scripts/install_system_packages.sh chromium failed)"
browser="$(find_browser)" || die "chromium was installed but no chromium is on PATH"
echo "${browser}"
