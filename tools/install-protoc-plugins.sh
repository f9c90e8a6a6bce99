#!/usr/bin/env bash
# Install the local protoc plugins that buf.gen.yaml runs (no remote plugins) into build/tools:
#   build/tools/bin/protoc-gen-go        Debian package protoc-gen-go (google.golang.org/protobuf, APIv2)
#   build/tools/bin/protoc-gen-go-grpc   Debian package protoc-gen-go-grpc
#   build/tools/bin/protoc-gen-es        npm @bufbuild/protoc-gen-es (TypeScript), in build/tools/protoc-gen-es
#   build/tools/bin/protoc               the virtualenv's grpc_tools.protoc (the compiler `make protos` uses),
#                                        for buf's protoc_builtin python and pyi plugins
#   build/tools/bin/protoc-gen-grpc_python  the gRPC Python generator of that same protoc, as a plugin
# The Go plugins are static binaries taken out of their .deb (`apt-get download` + `dpkg-deb -x`, like
# the other install scripts); nothing is installed system-wide and no Go toolchain is needed.
# Idempotent: does nothing when the marker says these versions are installed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${CBEC_TOOLS_DIR:-$ROOT/build/tools}"
# 2.13.0: the last protoc-gen-es whose engines accept Node 20 (Debian 12's nodejs); 2.14 wants Node 22.
ES_VERSION="2.13.0"
MARKER="protoc-gen-go protoc-gen-go-grpc es=$ES_VERSION protoc=grpc_tools grpc_python=1"
STAMP="$DEST/.protoc-plugins"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$MARKER" ]] \
    && [[ -x "$DEST/bin/protoc-gen-go" && -x "$DEST/bin/protoc-gen-go-grpc" ]] \
    && [[ -x "$DEST/bin/protoc-gen-es" && -x "$DEST/bin/protoc" && -x "$DEST/bin/protoc-gen-grpc_python" ]]; then
    exit 0
fi
command -v npm >/dev/null || { echo "install-protoc-plugins: npm is needed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$DEST/bin"

go_version="$("$ROOT/tools/_deb_extract.sh" protoc-gen-go usr/bin/protoc-gen-go)"
grpc_version="$("$ROOT/tools/_deb_extract.sh" protoc-gen-go-grpc usr/bin/protoc-gen-go-grpc)"

# protoc-gen-es in its own folder (it needs its node_modules next to it); bin/ gets a relative link.
es_dir="$DEST/protoc-gen-es"
rm -rf "$es_dir"
mkdir -p "$es_dir"
echo '{"private": true}' >"$es_dir/package.json"
npm install --silent --no-audit --no-fund --prefix "$es_dir" "@bufbuild/protoc-gen-es@$ES_VERSION" >/dev/null
ln -sfn ../protoc-gen-es/node_modules/.bin/protoc-gen-es "$DEST/bin/protoc-gen-es"

# protoc for buf's protoc_builtin plugins: grpc_tools.protoc from the virtualenv, so buf generate writes
# the same Python as `make protos` (and its built-in grpc_python generator needs no separate plugin).
cat >"$DEST/bin/protoc" <<EOF
#!/usr/bin/env bash
# grpc_tools.protoc of $ROOT/.venv (written by tools/install-protoc-plugins.sh).
exec "$ROOT/.venv/bin/python" -m grpc_tools.protoc "\$@"
EOF
chmod 0755 "$DEST/bin/protoc"

# protoc-gen-grpc_python: grpc_tools has the gRPC Python generator only built into its protoc, not as a
# plugin, and buf runs only protoc's own generators as protoc_builtin. This plugin hands buf's request
# to that protoc (as a descriptor set) and returns what its --grpc_python_out wrote.
cat >"$DEST/bin/protoc-gen-grpc_python" <<PLUGIN
#!$ROOT/.venv/bin/python
"""protoc plugin: grpc_tools.protoc's built-in gRPC Python generator (tools/install-protoc-plugins.sh)."""
import pathlib
import sys
import tempfile

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc

request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
response = plugin_pb2.CodeGeneratorResponse(
    supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
)
with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    files = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
    (work / "in.binpb").write_bytes(files.SerializeToString())
    out = work / "out"
    out.mkdir()
    target = f"{request.parameter}:{out}" if request.parameter else str(out)
    argv = ["protoc", f"--descriptor_set_in={work / 'in.binpb'}", f"--grpc_python_out={target}"]
    if protoc.main([*argv, *request.file_to_generate]) != 0:
        response.error = "grpc_tools.protoc --grpc_python_out failed (its message is above)"
    else:
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            response.file.add(name=path.relative_to(out).as_posix(), content=path.read_text())
sys.stdout.buffer.write(response.SerializeToString())
PLUGIN
chmod 0755 "$DEST/bin/protoc-gen-grpc_python"

echo "$MARKER" >"$STAMP"
echo "protoc-gen-go $go_version, protoc-gen-go-grpc $grpc_version," \
    "protoc-gen-es $("$DEST/bin/protoc-gen-es" --version | awk '{print $NF}'), $("$DEST/bin/protoc" --version) -> $DEST/bin"
