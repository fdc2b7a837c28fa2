#!/usr/bin/env bash
# Install Orthanc and its DICOMweb plugin from Debian's packages (the test PACS), once.
# Idempotent; needs root (or sudo). The package's own post-install service start may fail
# in a container without systemd: that is harmless, the tests start Orthanc themselves.
set -euo pipefail
if command -v Orthanc >/dev/null 2>&1 && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null || true
command -v Orthanc >/dev/null && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]
