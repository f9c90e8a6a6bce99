#!/usr/bin/env bash
# Shared helper: download one Debian package with apt-get (no install, no root needed for the
# download itself when the package lists are present) and extract chosen binaries into build/tools/bin.
# Usage: _deb_extract.sh PACKAGE BINARY...   (each BINARY is a path inside the package, e.g. usr/bin/promtool)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${CBEC_TOOLS_DIR:-$ROOT/build/tools}"
package="$1"
shift
command -v apt-get >/dev/null || { echo "$package: apt-get is needed (a Debian-based machine)" >&2; exit 1; }
mkdir -p "$DEST/bin" "$DEST/debs"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
download() { (cd "$work" && apt-get download -q "$package" >/dev/null 2>&1); }
if ! download; then
    # The package lists may be missing or stale on a fresh machine; refresh once (root only).
    if [[ "$(id -u)" == 0 ]]; then
        apt-get update -qq >/dev/null
        download || { echo "$package: apt-get download failed" >&2; exit 1; }
    else
        echo "$package: apt-get download failed; run 'sudo apt-get update' and retry" >&2
        exit 1
    fi
fi
deb="$(ls "$work"/*.deb)"
dpkg-deb -x "$deb" "$work/root"
for binary in "$@"; do
    install -m 0755 "$work/root/$binary" "$DEST/bin/$(basename "$binary")"
done
cp "$deb" "$DEST/debs/"
dpkg-deb -f "$deb" Version
