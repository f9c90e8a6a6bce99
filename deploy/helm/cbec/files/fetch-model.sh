# Init container: copy one model version of one service from the object store into the pod's model
# store, in the layout the service reads: $CBEC_MODELS_DIR/$CBEC_SERVICE/<version>/manifest.json.
# The pinned version ($CBEC_MODEL_VERSION) or, when empty, the newest version that has a manifest.
# A version is copied into a hidden folder and renamed into place, so a partial copy is never loaded.
set -eu
src="${CBEC_MODELS_URL%/}/${CBEC_SERVICE}"
store="${CBEC_MODELS_DIR}/${CBEC_SERVICE}"
version="${CBEC_MODEL_VERSION:-}"
has_manifest() { rclone lsf --files-only "$src/$1" 2>/dev/null | grep -qx manifest.json; }
if [ -z "$version" ]; then
  for candidate in $(rclone lsf --dirs-only "$src" | sed 's#/$##' | grep -E '^[0-9]{8}T[0-9]{6,12}Z$' | sort -r); do
    if has_manifest "$candidate"; then version="$candidate"; break; fi
    echo "skipping $candidate: no manifest.json" >&2
  done
  if [ -z "$version" ]; then echo "no model version with a manifest.json under $src" >&2; exit 1; fi
elif ! has_manifest "$version"; then
  echo "pinned model version $version not found (no $src/$version/manifest.json)" >&2; exit 1
fi
if [ -f "$store/$version/manifest.json" ]; then echo "model $version already present"; exit 0; fi
mkdir -p "$store"
rm -rf "$store/.partial-$version"
rclone copy --checksum "$src/$version" "$store/.partial-$version"
mv "$store/.partial-$version" "$store/$version"
echo "fetched $CBEC_SERVICE model $version from $src"
