#!/usr/bin/env bash
# Install BART (the Berkeley Advanced Reconstruction Toolbox) from Debian's packages, once: its
# `ecalib` cross-checks our ESPIRiT coil maps in the tests. Idempotent; needs root (or sudo).
set -euo pipefail
if command -v bart >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends bart >/dev/null || true
command -v bart >/dev/null
