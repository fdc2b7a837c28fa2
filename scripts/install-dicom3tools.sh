#!/usr/bin/env bash
# Install dicom3tools from Debian's packages, once: its `dciodvfy`
# validates the DICOM series we write, in the tests. Idempotent; needs root (or sudo).
set -euo pipefail
if command -v dciodvfy >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends dicom3tools >/dev/null || true
command -v dciodvfy >/dev/null
