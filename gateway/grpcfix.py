"""Work-around for grpc/grpc#36066 in grpcio's asyncio client (fix proposed upstream in grpc/grpc#43486,
not in grpcio 1.85).

When a server ends a client- or bidi-streaming call (it aborts on a bad message, or answers early)
while a request write is in flight, ``call.write()`` overwrites the status the server sent with
INTERNAL "Internal error from Core". The bridge would answer 500 to a bad request, and the circuit
breaker would count a healthy backend as failing (so bad input could open it for everyone).

``write`` sends a message exactly as ``call.write()`` does but leaves the server's status in place; if
Core delivers no status within a second (the synchronous-rejection case grpcio guards against), it
sets the internal error as grpcio would. With a grpcio lacking the private attributes used here, it
falls back to ``call.write()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc

log = logging.getLogger("cbec.gateway.backends")

try:  # private grpcio internals; absent in other grpcio versions
    from grpc import _common
    from grpc._cython import cygrpc

    _INTERNAL_ERROR: type[BaseException] | None = cygrpc.InternalError
except (ImportError, AttributeError):  # pragma: no cover
    _INTERNAL_ERROR = None

_MISSING = object()


async def write(call: Any, message: Any) -> bool:
    """Send one request message; False when the call has already ended (its status is then intact)."""
    cython_call = getattr(call, "_cython_call", None)
    metadata_sent = getattr(call, "_metadata_sent", None)
    serializer = getattr(call, "_request_serializer", _MISSING)
    if _INTERNAL_ERROR is None or cython_call is None or metadata_sent is None or serializer is _MISSING:
        try:
            await call.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError):
            return False
        return True
    if call.done():
        return False
    if not metadata_sent.is_set():
        await metadata_sent.wait()
        if call.done():
            return False
    data = _common.serialize(message, serializer)
    try:
        await cython_call.send_serialized_message(data)
    except _INTERNAL_ERROR as err:
        try:
            await asyncio.wait_for(asyncio.shield(call.code()), 1.0)
        except TimeoutError:
            cython_call.set_internal_error(str(err))
        return False
    except asyncio.CancelledError:
        if not call.cancelled():
            call.cancel()
        raise
    return True


async def done_writing(call: Any) -> None:
    """Half-close; a call that has already ended is left alone (its status tells what happened)."""
    if call.done():
        return
    with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
        try:
            await call.done_writing()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # cygrpc.ExecuteBatchError when the call ended meanwhile
            log.debug("half-close on an ended call: %s", exc)
