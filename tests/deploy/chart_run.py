"""Run what the Helm chart renders, on one machine: a cluster without Kubernetes, for the scale-out tests.

There is no kube-apiserver, kubelet or container runtime here, so this plays the kubelet for the
rendered Deployments: every replica of every Deployment becomes one process started with the
container's rendered ``command``/``args`` and ``env`` (``secretKeyRef`` resolved from the Secrets the
test supplies, as the API server would), as the chart's non-root user, in the image's working
directory (this checkout, which that user cannot write), with only the pod's volumes writable.

What a pod network would give and a single host does not is substituted, and only that:
- each pod gets its own loopback address (127.<cluster>.<deployment>.<replica>); ``CBEC_HOST=0.0.0.0``
  inside a pod's network namespace means "the pod IP", so it becomes that address;
- the cluster DNS name of a headless Service (``dns:///<svc>.<ns>.svc.<domain>:<port>``) resolves to
  its pods' addresses, so it becomes ``ipv4:<pod1>:<port>,<pod2>:<port>`` (gRPC's static resolver,
  still balanced round-robin by the client);
- a volume's ``mountPath`` becomes a per-pod host folder (``emptyDir``/``PersistentVolumeClaim``) or the
  shared models folder, in every environment value that starts with it; the image's own environment
  (``PATH``, ``PYTHONPATH``) points at this checkout's virtualenv and ``gen/``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
POD_UID = 10001  # the chart's podSecurityContext.runAsUser


@dataclass
class Pod:
    deployment: str
    component: str
    replica: int
    ip: str
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    pod_dir: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    restarts: int = 0

    @property
    def name(self) -> str:
        return f"{self.deployment}-{self.replica}"

    def address(self, port: str = "grpc") -> str:
        return f"{self.ip}:{self.ports[port]}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


@dataclass
class ChartCluster:
    """Pods of the rendered Deployments, started as processes. ``secrets``: {(secret, key): value}."""

    docs: list[dict[str, Any]]
    secrets: dict[tuple[str, str], str]
    work_dir: Path
    models_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Components to run (e.g. {"risk"}); None runs every Deployment.
    only: set[str] | None = None
    #: Pods get 127.<subnet>.<deployment>.<replica>: each cluster its own block, so two clusters on one
    #: host (a test beside a module-wide one) never answer for each other.
    subnet: int = field(default_factory=lambda: random.randint(16, 250))
    pods: list[Pod] = field(default_factory=list)

    def __post_init__(self) -> None:
        deployments = [
            d
            for d in self.docs
            if d["kind"] == "Deployment"
            and (self.only is None or d["metadata"]["labels"].get("app.kubernetes.io/component") in self.only)
        ]
        for index, dep in enumerate(sorted(deployments, key=lambda d: d["metadata"]["name"]), start=1):
            replicas = int(dep["spec"].get("replicas", 1))
            for replica in range(replicas):
                self.pods.append(self._pod(dep, index, replica))
        by_host = self._service_hosts()
        for pod in self.pods:
            for key, value in list(pod.env.items()):
                pod.env[key] = self._resolve_dns(value, by_host)

    # --- building pods from the manifests ---------------------------------------------------------------
    def _pod(self, dep: dict[str, Any], index: int, replica: int) -> Pod:
        """A pod of a Deployment, or (``kind: Job``) the pod a Job runs."""
        name = dep["metadata"]["name"]
        component = dep["metadata"]["labels"].get("app.kubernetes.io/component", name)
        spec = dep["spec"]["template"]["spec"]
        container = spec["containers"][0]
        ip = f"127.{self.subnet}.{index}.{replica + 1}"
        pod_dir = self.work_dir / f"{name}-{replica}"
        mounts = self._mounts(spec, container, pod_dir)
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secrets[(ref["name"], ref["key"])]
        for key, value in list(env.items()):
            for mount_path, host_dir in mounts.items():
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    env[key] = str(host_dir) + value[len(mount_path) :]
        if env.get("CBEC_HOST") == "0.0.0.0":
            env["CBEC_HOST"] = ip
        venv_bin = Path(sys.executable).parent
        env.update(
            {  # the image's ENV, pointing at this checkout instead of /opt/venv and /app
                "PATH": f"{venv_bin}:/usr/bin:/bin",
                "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
                "OMP_WAIT_POLICY": "PASSIVE",
                "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "Haswell"),
                "OMP_NUM_THREADS": "1",
                "TMPDIR": str(mounts.get("/tmp", pod_dir / "tmp")),
                **self.extra_env,
            }
        )
        argv = [_expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
        if not argv:
            raise ValueError(f"{name}: the chart renders no command; the harness runs only what it renders")
        if argv[0] == "python":
            argv[0] = sys.executable
        ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}
        return Pod(name, component, replica, ip, argv, env, ROOT, pod_dir, ports)

    def _mounts(self, spec: dict[str, Any], container: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
        """mountPath -> host folder. Volumes are writable by the pod user unless mounted read-only."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        out: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if mount["name"] == "models" or "models" in volume.get("persistentVolumeClaim", {}).get(
                "claimName", ""
            ):
                host = self.models_dir
            else:
                # emptyDir and per-pod PVCs: a folder of this pod that survives its restarts (like a PVC;
                # an emptyDir would be wiped on pod deletion, which these tests never do).
                host = pod_dir / "volumes" / mount["name"]
                host.mkdir(parents=True, exist_ok=True)
                _chown(host)
            out[mount["mountPath"]] = host
        return out

    def _service_hosts(self) -> dict[str, list[Pod]]:
        """Service DNS name (short and fully qualified) -> pods it selects."""
        hosts: dict[str, list[Pod]] = {}
        for svc in (d for d in self.docs if d["kind"] == "Service"):
            selector = svc["spec"].get("selector") or {}
            name, ns = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
            chosen = [p for p in self.pods if self._selects(selector, p)]
            for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
                hosts[host] = chosen
        return hosts

    def _selects(self, selector: dict[str, str], pod: Pod) -> bool:
        dep = next(
            d for d in self.docs if d["kind"] == "Deployment" and d["metadata"]["name"] == pod.deployment
        )
        labels = dep["spec"]["template"]["metadata"]["labels"]
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    @staticmethod
    def _resolve_dns(value: str, hosts: dict[str, list[Pod]]) -> str:
        if not value.startswith("dns:///"):
            return value
        host, _, port = value.removeprefix("dns:///").rpartition(":")
        pods = hosts.get(host)
        if not pods:
            return value  # a Service whose pods this run does not start (``only``)
        return "ipv4:" + ",".join(f"{p.ip}:{port}" for p in pods)

    # --- processes ------------------------------------------------------------------------------------------
    def of(self, component: str) -> list[Pod]:
        return [p for p in self.pods if p.component == component]

    def start(self, pod: Pod) -> None:
        pod.pod_dir.mkdir(parents=True, exist_ok=True)
        pod.log_path = pod.pod_dir / f"log.{pod.restarts}"
        log = pod.log_path.open("wb")
        pod.proc = subprocess.Popen(
            _as_pod_user(pod.argv),
            cwd=pod.workdir,
            env=pod.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def start_all(self) -> None:
        for pod in self.pods:
            self.start(pod)

    def kill9(self, pod: Pod) -> None:
        if pod.proc is not None and pod.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.proc.pid, signal.SIGKILL)
            pod.proc.wait(10)

    def restart(self, pod: Pod) -> None:
        """What the kubelet does after the container died: the same command, env and volumes."""
        self.kill9(pod)
        pod.restarts += 1
        self.start(pod)

    def stop_all(self, grace: float = 10.0) -> None:
        for pod in self.pods:
            if pod.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + grace
        for pod in self.pods:
            if pod.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                pod.proc.wait(max(0.1, deadline - time.monotonic()))
            self.kill9(pod)

    def wait_serving(self, pods: list[Pod] | None = None, timeout: float = 240.0) -> None:
        """Until every pod's gRPC health says SERVING (the readiness probe); fails with the pod's log."""
        import asyncio

        from services.runtime.probe import check

        async def one(pod: Pod) -> None:
            deadline = time.monotonic() + timeout
            while True:
                if not pod.alive:
                    raise RuntimeError(
                        f"{pod.name} exited ({pod.proc and pod.proc.returncode}):\n{pod.log_tail()}"
                    )
                if await check(pod.address()) == "SERVING":
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{pod.name} not SERVING after {timeout:.0f}s:\n{pod.log_tail()}")
                await asyncio.sleep(0.5)

        async def every() -> None:
            await asyncio.gather(*(one(p) for p in pods or self.pods))

        asyncio.run(every())

    def run_job(self, name: str, timeout: float = 300.0) -> tuple[int, str]:
        """Run the rendered Job ``name``'s pod to completion (what the Job controller does once);
        returns (exit status, its log)."""
        job = next(d for d in self.docs if d["kind"] == "Job" and d["metadata"]["name"] == name)
        pod = self._pod(job, 250, 0)
        self.start(pod)
        assert pod.proc is not None
        try:
            pod.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9(pod)
        return pod.proc.returncode, pod.log_tail(6000)

    @contextlib.contextmanager
    def running(self, timeout: float = 240.0) -> Iterator[ChartCluster]:
        try:
            self.start_all()
            self.wait_serving(timeout=timeout)
            yield self
        finally:
            self.stop_all()


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of command and args from the container's env."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def _as_pod_user(argv: list[str]) -> list[str]:
    """Run as the chart's runAsUser when we are root (as in CI); otherwise we already are non-root."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", f"--reuid={POD_UID}", f"--regid={POD_UID}", "--clear-groups", *argv]


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, POD_UID, POD_UID)


def prepare_models_dir(path: Path) -> None:
    """The models PVC: readable by the pod user (serving pods mount it read-only)."""
    for p in [path, *path.rglob("*")]:
        _chown(p)
        if p.is_dir():
            p.chmod(0o755)


def writable_by_pod_user(path: Path) -> bool:
    """Whether the pod user could write here (used to check the code directory is read-only to it)."""
    if os.geteuid() != 0:
        return os.access(path, os.W_OK)
    probe = subprocess.run(_as_pod_user(["test", "-w", str(path)]), check=False)
    return probe.returncode == 0


__all__ = ["ChartCluster", "Pod", "prepare_models_dir", "shutil", "writable_by_pod_user"]
