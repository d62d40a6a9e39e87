#!/usr/bin/env bash
# Installs the Debian peers the tests talk to, only when one is missing.
set -euo pipefail
need=()
command -v Orthanc  >/dev/null || need+=(orthanc)
command -v storescu >/dev/null || need+=(dcmtk)
command -v dsrdump  >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v pdftotext >/dev/null || need+=(poppler-utils)  # reads the PDF report back (pdftotext, pdftoppm, pdfinfo)
# DejaVu Sans: the PDF report's font (outputs.report_pdf.font_dir); the node needs it at run time too.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf ] || need+=(fonts-dejavu-core)
# Orthanc's DICOMweb plugin: the STOW-RS destination and a second STOW-RS sender in the tests.
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v openssl  >/dev/null || need+=(openssl)  # makes the DICOM TLS tests' certificates
command -v ojph_compress >/dev/null || need+=(openjph-tools)  # HTJ2K test variants
command -v node     >/dev/null || need+=(nodejs)  # runs OHIF's own SR/SEG code (tests/js)
command -v npm      >/dev/null || need+=(npm)
command -v chromium >/dev/null || need+=(chromium)  # the UI test drives Debian's Chromium; never `playwright install`
# The audit trail's syslog collector, plain TCP and TLS (rsyslog's OpenSSL stream driver).
command -v rsyslogd >/dev/null || [ -x /usr/sbin/rsyslogd ] || need+=(rsyslog)
compgen -G '/usr/lib/*/rsyslog/lmnsd_ossl.so' >/dev/null || need+=(rsyslog-openssl)
# PostgreSQL: the machine's server on 127.0.0.1:5432 when one answers; otherwise
# the tests build a throwaway cluster (tests/postgres_peer.py) from Debian's binaries.
if ! timeout 5 bash -c '</dev/tcp/127.0.0.1/5432' 2>/dev/null && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  need+=(postgresql)
fi
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing Debian peers: ${need[*]}" >&2
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}"
