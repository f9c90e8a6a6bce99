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

from tools.cbecctl.kube import DEFAULT_GPU_RESOURCE, NEWEST, Cbec, CbecctlError, GpuReport, ServiceStatus

EPILOG = """examples:
  cbecctl -n shop status
  cbecctl -n shop scale recommender 4
  cbecctl -n shop scale vision --min 2 --max 12        (a service with an autoscaler)
  cbecctl -n shop rollout-model risk 20261129T030512123456Z --timeout 900 --undo-on-failure
  cbecctl -n shop rollout-model risk newest            (unpin: pods load the newest version)
  cbecctl -n shop restart chat
  cbecctl -n shop gpus --json
"""


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

    rollout = sub.add_parser("rollout-model", help="serve a model version and wait for the roll-out")
    rollout.add_argument("service")
    rollout.add_argument("version", help=f"a model-store version (UTC timestamp) or '{NEWEST}'")
    rollout.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (default 900)")
    rollout.add_argument(
        "--undo-on-failure", action="store_true", help="put the previous version back if the roll-out fails"
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


def run(
    argv: Sequence[str] | None = None, out: TextIO = sys.stdout, api: client.ApiClient | None = None
) -> int:
    """Run one command; returns the exit status (0 ok, 1 error, 3 roll-out failed, 2 usage)."""
    args = parser().parse_args(argv)
    try:
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
            emit(done, text, args.json, out)
        elif args.command == "rollout-model":
            result = cbec.rollout_model(args.service, args.version, args.timeout, args.undo_on_failure)
            text = (
                f"{result.service}: already on model {result.model}"
                if not result.changed
                else f"{result.service}: model {result.previous_model} -> {result.model} rolled out in "
                f"{result.seconds:g}s; serving {versions_text(result.loaded_models)}"
            )
            emit(dataclasses.asdict(result), text, args.json, out)
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
