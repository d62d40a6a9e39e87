#!/usr/bin/env bash
# Installs the Debian peers the tests talk to, only when one is missing.
set -euo pipefail
need=()
command -v Orthanc  >/dev/null || need+=(orthanc)
command -v storescu >/dev/null || need+=(dcmtk)
command -v dsrdump  >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v node     >/dev/null || need+=(nodejs)  # runs OHIF's own SR/SEG code (tests/js)
command -v npm      >/dev/null || need+=(npm)
command -v chromium >/dev/null || need+=(chromium)  # the UI test drives Debian's Chromium; never `playwright install`
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing Debian peers: ${need[*]}" >&2
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}"
