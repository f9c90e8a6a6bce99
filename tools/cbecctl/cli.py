"""cbecctl's command line: argument parsing, cluster connection, tables and ``--json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from kubernetes import client, config

from tools.cbecctl import admin, helm
from tools.cbecctl.kube import DEFAULT_GPU_RESOURCE, NEWEST, Cbec, CbecctlError, GpuReport, ServiceStatus

EPILOG = """examples:
  cbecctl -n shop status
  cbecctl -n shop scale recommender 4
  cbecctl -n shop scale vision --min 2 --max 12        (a service with an autoscaler)
  export CBEC_GATEWAY_URL=https://api.shop.example
  cbecctl -n shop rollout-model risk 20261129T030512123456Z --api-key-file ~/.cbec/admin-key
  cbecctl -n shop rollout-model risk --unpin --api-key-file ~/.cbec/admin-key   (newest valid version)
  cbecctl -n shop pin-model risk 20261129T030512123456Z   (prints the helm upgrade that pins it)
  cbecctl -n shop restart chat
  cbecctl -n shop gpus --json

The Deployments and autoscalers belong to a Helm release: `helm upgrade` puts back whatever the chart
renders. Model versions therefore change in two ways, neither of which patches a Deployment:
  rollout-model  the model-admin API through the gateway: fast (no pod restarts), every replica within
                 about a second, kept across pod restarts and new replicas while the shared state store
                 (state.backend=shared) keeps it; not recorded in the Helm release. For roll-outs and
                 roll-backs of freshly trained versions.
  pin-model      prints the `helm upgrade --reuse-values --set services.<svc>.modelVersion=...` that
                 records the version in the release (the pods restart with it). For a version that must
                 hold whatever happens to the store, and with models.source=objectStore. A values pin
                 wins over the admin API until it is removed (pin-model SERVICE newest).
`scale` changes replicas (or the autoscaler's bounds) at once and prints the values that keep them
through the next `helm upgrade`. `restart` sets the annotation `kubectl rollout restart` sets, which Helm
leaves alone.
"""

ROLLOUT_HELP = f"""Serve a model version on every replica through the gateway's model-admin API
(POST /v1/admin/SERVICE/model:load; the key needs the 'admin' scope), then wait until every ready pod
reports serving it (its model_info metric, read through the API server's pod proxy). On failure or
timeout the version served before is put back the same way and cbecctl exits 3. The Deployment is never
patched: nothing for `helm upgrade` to undo. With the shared state backend the choice is kept in
PostgreSQL, so restarted and new replicas load it too. Refused where it cannot reach every replica: a
version pinned in values (services.SERVICE.modelVersion), models.source=objectStore, or several replicas
on the embedded state backend; use pin-model there. The gateway URL comes from --gateway or
${admin.GATEWAY_ENV}; the API key from --api-key-file or ${admin.API_KEY_ENV}, never the command line."""

PIN_HELP = """Print (not run) the `helm upgrade --reuse-values --set services.SERVICE.modelVersion=VERSION`
that pins a model version in the Helm release ('newest' removes the pin). The change is recorded in the
release and survives anything the state store loses; the pods restart with the version (their template
changes). Use rollout-model for a fast roll-out without restarts; use this to make a version part of the
release, or where rollout-model is refused."""


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table (no colours, stable for scripts that grep)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def versions_text(loaded: dict[str, int]) -> str:
    if not loaded:
        return "-"
    return ", ".join(f"{v} x{n}" if len(loaded) > 1 else v for v, n in loaded.items())


def status_table(rows: list[ServiceStatus]) -> str:
    return table(
        [
            "SERVICE",
            "READY",
            "UP-TO-DATE",
            "AUTOSCALE",
            "GPU/POD",
            "GPUS",
            "PINNED MODEL",
            "LOADED MODEL",
            "IMAGE",
        ],
        [
            [
                r.service,
                f"{r.ready}/{r.desired}",
                r.updated,
                f"{r.autoscaler['min']}-{r.autoscaler['max']}" if r.autoscaler else "-",
                r.gpus_per_pod,
                r.gpus_requested,
                r.pinned_model,
                versions_text(r.loaded_models),
                r.image.rsplit("/", 1)[-1],
            ]
            for r in rows
        ],
    )


def gpu_tables(report: GpuReport) -> str:
    parts = [
        table(
            ["NODE", "PRODUCT", "ALLOCATABLE", "REQUESTED", "BY CBEC", "FREE", "SCHEDULABLE"],
            [
                [
                    n.node,
                    n.product or "-",
                    n.allocatable,
                    n.requested,
                    n.requested_by_cbec,
                    n.free,
                    n.schedulable,
                ]
                for n in report.nodes
                if n.allocatable or n.requested
            ],
        ),
        "",
        "totals: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.totals.items())
        + f" ({report.resource})",
    ]
    if report.by_service:
        parts += ["", table(["SERVICE", "GPUS"], sorted(report.by_service.items()))]
    if report.pending:
        parts += [
            "",
            "pods waiting for GPUs:",
            table(
                ["POD", "SERVICE", "GPUS", "REASON"],
                [[p.pod, p.service, p.gpus, p.reason] for p in report.pending],
            ),
        ]
    return "\n".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cbecctl",
        description="Operate cbec-ai on Kubernetes: status, scaling, model roll-outs, restarts, GPUs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-n", "--namespace", default=os.environ.get("CBEC_NAMESPACE", "default"))
    p.add_argument("--release", help="only this Helm release's services (default: every cbec release)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--gpu-resource", default=DEFAULT_GPU_RESOURCE, help="extended resource name of a GPU")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--chart",
        default=helm.default_chart(),
        help=f"chart reference in the helm commands cbecctl prints (default: ${helm.CHART_ENV} or "
        f"{helm.DEFAULT_CHART}, the chart in this repository)",
    )
    p.add_argument(
        "--poll-interval", type=float, default=2.0, help="seconds between checks while waiting (default 2)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser("status", help="replicas, readiness, GPUs and model versions per service")
    status.add_argument(
        "--no-loaded", action="store_true", help="skip reading each pod's loaded model version (faster)"
    )

    scale = sub.add_parser("scale", help="set a service's replicas (or its autoscaler's bounds)")
    scale.add_argument("service")
    scale.add_argument("replicas", type=int, nargs="?")
    scale.add_argument("--min", type=int, dest="min_replicas", help="autoscaler minimum")
    scale.add_argument("--max", type=int, dest="max_replicas", help="autoscaler maximum")

    rollout = sub.add_parser(
        "rollout-model",
        help="serve a model version on every replica (model-admin API) and verify it",
        description=ROLLOUT_HELP,
        allow_abbrev=False,
    )
    rollout.add_argument("service")
    rollout.add_argument(
        "version", nargs="?", help=f"a model-store version (UTC timestamp), or '{NEWEST}' to un-pin"
    )
    rollout.add_argument(
        "--unpin", action="store_true", help="serve the newest valid version again (same as VERSION newest)"
    )
    rollout.add_argument(
        "--gateway", metavar="URL", help=f"the gateway's HTTP address (default: ${admin.GATEWAY_ENV})"
    )
    rollout.add_argument(
        "--api-key-file",
        metavar="PATH",
        help=f"file holding an API key with the 'admin' scope (default: ${admin.API_KEY_ENV})",
    )
    rollout.add_argument("--api-key", dest="inline_api_key", help=argparse.SUPPRESS)
    rollout.add_argument(
        "--gateway-ca",
        metavar="PATH",
        default=os.environ.get(admin.GATEWAY_CA_ENV),
        help=f"CA bundle for an https gateway (default: ${admin.GATEWAY_CA_ENV}, else the system's)",
    )
    rollout.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    rollout.add_argument(
        "--no-undo", action="store_true", help="leave a failed roll-out as it is instead of rolling back"
    )
    rollout.add_argument(  # the default now; kept so that existing scripts keep working
        "--undo-on-failure", action="store_true", help=argparse.SUPPRESS
    )

    pin = sub.add_parser(
        "pin-model",
        help="print the helm upgrade that pins a model version in the release's values",
        description=PIN_HELP,
    )
    pin.add_argument("service")
    pin.add_argument(
        "version", help=f"a model-store version (UTC timestamp), or '{NEWEST}' to remove the pin"
    )

    restart = sub.add_parser("restart", help="restart every pod of a service (rolling)")
    restart.add_argument("service")
    restart.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (default 900)")
    restart.add_argument("--no-wait", action="store_true", help="return without waiting for the roll-out")

    sub.add_parser("gpus", help="GPU requests per node against capacity; cbec pods waiting for GPUs")
    return p


def connect(kubeconfig: str | None, context: str | None) -> client.ApiClient:
    """An API client from a kubeconfig (flag, $KUBECONFIG, ~/.kube/config) or the in-cluster account."""
    try:
        if (
            kubeconfig
            or context
            or os.environ.get("KUBECONFIG")
            or os.path.exists(os.path.expanduser("~/.kube/config"))
        ):
            return config.new_client_from_config(config_file=kubeconfig, context=context)
        config.load_incluster_config()
        return client.ApiClient()
    except (config.ConfigException, OSError) as exc:
        raise CbecctlError(f"cannot reach a cluster: {exc}") from None


def emit(data: Any, text: str, as_json: bool, out: TextIO) -> None:
    if as_json:
        json.dump(data, out, indent=2, default=str)
        out.write("\n")
    else:
        out.write(text + "\n")


def rollout_target(args: argparse.Namespace) -> str:
    """The version to roll out: VERSION, or 'newest' for --unpin."""
    if args.unpin:
        if args.version not in (None, NEWEST):
            raise CbecctlError(f"--unpin serves the newest valid version; drop the version {args.version}")
        return NEWEST
    if args.version is None:
        raise CbecctlError("give a model version, or --unpin (or 'newest') to serve the newest valid one")
    return str(args.version)


def admin_api(args: argparse.Namespace) -> admin.AdminApi:
    if args.inline_api_key is not None:
        raise CbecctlError(
            "an API key on the command line is visible in ps and shell history: put it in a file "
            f"(--api-key-file PATH) or in ${admin.API_KEY_ENV}"
        )
    url = admin.gateway_url(args.gateway)
    return admin.AdminApi(url, admin.read_api_key(args.api_key_file), ca_file=args.gateway_ca)


def helm_note(done: dict[str, Any], chart: str, what: str) -> str | None:
    """Tell the SRE that ``helm upgrade`` will undo a change to a Helm-managed object, and how to keep it;
    adds the command to ``done`` (``helm_command``)."""
    if "helm_release" not in done:
        return None
    command = helm.upgrade_command(done["helm_release"], done["helm_namespace"], chart, done["helm_values"])
    done["helm_command"] = helm.command_text(command)
    return (
        f"cbecctl: note: Helm release {done['helm_release']} manages this; the next `helm upgrade` sets "
        f"{what} back to the chart's values. To keep the change, record it in the release:\n"
        f"  {done['helm_command']}"
    )


def run(
    argv: Sequence[str] | None = None, out: TextIO = sys.stdout, api: client.ApiClient | None = None
) -> int:
    """Run one command; returns the exit status (0 ok, 1 error, 3 roll-out failed, 2 usage)."""
    args = parser().parse_args(argv)
    try:
        # what needs no cluster is checked first: a missing key fails before anything is read or changed
        if args.command == "rollout-model":
            version = rollout_target(args)
            admin_client = admin_api(args)
        cbec = Cbec(
            api or connect(args.kubeconfig, args.context),
            args.namespace,
            args.release,
            args.gpu_resource,
            poll_interval=args.poll_interval,
        )
        if args.command == "status":
            rows = cbec.status(with_loaded=not args.no_loaded)
            if not rows:
                raise CbecctlError(f"no cbec services in namespace {args.namespace}")
            emit([dataclasses.asdict(r) for r in rows], status_table(rows), args.json, out)
        elif args.command == "scale":
            done = cbec.scale(args.service, args.replicas, args.min_replicas, args.max_replicas)
            text = (
                f"{args.service}: autoscaler {done['autoscaler']} now {done['min']}-{done['max']} replicas"
                if "autoscaler" in done
                else f"{args.service}: replicas {done['from']} -> {done['to']}"
            )
            note = helm_note(
                done, args.chart, "the autoscaler's bounds" if "autoscaler" in done else "replicas"
            )
            emit(done, text, args.json, out)
            if note:
                print(note, file=sys.stderr)
        elif args.command == "rollout-model":
            result = cbec.rollout_model(
                args.service, version, admin_client, args.timeout, undo_on_failure=not args.no_undo
            )
            for warning in result.warnings:
                print(f"cbecctl: warning: {warning}", file=sys.stderr)
            model = (
                result.model
                if result.model == result.serving_model
                else f"{result.model} ({result.serving_model})"
            )
            text = (
                f"{result.service}: already serving model {model} on every pod; choice recorded"
                if not result.changed
                else f"{result.service}: model {result.previous_model} -> {model} rolled out in "
                f"{result.seconds:g}s through the model-admin API; "
                f"serving {versions_text(result.loaded_models)}"
            )
            emit(dataclasses.asdict(result), text, args.json, out)
        elif args.command == "pin-model":
            done = cbec.pin_values(args.service, args.version)
            command = helm.upgrade_command(
                done["helm_release"], done["helm_namespace"], args.chart, done["helm_values"]
            )
            done["helm_command"] = helm.command_text(command)
            emit(done, done["helm_command"], args.json, out)
            print(
                f"cbecctl: run it to {'remove the pin of' if args.version == NEWEST else 'pin'} "
                f"{args.service} (now {done['pinned']}) in release {done['helm_release']}: the pods restart "
                "with their new template; a values pin wins over the model-admin API until removed",
                file=sys.stderr,
            )
        elif args.command == "restart":
            done = cbec.restart(args.service, None if args.no_wait else args.timeout)
            emit(done, f"{args.service}: restarted at {done['restartedAt']}", args.json, out)
        elif args.command == "gpus":
            report = cbec.gpu_report()
            emit(dataclasses.asdict(report), gpu_tables(report), args.json, out)
    except CbecctlError as exc:
        print(f"cbecctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except client.ApiException as exc:
        print(f"cbecctl: Kubernetes API error {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    sys.exit(run())
