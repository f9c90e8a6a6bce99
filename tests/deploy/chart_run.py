"""Run what the Helm chart renders, on one machine: a cluster without Kubernetes, for the scale-out tests.

There is no kube-apiserver, kubelet or container runtime here, so this plays the kubelet for the
rendered Deployments: every replica of every Deployment becomes one process started with the
container's rendered ``command``/``args`` and ``env`` (``secretKeyRef`` resolved from the Secrets the
test supplies, as the API server would), as the chart's non-root user, in the image's working
directory (this checkout, which that user cannot write), with only the pod's volumes writable.

What a pod network would give and a single host does not is substituted, and only that:
- each pod gets its own loopback address (127.<cluster>.<deployment>.<replica>); ``CBEC_HOST=0.0.0.0``
  inside a pod's network namespace means "the pod IP", so it becomes that address;
- the cluster DNS: a DNS server of the harness (``ClusterDNS``) answers the Services' names
  (``<svc>``, ``<svc>.<ns>``, ``<svc>.<ns>.svc``, ``<svc>.<ns>.svc.cluster.local``) with the addresses of
  the pods each selects, and ``dns:///<name>:<port>`` targets name it as their DNS server
  (``dns://<server>/<name>:<port>``, which gRPC's resolver supports): the callers still resolve, balance
  and check TLS certificates against the Service's name;
- a volume's ``mountPath`` becomes a per-pod host folder (``emptyDir``/``PersistentVolumeClaim``), the
  shared models folder, or (``secret``) a read-only folder holding the Secret's keys as files, as the
  kubelet writes them, in every environment value and probe argument that starts with it; the image's
  own environment (``PATH``, ``PYTHONPATH``) points at this checkout's virtualenv and ``gen/``.

Secrets come from the rendered manifests (the chart's generated TLS certificates and internal token) and
from the test (``secrets``: what would exist in the cluster before the install). Readiness is the pod's
rendered readiness probe: a native gRPC probe is a health call; an exec of the runtime's probe client
(mutual TLS) is polled in-process with the same arguments, then run once as rendered.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

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
    #: The rendered container (its probes), and mountPath -> host folder of its volumes.
    container: dict[str, Any] = field(default_factory=dict)
    mounts: dict[str, Path] = field(default_factory=dict)
    #: The fully qualified name of the Service that selects the pod (its certificate carries it).
    service_host: str = ""

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
    """Pods of the rendered Deployments, started as processes. ``secrets``: {(secret, key): value} of the
    Secrets that exist before the install (the rendered ones are read from ``docs``)."""

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
        self.secrets = {**rendered_secrets(self.docs), **self.secrets}
        self.dns = ClusterDNS(f"127.{self.subnet}.0.53")
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
        for host, pods in self._service_hosts().items():
            self.dns.table[host] = [p.ip for p in pods]
            for pod in pods:
                if host.endswith(".svc.cluster.local") and not pod.service_host:
                    pod.service_host = host
        for pod in self.pods:
            for key, value in list(pod.env.items()):
                pod.env[key] = self._resolve_dns(value)

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
            env[key] = _host_path(value, mounts)
        for key in ("CBEC_HOST", f"CBEC_{component.upper()}_HTTP_HOST"):  # the gateway's HTTP bridge
            if env.get(key) == "0.0.0.0":
                env[key] = ip
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
        return Pod(name, component, replica, ip, argv, env, ROOT, pod_dir, ports, container=container,
                   mounts=mounts)  # fmt: skip

    def _mounts(self, spec: dict[str, Any], container: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
        """mountPath -> host folder. Volumes are writable by the pod user unless mounted read-only; a
        Secret volume holds the Secret's keys as files (its ``items``, ``defaultMode``), read-only."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        out: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "secret" in volume:
                host = pod_dir / "secrets" / mount["name"]
                self._write_secret(volume["secret"], host)
            elif mount["name"] == "models" or "models" in volume.get("persistentVolumeClaim", {}).get(
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

    def _write_secret(self, source: dict[str, Any], host: Path) -> None:
        """What the kubelet writes for a ``secret`` volume: each key (or ``items``) as a file with
        ``defaultMode``, owned by root and the pod's fsGroup, in a folder the pod cannot write."""
        name = source["secretName"]
        keys = {key: value for (secret, key), value in self.secrets.items() if secret == name}
        if not keys:
            raise KeyError(
                f"Secret {name} is neither rendered nor supplied by the test: the pod could not start"
            )
        items = source.get("items") or [{"key": k, "path": k} for k in keys]
        if host.exists():  # a restarted pod: written again, as after a pod re-creation
            host.chmod(0o755)
            shutil.rmtree(host)
        host.mkdir(parents=True)
        for item in items:
            path = host / item["path"]
            path.write_text(keys[item["key"]])
            path.chmod(int(item.get("mode", source.get("defaultMode", 0o644))))
            _chown(path, uid=0)
        host.chmod(0o555)
        _chown(host, uid=0)

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

    def _resolve_dns(self, value: str) -> str:
        """``dns:///<service host>:<port>`` -> the same name, resolved by the harness's DNS server."""
        if not value.startswith("dns:///"):
            return value
        host, _, _port = value.removeprefix("dns:///").rpartition(":")
        if not self.dns.table.get(host):
            return value  # a Service whose pods this run does not start (``only``)
        return f"dns://{self.dns.address}/{value.removeprefix('dns:///')}"

    # --- credentials: what a caller of the services holds ---------------------------------------------
    def workload_secret(self, component: str, volume: str) -> dict[str, str]:
        """The keys of the Secret that a workload's pods mount as ``volume`` (rendered or supplied), as
        the pod sees them (``items`` paths), whether or not this run starts that workload."""
        dep = next(
            d
            for d in self.docs
            if d["kind"] == "Deployment"
            and d["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
        source = next(v["secret"] for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == volume)
        keys = {key: value for (secret, key), value in self.secrets.items() if secret == source["secretName"]}
        items = source.get("items") or [{"key": k, "path": k} for k in keys]
        return {item["path"]: keys[item["key"]] for item in items}

    @property
    def tls_enabled(self) -> bool:
        return any(
            v["name"] == "tls"
            for d in self.docs
            if d["kind"] == "Deployment"
            for v in d["spec"]["template"]["spec"]["volumes"]
        )

    def internal_token(self) -> str | None:
        """The internal token the chart gives every serving pod (None when it renders none)."""
        try:
            return self.workload_secret("gateway", "internal-token")["token"].strip()
        except (StopIteration, KeyError):
            return None

    def channel(self, pod: Pod, as_component: str = "gateway") -> grpc.aio.Channel:
        """A channel to one pod as ``as_component`` calls it: with that workload's client certificate
        (mutual TLS, the pod's certificate checked against its Service's name) and, on every call, the
        internal token with an all-scopes identity unless the call sets its own (``identity``)."""
        from services.runtime.access import TOKEN_KEY

        token = self.internal_token()
        interceptors = _DefaultIdentity.every_kind(self.identity(), TOKEN_KEY) if token else []
        if not self.tls_enabled or "CBEC_TLS_CERT_FILE" not in pod.env:
            return grpc.aio.insecure_channel(pod.address(), interceptors=interceptors)
        files = self.workload_secret(as_component, "tls")
        credentials = grpc.ssl_channel_credentials(
            files["ca.crt"].encode(), files["tls.key"].encode(), files["tls.crt"].encode()
        )
        options = [("grpc.ssl_target_name_override", pod.service_host)]
        return grpc.aio.secure_channel(pod.address(), credentials, options=options, interceptors=interceptors)

    def identity(self, user: str = "", scopes: tuple[str, ...] = ("*",)) -> tuple[tuple[str, str], ...]:
        """Metadata of a trusted caller (the internal token) acting for ``user`` with ``scopes``."""
        from services.runtime.access import identity_metadata

        return identity_metadata(self.internal_token(), user, "chart-harness", scopes)

    def probe_tls(self, pod: Pod) -> tuple[str, Any] | None:
        """(address, ProbeTLS) of the pod's exec readiness probe, as the pod would run it; None for a
        native gRPC probe."""
        from services.runtime.probe import parser, tls_from_args

        action = pod.container.get("readinessProbe", {})
        if "exec" not in action:
            return None
        command = [_host_path(a, pod.mounts) for a in action["exec"]["command"]]
        if command[:3] != ["python", "-m", "services.runtime.probe"]:
            raise ValueError(f"{pod.name}: the harness runs only the runtime's probe client, not {command}")
        args = parser().parse_args(command[3:])
        host, _, port = args.address.rpartition(":")
        address = f"{pod.ip}:{port}" if host in ("127.0.0.1", "localhost") else args.address
        return address, tls_from_args(args)

    # --- processes ------------------------------------------------------------------------------------------
    def of(self, component: str) -> list[Pod]:
        return [p for p in self.pods if p.component == component]

    def start(self, pod: Pod) -> None:
        self.dns.start()
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
        self.dns.stop()

    def wait_serving(self, pods: list[Pod] | None = None, timeout: float = 240.0) -> None:
        """Until every pod's readiness probe passes; fails with the pod's log. An exec probe is polled
        in-process with its own arguments (a Python start per poll would starve the pods of CPU), then
        run once as rendered, as the pod user with the pod's environment, and must exit 0."""
        import asyncio

        from services.runtime.probe import check

        async def one(pod: Pod) -> None:
            deadline = time.monotonic() + timeout
            exec_probe = self.probe_tls(pod)
            address, tls = exec_probe if exec_probe is not None else (pod.address(), None)
            while True:
                if not pod.alive:
                    raise RuntimeError(
                        f"{pod.name} exited ({pod.proc and pod.proc.returncode}):\n{pod.log_tail()}"
                    )
                if await check(address, tls=tls) == "SERVING":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{pod.name} not SERVING after {timeout:.0f}s:\n{pod.log_tail()}")
                await asyncio.sleep(0.5)
            if exec_probe is not None:
                code, out = await asyncio.to_thread(self.run_probe, pod)
                if code != 0:
                    raise RuntimeError(f"{pod.name}: its rendered readiness probe failed ({code}): {out}")

        async def every() -> None:
            await asyncio.gather(*(one(p) for p in pods or self.pods))

        asyncio.run(every())

    def run_probe(self, pod: Pod, probe: str = "readinessProbe") -> tuple[int, str]:
        """Run a pod's rendered exec probe as the kubelet would (in the container, with its env, within
        the probe's timeoutSeconds); the loopback address becomes the pod's own."""
        action = pod.container[probe]
        argv = [_host_path(a, pod.mounts) for a in action["exec"]["command"]]
        argv = [a.replace("127.0.0.1:", f"{pod.ip}:", 1) if a.startswith("127.0.0.1:") else a for a in argv]
        if argv[0] == "python":
            argv[0] = sys.executable
        try:
            done = subprocess.run(
                _as_pod_user(argv),
                cwd=pod.workdir,
                env=pod.env,
                capture_output=True,
                text=True,
                timeout=action.get("timeoutSeconds", 1),
                check=False,
            )
        except subprocess.TimeoutExpired:
            return -1, f"timed out after {action.get('timeoutSeconds', 1)} s"
        return done.returncode, done.stdout + done.stderr

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


class _DefaultIdentity:
    """Adds the harness's identity metadata (the internal token) to calls that bring none of their own.
    One instance per call kind: grpc.aio files a multi-kind interceptor under its first kind only."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], token_key: str) -> None:
        self.metadata = metadata
        self.token_key = token_key

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        own = list(details.metadata or ())
        if any(key == self.token_key for key, _ in own):
            return details
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*own, *self.metadata),
            details.credentials,
            details.wait_for_ready,
        )

    @classmethod
    def every_kind(cls, metadata: tuple[tuple[str, str], ...], token_key: str) -> list[Any]:
        return [
            kind(metadata, token_key) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)
        ]


class _UnaryUnary(_DefaultIdentity, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_DefaultIdentity, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_DefaultIdentity, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_DefaultIdentity, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class ClusterDNS:
    """The cluster DNS for the harness's pods: answers A queries for the rendered Services' names with
    their pods' loopback addresses (NXDOMAIN for other names, no records for other types), over UDP.

    Own code over ``socket``/``struct`` because it answers one query type from a fixed table: a DNS
    library would be a new dependency for a few lines of RFC 1035 framing."""

    TTL_S = 5

    def __init__(self, ip: str) -> None:
        self.table: dict[str, list[str]] = {}
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((ip, 0))
        self.address = "{}:{}".format(*self._sock.getsockname())
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._serve, name="cluster-dns", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                query, peer = self._sock.recvfrom(4096)
            except OSError:
                return
            with contextlib.suppress(ValueError, IndexError, struct.error, OSError):
                self._sock.sendto(self.answer(query), peer)

    def answer(self, query: bytes) -> bytes:
        """The response to one query message (one question, as stub resolvers send)."""
        qid, flags, qdcount = struct.unpack(">HHH", query[:6])
        if qdcount != 1:
            raise ValueError("one question per query")
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1 : i + 1 + query[i]].decode("ascii"))
            i += 1 + query[i]
        qtype, _qclass = struct.unpack(">HH", query[i + 1 : i + 5])
        question = query[12 : i + 5]
        name = ".".join(labels).lower().rstrip(".")
        known = name in self.table
        ips = self.table.get(name, []) if qtype == 1 else []
        answers = b"".join(
            struct.pack(">HHHIH", 0xC00C, 1, 1, self.TTL_S, 4) + socket.inet_aton(ip) for ip in ips
        )
        # QR, the query's opcode and RD, AA, RA; NXDOMAIN for a name that is not a Service of the chart.
        out_flags = 0x8000 | (flags & 0x7900) | 0x0400 | 0x0080 | (0 if known else 3)
        return struct.pack(">HHHHHH", qid, out_flags, 1, len(ips), 0, 0) + question + answers


def rendered_secrets(docs: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """{(secret, key): value} of the Secrets in the rendered manifests (``data`` decoded, ``stringData``)."""
    out: dict[tuple[str, str], str] = {}
    for doc in docs:
        if doc["kind"] != "Secret":
            continue
        name = doc["metadata"]["name"]
        for key, value in (doc.get("data") or {}).items():
            out[(name, key)] = base64.b64decode(value).decode()
        for key, value in (doc.get("stringData") or {}).items():
            out[(name, key)] = str(value)
    return out


def _host_path(value: str, mounts: dict[str, Path]) -> str:
    """A path inside the container -> where that volume is on this host (other values unchanged)."""
    for mount_path, host_dir in mounts.items():
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(host_dir) + value[len(mount_path) :]
    return value


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of command and args from the container's env."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def _as_pod_user(argv: list[str]) -> list[str]:
    """Run as the chart's runAsUser when we are root (as in CI); otherwise we already are non-root."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", f"--reuid={POD_UID}", f"--regid={POD_UID}", "--clear-groups", *argv]


def _chown(path: Path, uid: int = POD_UID) -> None:
    """Owned by ``uid`` and the pod's group (fsGroup) when we are root."""
    if os.geteuid() == 0:
        os.chown(path, uid, POD_UID)


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


__all__ = [
    "ChartCluster",
    "ClusterDNS",
    "Pod",
    "prepare_models_dir",
    "rendered_secrets",
    "writable_by_pod_user",
]
