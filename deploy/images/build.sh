#!/usr/bin/env bash
# Build the cbec-ai container images (`make images`): one per service and the gateway, plus the -gpu
# variant of each model service that has one. Uses buildah, podman or docker, whichever exists
# (CBEC_IMAGE_BUILDER=buildah|podman|docker chooses).
#
# usage: deploy/images/build.sh [--registry R] [--tag T] [--cpu-only|--gpu-only] [--push] [--dry-run] [SERVICE...]
#   SERVICE   a name of the service registry (default: every one whose code exists)
#   --registry  image prefix (default $CBEC_REGISTRY or registry.example.com/cbec), as the chart's image.registry
#   --tag       image tag (default: the project version in pyproject.toml, the chart's appVersion)
#   --dry-run   print the commands instead of running them
#
# The build context is staged under build/images/context with only what the images need (pyproject,
# constraints, README, protos, services, gateway), so local virtual environments and models never
# reach the builder.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
IMAGES="$ROOT/deploy/images"
# The services and where their code lives come from the service registry (plain Python, no packages).
registry() { (cd "$ROOT" && "${PYTHON:-python3}" -m services.runtime.registry "$@"); }
mapfile -t ALL_SERVICES < <(registry names)
((${#ALL_SERVICES[@]})) || { echo "build.sh: cannot read the service registry" >&2; exit 2; }

registry="${CBEC_REGISTRY:-registry.example.com/cbec}"
tag=""
variants="cpu gpu"
push=0
dry_run=0
services=()
while (($#)); do
    case "$1" in
        --registry) registry="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --cpu-only) variants="cpu"; shift ;;
        --gpu-only) variants="gpu"; shift ;;
        --push) push=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
        *) services+=("$1"); shift ;;
    esac
done

if [[ -z "$tag" ]]; then
    tag="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)"
    [[ -n "$tag" ]] || { echo "build.sh: cannot read the version from pyproject.toml; pass --tag" >&2; exit 2; }
fi

code_dir() { echo "$ROOT/$(registry show "$1" | sed -n 's/^code_dir=//p')"; }

explicit=1
if ((${#services[@]} == 0)); then
    explicit=0
    for s in "${ALL_SERVICES[@]}"; do
        [[ -f "$(code_dir "$s")/__main__.py" ]] && services+=("$s")
    done
fi
for s in "${services[@]}"; do
    if [[ ! -f "$IMAGES/$s/Containerfile" ]]; then
        echo "build.sh: no Containerfile for '$s' (have: ${ALL_SERVICES[*]})" >&2
        exit 2
    fi
    if [[ ! -f "$(code_dir "$s")/__main__.py" && $dry_run == 0 ]]; then
        echo "build.sh: $s has no code yet ($(code_dir "$s")/__main__.py is missing)" >&2
        exit 2
    fi
done
if ((${#services[@]} == 0)); then
    echo "build.sh: no service has code yet (looked for gateway/__main__.py and services/*/__main__.py)" >&2
    exit $((explicit ? 2 : 0))
fi

builder="${CBEC_IMAGE_BUILDER:-}"
if [[ -z "$builder" ]]; then
    for candidate in buildah podman docker; do
        if command -v "$candidate" >/dev/null 2>&1; then builder="$candidate"; break; fi
    done
fi
[[ -n "$builder" ]] || { echo "build.sh: needs buildah, podman or docker" >&2; exit 1; }

run() {
    if ((dry_run)); then
        printf '%q ' "$@"; echo
    else
        "$@"
    fi
}

context="$ROOT/build/images/context"
stage_context() {
    rm -rf "$context"
    mkdir -p "$context"
    (
        cd "$ROOT"
        paths=(pyproject.toml constraints.txt README.md protos services)
        [[ -d gateway ]] && paths+=(gateway)
        tar --exclude='__pycache__' --exclude='*.pyc' -cf - "${paths[@]}"
    ) | tar -xf - -C "$context"
}

build_one() {  # service, containerfile, image
    case "$builder" in
        buildah) run buildah bud --layers --file "$2" --tag "$3" "$context" ;;
        *) run "$builder" build --file "$2" --tag "$3" "$context" ;;
    esac
    if ((push)); then run "$builder" push "$3"; fi
}

if ((dry_run)); then echo "# builder: $builder; context: $context"; else stage_context; fi
for s in "${services[@]}"; do
    for variant in $variants; do
        if [[ "$variant" == cpu ]]; then
            build_one "$s" "$IMAGES/$s/Containerfile" "$registry/cbec-$s:$tag"
        elif [[ -f "$IMAGES/$s/Containerfile.gpu" ]]; then
            build_one "$s" "$IMAGES/$s/Containerfile.gpu" "$registry/cbec-$s:$tag-gpu"
        fi
    done
done
