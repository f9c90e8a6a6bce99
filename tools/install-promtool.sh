#!/usr/bin/env bash
# Install prometheus and promtool (Debian package `prometheus`) into build/tools/bin, without
# installing the package system-wide (no service, no user, no dependencies: the binaries are static).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${CBEC_TOOLS_DIR:-$ROOT/build/tools}"
if [[ -x "$DEST/bin/promtool" && -x "$DEST/bin/prometheus" ]]; then
    exit 0
fi
version="$("$ROOT/tools/_deb_extract.sh" prometheus usr/bin/prometheus usr/bin/promtool)"
echo "prometheus $version -> $DEST/bin"
