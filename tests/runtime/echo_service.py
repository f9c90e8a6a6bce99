"""A small test service on the runtime: real gRPC methods of every kind, a model slot and a batcher.

Messages are protobuf wrappers so the test service needs no proto of its own. Run as a script it is
a real server process (for SIGTERM and configuration tests): ``python -m tests.runtime.echo_service``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import wrappers_pb2 as w

from services.runtime.access import caller
from services.runtime.errors import InvalidArgument, Violation
from services.runtime.model_store import Manifest, ModelSlot
from services.runtime.server import Runtime, main

SERVICE = "cbec.test.v1.EchoService"


def load_model(path: Path, manifest: Manifest) -> float:
    """The 'model' is a multiplication factor; a version whose file says so refuses to load."""
    raw = json.loads((path / "weights.json").read_text())
    if raw.get("broken"):
        raise ValueError("weights are corrupt")
    return float(raw["factor"])


class EchoService:
    service_names: Sequence[str] = (SERVICE,)

    def __init__(self, runtime: Runtime) -> None:
        self.slot: ModelSlot[float] = runtime.model_slot(load_model)
        self.batcher = runtime.batcher(self._predict_batch, "echo")
        self.computed = 0
        self.batches: list[int] = []

    def _predict_batch(self, items: list[tuple[float, float]]) -> list[Any]:
        self.batches.append(len(items))
        if any(x < 0 for x, _ in items):
            raise ValueError("negative input in batch")
        time.sleep(0.002)
        return [x * factor for x, factor in items]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    # --- methods ---
    async def echo(self, request: w.StringValue, context: grpc.aio.ServicerContext) -> w.StringValue:
        self.computed += 1
        if not request.value:
            raise InvalidArgument([Violation("value", "must not be empty")])
        if request.value == "crash":
            raise RuntimeError("secret internal detail")
        return w.StringValue(value=request.value)

    async def who_am_i(self, request: w.StringValue, context: grpc.aio.ServicerContext) -> w.StringValue:
        """The caller the runtime saw (``access.caller()``), as JSON."""
        who = caller()
        return w.StringValue(
            value=json.dumps(
                {
                    "user": who.user,
                    "principal": who.principal,
                    "scopes": sorted(who.scopes),
                    "trusted": who.trusted,
                }
            )
        )

    async def sleep(self, request: w.DoubleValue, context: grpc.aio.ServicerContext) -> w.StringValue:
        self.computed += 1
        await asyncio.sleep(request.value)
        return w.StringValue(value="slept")

    async def block(self, request: w.DoubleValue, context: grpc.aio.ServicerContext) -> w.StringValue:
        time.sleep(request.value)  # noqa: ASYNC251 -- blocks the event loop on purpose
        return w.StringValue(value="blocked")

    async def predict(self, request: w.DoubleValue, context: grpc.aio.ServicerContext) -> w.DoubleValue:
        factor = self.slot.require().model
        result = await self.batcher.submit((request.value, factor), time_remaining=context.time_remaining())
        return w.DoubleValue(value=result)

    async def count(
        self, request: w.Int32Value, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[w.Int32Value]:
        for i in range(request.value):
            await asyncio.sleep(0)
            yield w.Int32Value(value=i)

    async def sum(
        self, requests: AsyncIterator[w.DoubleValue], context: grpc.aio.ServicerContext
    ) -> w.DoubleValue:
        total = 0.0
        async for item in requests:
            total += item.value
        return w.DoubleValue(value=total)

    def register(self, server: grpc.aio.Server) -> None:
        def uu(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(fn, req.FromString, resp.SerializeToString)

        handlers = {
            "Echo": uu(self.echo, w.StringValue, w.StringValue),
            "WhoAmI": uu(self.who_am_i, w.StringValue, w.StringValue),
            "Sleep": uu(self.sleep, w.DoubleValue, w.StringValue),
            "Block": uu(self.block, w.DoubleValue, w.StringValue),
            "Predict": uu(self.predict, w.DoubleValue, w.DoubleValue),
            "Count": grpc.unary_stream_rpc_method_handler(
                self.count, w.Int32Value.FromString, w.Int32Value.SerializeToString
            ),
            "Sum": grpc.stream_unary_rpc_method_handler(
                self.sum, w.DoubleValue.FromString, w.DoubleValue.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def write_version(models_dir: Path, factor: float, broken: bool = False) -> str:
    from services.runtime.model_store import ModelStore

    with ModelStore(models_dir, "echo").new_version(metrics={"factor": factor}) as (path, manifest):
        (path / "weights.json").write_text(json.dumps({"factor": factor, "broken": broken}))
    return manifest.version


if __name__ == "__main__":
    main("echo", EchoService)
