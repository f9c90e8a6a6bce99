#!/usr/bin/env bash
# Install rclone (Debian package `rclone`) into build/tools/bin; the chart's model-fetch init container
# runs rclone, and the tests run the same script against a local "object store" directory.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${CBEC_TOOLS_DIR:-$ROOT/build/tools}"
if [[ -x "$DEST/bin/rclone" ]]; then
    exit 0
fi
version="$("$ROOT/tools/_deb_extract.sh" rclone usr/bin/rclone)"
echo "rclone $version -> $DEST/bin"
