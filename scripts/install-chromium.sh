#!/usr/bin/env bash
# Install Debian's headless Chromium and its WebDriver (the web console's end-to-end tests and
# the documentation screenshots), once. Idempotent; needs root (or sudo).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null || true
command -v chromium >/dev/null && command -v chromedriver >/dev/null
