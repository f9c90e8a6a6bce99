#!/usr/bin/env bash
# Install headless Chromium (Debian packages) into build/tools/chromium for the browser tests, without
# installing anything system-wide: `apt-get download` + `dpkg-deb -x`, like install-stores.sh.
# Playwright's own browser download cannot run here (no internet beyond the package registries), so
# tests/web launches this Chromium through `executable_path`.
#   build/tools/chromium/   chromium, chromium-common, every package `apt-get install -s` says this machine
#                           lacks for them, and two font packages (below)
#   build/tools/bin/chromium  wrapper: sets LD_LIBRARY_PATH and FONTCONFIG_FILE, execs the real binary
# Fonts: the browser sees only the fonts installed here (DejaVu for Latin/Cyrillic/Greek, WenQuanYi Micro
# Hei for Chinese, Japanese and Korean), never the machine's, so text renders on a base image with no
# fonts and screenshots look the same on every machine. fonts-noto-cjk would be the nicer CJK face but
# is a 57 MB download; WenQuanYi Micro Hei is 1.6 MB.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${CBEC_TOOLS_DIR:-$ROOT/build/tools}"
CHROME="$DEST/chromium"
WRAPPER="$DEST/bin/chromium"
FONT_PACKAGES=(fonts-dejavu-core fonts-wqy-microhei)
BINARY=usr/lib/chromium/chromium
# Bump when the layout of build/tools/chromium changes, so an older tree is rebuilt.
MARKER="layout=1 fonts=${FONT_PACKAGES[*]}"

# Idempotent: a complete tree with the same layout and a wrapper is left alone.
if [[ -f "$CHROME/.complete" && "$(cat "$CHROME/.complete")" == "$MARKER" && -x "$WRAPPER" ]]; then
    exit 0
fi

for tool in apt-get dpkg-deb ldd; do
    command -v "$tool" >/dev/null || { echo "chromium: $tool is needed (a Debian-based machine)" >&2; exit 1; }
done
started=$SECONDS
mkdir -p "$DEST/bin"
work="$(mktemp -d "$DEST/.chromium-XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/root"

refreshed=0
refresh() {  # apt-get update once, when root; otherwise say what to do
    if [[ "$(id -u)" == 0 && "$refreshed" == 0 ]]; then
        refreshed=1
        echo "chromium: refreshing the package lists (apt-get update)"
        apt-get update -qq >/dev/null
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || echo "chromium: run 'sudo apt-get update' and retry" >&2
    return 1
}

# What this machine lacks for chromium: the packages a real install would add. chromium and
# chromium-common are always taken (they may be installed system-wide, and then are not listed).
plan() { apt-get install -s --no-install-recommends chromium 2>"$work/apt.log" | awk '$1 == "Inst" {print $2}'; }
if ! apt-cache show chromium >/dev/null 2>&1; then
    refresh && apt-cache show chromium >/dev/null 2>&1 || {
        echo "chromium: the package lists have no chromium package" >&2
        exit 1
    }
fi
packages="$(plan)" || {
    cat "$work/apt.log" >&2
    echo "chromium: apt-get install -s --no-install-recommends chromium failed" >&2
    exit 1
}
mapfile -t packages < <(printf '%s\n' $packages chromium chromium-common "${FONT_PACKAGES[@]}" | sort -u)
echo "chromium: downloading ${#packages[@]} packages: ${packages[*]}"

download() { (cd "$work/debs" && apt-get download -q "${packages[@]}" >"$work/apt.log" 2>&1); }
if ! download; then
    refresh && download || {
        cat "$work/apt.log" >&2
        echo "chromium: apt-get download failed" >&2
        exit 1
    }
fi
echo "chromium: $(du -sh "$work/debs" | cut -f1) downloaded; extracting"
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
done
# Documentation and the GTK translations: nothing a headless browser reads (its own locales stay).
rm -rf "$work/debs" "$work/root/usr/share/"{doc,man,locale,lintian}
[[ -x "$work/root/$BINARY" ]] || { echo "chromium: $BINARY missing from the packages" >&2; exit 1; }

# The library path: every folder of the tree holding shared libraries (some packages use subfolders,
# e.g. pulseaudio/, and some still ship in /lib, which merged-/usr machines link to /usr/lib), relative
# to the tree. Every library the browser links against must then resolve.
libroots=(usr/lib)
[[ -d "$work/root/lib" ]] && libroots+=(lib)
mapfile -t libdirs < <(cd "$work/root" && find "${libroots[@]}" -name 'lib*.so*' -not -path '*/gtk-3.0/*' \
    -printf '%h\n' | sort -u)
libpath() {  # libpath ROOT: the folders joined with ':'
    local dir out=""
    for dir in "${libdirs[@]}"; do out+="${out:+:}$1/$dir"; done
    printf '%s' "$out"
}
LIBPATH="$(libpath "$work/root")"
missing="$(LD_LIBRARY_PATH="$LIBPATH" ldd "$work/root/$BINARY" | awk '/not found/ {print $1}' | sort -u)"
[[ -z "$missing" ]] || { echo "chromium: libraries still missing: $(echo $missing)" >&2; exit 1; }

# Fontconfig sees only the fonts of this tree; relative paths keep the tree relocatable.
mkdir -p "$work/root/etc/fonts" "$work/root/var/cache/fontconfig"
cat >"$work/root/etc/fonts/fonts.conf" <<'EOF'
<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">
<!-- Written by tools/install-chromium.sh: the browser tests' fonts, and only these. -->
<fontconfig>
  <dir prefix="relative">../../usr/share/fonts</dir>
  <cachedir prefix="relative">../../var/cache/fontconfig</cachedir>
  <alias><family>sans-serif</family><prefer><family>DejaVu Sans</family><family>WenQuanYi Micro Hei</family></prefer></alias>
  <alias><family>serif</family><prefer><family>DejaVu Serif</family><family>WenQuanYi Micro Hei</family></prefer></alias>
  <alias><family>monospace</family><prefer><family>DejaVu Sans Mono</family><family>WenQuanYi Micro Hei Mono</family></prefer></alias>
  <alias><family>system-ui</family><prefer><family>DejaVu Sans</family><family>WenQuanYi Micro Hei</family></prefer></alias>
</fontconfig>
EOF
fonts="$(find "$work/root/usr/share/fonts" -name '*.tt[fc]' | wc -l)"
[[ "$fonts" -gt 0 ]] || { echo "chromium: no fonts in ${FONT_PACKAGES[*]}" >&2; exit 1; }

echo "$MARKER" >"$work/root/.complete"
rm -rf "$CHROME"
mv "$work/root" "$CHROME"
chmod 0755 "$CHROME"
cat >"$WRAPPER.tmp" <<EOF
#!/bin/sh
# Written by tools/install-chromium.sh: runs the Chromium extracted into ../chromium.
root="\$(cd "\$(dirname "\$(readlink -f "\$0")")/../chromium" && pwd)"
export LD_LIBRARY_PATH="$(libpath '$root')\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export FONTCONFIG_FILE="\$root/etc/fonts/fonts.conf"
exec "\$root/$BINARY" "\$@"
EOF
chmod 0755 "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

# The browser must start and render a page headless (as root it needs --no-sandbox).
dom="$("$WRAPPER" --headless --no-sandbox --disable-gpu --dump-dom 'data:text/html,<p>cbec</p>' 2>"$work/run.log")" \
    && [[ "$dom" == *"<p>cbec</p>"* ]] || {
    cat "$work/run.log" >&2
    echo "chromium: $WRAPPER does not render a page headless" >&2
    exit 1
}
version="$("$WRAPPER" --version 2>/dev/null)"
echo "chromium: ${version% }, $fonts font files, $(du -sh "$CHROME" | cut -f1)" \
    "in $((SECONDS - started)) s -> $WRAPPER"
