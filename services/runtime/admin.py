"""``cbec.common.v1.ModelAdminService``: switch model versions at run time, on every model service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from cbec.common.v1 import common_pb2, common_pb2_grpc
from google.protobuf import timestamp_pb2

from .errors import InvalidArgument, ServiceError, Violation, quote
from .model_store import Loaded, Manifest, ModelLoadError, ModelSlot


def model_info(manifest: Manifest | None) -> common_pb2.ModelInfo | None:
    """The ``ModelInfo`` every model response carries."""
    if manifest is None:
        return None
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(manifest.created)
    return common_pb2.ModelInfo(name=manifest.service, version=manifest.version, created_time=created)


class ModelAdminServicer(common_pb2_grpc.ModelAdminServiceServicer):
    def __init__(
        self, slot: ModelSlot[Any], switch: Callable[[str | None], Awaitable[Loaded[Any] | None]]
    ) -> None:
        self._slot = slot
        self._switch = switch

    def _check_service(self, service: str) -> None:
        if service and service != self._slot.store.service:
            raise InvalidArgument(
                [
                    Violation(
                        "service", f"this server serves {self._slot.store.service!r}, not {quote(service)}"
                    )
                ]
            )

    async def GetModelStatus(self, request: common_pb2.GetModelStatusRequest, context: Any) -> Any:
        self._check_service(request.service)
        current = self._slot.current
        response = common_pb2.GetModelStatusResponse()
        if current is not None:
            response.serving.CopyFrom(model_info(current.manifest))
            response.metrics.update(current.manifest.metrics)
        for entry in self._slot.store.versions():
            item = response.versions.add(version=entry.version, valid=entry.valid, error=entry.error)
            if entry.manifest is not None:
                item.created_time.FromDatetime(entry.manifest.created)
        return response

    async def LoadModelVersion(self, request: common_pb2.LoadModelVersionRequest, context: Any) -> Any:
        self._check_service(request.service)
        previous = self._slot.current
        try:
            loaded = await self._switch(request.version or None)
        except ModelLoadError as exc:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"model not switched: {exc}") from None
        response = common_pb2.LoadModelVersionResponse(
            serving=model_info(loaded.manifest if loaded else None)
        )
        if previous is not None:
            response.previous.CopyFrom(model_info(previous.manifest))
        return response
