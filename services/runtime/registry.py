"""The suite's topology, declared once: every service's name, ports, settings prefix and class, image
extras, module and the services it calls.

Everything else is derived from it or checked against it by a test (``tests/runtime/test_registry.py``):
the runtime's default ports (``config.DEFAULT_PORTS``), the upstream address settings of a caller
(``CBEC_<CALLER>_<UPSTREAM>_ADDR``, default ``127.0.0.1:<upstream's port>``), the gateway's backends,
``make run``'s launcher (``tools/launcher.py``), the image build (``deploy/images/build.sh`` asks
``python -m services.runtime.registry``), and the Helm chart's per-service blocks, environment and
NetworkPolicies.

Settings naming: a field every service shares (declared in ``RuntimeSettings``) is ``CBEC_<FIELD>`` and
means the same in every service; a field a service declares itself is ``CBEC_<SERVICE>_<FIELD>`` (a
field already named ``<service>_...`` is not prefixed twice), so no two services read one variable with
different meanings.

Plain Python on purpose (no pydantic, no service code): the build script and the launcher read it
without the service's dependencies, and every image ships it with the runtime.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import import_module

ENV_PREFIX = "CBEC_"


@dataclass(frozen=True)
class Service:
    name: str
    grpc_port: int
    metrics_port: int
    #: ``module:Class`` of its settings (a ``RuntimeSettings`` subclass), imported only when asked for.
    settings: str
    #: pip extras of its CPU image (``pip install ".[<extras>]"``).
    extras: tuple[str, ...]
    #: pip extras of its ``-gpu`` image; ``None``: no GPU image.
    gpu_extras: tuple[str, ...] | None
    #: The services it calls over gRPC (its NetworkPolicy egress, its ``*_addr`` settings).
    calls: tuple[str, ...] = ()
    #: Its HTTP listener, if any (the gateway's JSON bridge).
    http_port: int | None = None
    #: ``python -m <module>``; default ``services.<name>``.
    module: str = ""

    @property
    def entry_module(self) -> str:
        return self.module or f"services.{self.name}"

    @property
    def env_prefix(self) -> str:
        """Prefix of the variables only this service reads: ``CBEC_<NAME>_``."""
        return f"{ENV_PREFIX}{self.name.upper()}_"

    @property
    def image(self) -> str:
        return f"cbec-{self.name}"

    @property
    def code_dir(self) -> str:
        """Its package folder, relative to the repository root."""
        return self.entry_module.replace(".", "/")

    def address_env(self, upstream: str) -> str:
        """The variable holding this service's address of ``upstream``: ``CBEC_<NAME>_<UPSTREAM>_ADDR``."""
        return f"{self.env_prefix}{upstream.upper()}_ADDR"

    def settings_class(self) -> type:
        module, _, cls = self.settings.partition(":")
        return getattr(import_module(module), cls)


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        Service(
            "gateway",
            50050,
            9100,
            "gateway.config:GatewaySettings",
            extras=("gateway",),
            gpu_extras=None,
            calls=("recommender", "chat", "sentiment", "vision", "risk"),
            http_port=8080,
            module="gateway",
        ),
        Service(
            "recommender",
            50051,
            9101,
            "services.recommender.settings:RecommenderSettings",
            extras=("recommender", "cpu"),
            gpu_extras=("recommender", "gpu"),
        ),
        Service(
            "chat",
            50052,
            9102,
            "services.chat.config:ChatSettings",
            extras=("chat",),
            gpu_extras=("chat",),
            calls=("sentiment",),  # the anger check
        ),
        Service(
            "sentiment",
            50053,
            9103,
            "services.sentiment.config:SentimentSettings",
            extras=("sentiment",),
            gpu_extras=("sentiment",),
        ),
        Service(
            "vision",
            50054,
            9104,
            "services.vision.config:VisionSettings",
            extras=("vision", "cpu"),
            gpu_extras=("vision", "gpu"),
        ),
        Service(
            "risk",
            50055,
            9105,
            "services.risk.config:RiskSettings",
            extras=("risk",),
            gpu_extras=None,  # LightGBM on CPU
        ),
    )
}


def calls(name: str) -> tuple[str, ...]:
    """The upstreams of ``name`` (none for a name the registry does not know)."""
    service = SERVICES.get(name)
    return service.calls if service else ()


def callers(name: str) -> tuple[str, ...]:
    return tuple(s.name for s in SERVICES.values() if name in s.calls)


def start_order() -> list[str]:
    """Every service after the services it calls (ties in declaration order): how a launcher starts them."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"the registry's calls form a cycle: {' -> '.join((*path, name))}")
        if name in order:
            return
        for upstream in SERVICES[name].calls:
            visit(upstream, (*path, name))
        order.append(name)

    for name in SERVICES:
        visit(name, ())
    return order


def _check() -> None:
    for s in SERVICES.values():
        unknown = set(s.calls) - set(SERVICES)
        if unknown or s.name in s.calls:
            raise ValueError(f"registry: {s.name} calls unknown services or itself: {sorted(unknown)}")
    ports = [p for s in SERVICES.values() for p in (s.grpc_port, s.metrics_port, s.http_port) if p]
    if len(ports) != len(set(ports)):
        raise ValueError("registry: two services share a port")
    start_order()


_check()


def main(argv: list[str]) -> int:
    """``python -m services.runtime.registry names|show NAME``: the registry for shell scripts.

    ``names``: one service name a line. ``show NAME``: ``key=value`` lines (grpc_port, metrics_port,
    http_port, module, code_dir, image, extras, gpu_extras, calls; lists comma-separated, empty = none).
    """
    if argv == ["names"]:
        print("\n".join(SERVICES))
        return 0
    if len(argv) == 2 and argv[0] == "show" and argv[1] in SERVICES:
        s = SERVICES[argv[1]]
        fields = {
            "grpc_port": s.grpc_port,
            "metrics_port": s.metrics_port,
            "http_port": s.http_port or "",
            "module": s.entry_module,
            "code_dir": s.code_dir,
            "image": s.image,
            "extras": ",".join(s.extras),
            "gpu_extras": ",".join(s.gpu_extras or ()),
            "calls": ",".join(s.calls),
        }
        print("\n".join(f"{k}={v}" for k, v in fields.items()))
        return 0
    print(
        f"usage: python -m services.runtime.registry names | show {{{'|'.join(SERVICES)}}}", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
