#!/usr/bin/env bash
# Install PostgreSQL 15 and Redis 7 (Debian packages) into build/tools/stores, without installing
# anything system-wide: `apt-get download` + `dpkg-deb -x` into one folder, the root of the extracted
# tree. The tests (tests/stores.py) and benchmarks run the servers from there with
#   LD_LIBRARY_PATH=<root>/usr/lib/x86_64-linux-gnu
#   <root>/usr/lib/postgresql/15/bin/{initdb,postgres,pg_ctl}   <root>/usr/bin/{redis-server,redis-cli}
# libnss-wrapper is there so initdb can run as an unprivileged uid with no passwd entry (it refuses root).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${CBEC_TOOLS_DIR:-$ROOT/build/tools}"
STORES="$DEST/stores"
PACKAGES=(postgresql-15 libpq5 redis-server redis-tools liblzf1 libjemalloc2 libnss-wrapper)
LIBDIR=usr/lib/x86_64-linux-gnu
PGBIN=usr/lib/postgresql/15/bin
BINARIES=("$PGBIN/initdb" "$PGBIN/postgres" "$PGBIN/pg_ctl" usr/bin/redis-server usr/bin/redis-cli)

# Libraries the binaries link against that a slim Debian base may lack, and their packages; fetched
# only when ldd reports them missing.
declare -A LIB_PACKAGE=(
    [libicuuc.so.72]=libicu72 [libicui18n.so.72]=libicu72 [libicudata.so.72]=libicu72
    [libxml2.so.2]=libxml2 [libldap-2.5.so.0]=libldap-2.5-0 [liblber-2.5.so.0]=libldap-2.5-0
    [libsasl2.so.2]=libsasl2-2 [libgssapi_krb5.so.2]=libgssapi-krb5-2 [libkrb5.so.3]=libkrb5-3
    [libk5crypto.so.3]=libk5crypto3 [libkrb5support.so.0]=libkrb5support0 [libkeyutils.so.1]=libkeyutils1
    [libcom_err.so.2]=libcom-err2 [liblz4.so.1]=liblz4-1 [libzstd.so.1]=libzstd1 [libssl.so.3]=libssl3
    [libcrypto.so.3]=libssl3 [libpam.so.0]=libpam0g [libsystemd.so.0]=libsystemd0
    [libatomic.so.1]=libatomic1 [libstdc++.so.6]=libstdc++6 [libgcc_s.so.1]=libgcc-s1
    [libuuid.so.1]=libuuid1 [libselinux.so.1]=libselinux1 [libaudit.so.1]=libaudit1
    [libcap-ng.so.0]=libcap-ng0 [libgcrypt.so.20]=libgcrypt20 [libgpg-error.so.0]=libgpg-error0
    [liblzma.so.5]=liblzma5 [libz.so.1]=zlib1g [libcap.so.2]=libcap2
)

versions() {
    echo "$(LD_LIBRARY_PATH="$STORES/$LIBDIR" "$STORES/$PGBIN/postgres" --version)" \
        "| $(LD_LIBRARY_PATH="$STORES/$LIBDIR" "$STORES/usr/bin/redis-server" --version | cut -d' ' -f1-3)" \
        "-> $STORES"
}

# Idempotent: the marker holds the package list, so adding a package re-extracts.
if [[ -f "$STORES/.complete" && "$(cat "$STORES/.complete")" == "${PACKAGES[*]}" ]]; then
    exit 0
fi

command -v apt-get >/dev/null || { echo "stores: apt-get is needed (a Debian-based machine)" >&2; exit 1; }
mkdir -p "$DEST"
work="$(mktemp -d "$DEST/.stores-XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/root"

refreshed=0
download() {  # download PACKAGE...: into $work/debs, refreshing the package lists once (root only)
    if (cd "$work/debs" && apt-get download -q "$@" >"$work/apt.log" 2>&1); then
        return 0
    fi
    if [[ "$(id -u)" == 0 && "$refreshed" == 0 ]]; then
        refreshed=1
        apt-get update -qq >/dev/null
        (cd "$work/debs" && apt-get download -q "$@" >"$work/apt.log" 2>&1) && return 0
    fi
    cat "$work/apt.log" >&2
    if [[ "$(id -u)" != 0 ]]; then
        echo "stores: apt-get download $* failed; run 'sudo apt-get update' and retry" >&2
    else
        echo "stores: apt-get download $* failed" >&2
    fi
    exit 1
}
extract() {
    local deb
    for deb in "$work"/debs/*.deb; do
        dpkg-deb -x "$deb" "$work/root"
    done
}

download "${PACKAGES[@]}"
extract
for binary in "${BINARIES[@]}"; do
    [[ -x "$work/root/$binary" ]] || { echo "stores: $binary missing from the packages" >&2; exit 1; }
done

# Whatever the binaries need that this machine lacks: fetch it too (one more round), then recheck.
missing_libs() {
    local binary
    for binary in "${BINARIES[@]}"; do
        LD_LIBRARY_PATH="$work/root/$LIBDIR" ldd "$work/root/$binary" 2>/dev/null | awk '/not found/ {print $1}'
    done | sort -u
}
missing="$(missing_libs)"
if [[ -n "$missing" ]]; then
    extra=()
    for lib in $missing; do
        package="${LIB_PACKAGE[$lib]:-}"
        [[ -n "$package" ]] || { echo "stores: $lib is missing and no package is known for it" >&2; exit 1; }
        extra+=("$package")
    done
    mapfile -t extra < <(printf '%s\n' "${extra[@]}" | sort -u)
    echo "stores: also fetching ${extra[*]} (missing: $(echo "$missing" | tr '\n' ' '))"
    rm -f "$work"/debs/*.deb
    download "${extra[@]}"
    extract
    missing="$(missing_libs)"
    [[ -z "$missing" ]] || { echo "stores: still missing: $missing" >&2; exit 1; }
fi

echo "${PACKAGES[*]}" >"$work/root/.complete"
rm -rf "$STORES"
mv "$work/root" "$STORES"
chmod 0755 "$STORES"
versions
