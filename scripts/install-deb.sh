#!/usr/bin/env bash
# Install a tool from Debian's packages, once: `install-deb.sh COMMAND PACKAGE` installs
# PACKAGE unless COMMAND is already on the PATH (bart for BART's ecalib cross-check of our
# ESPIRiT maps; dciodvfy from dicom3tools, which validates the DICOM we write).
# Idempotent; needs root (or sudo).
set -euo pipefail
command="$1"
package="$2"
if command -v "$command" >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$package" >/dev/null || true
command -v "$command" >/dev/null
