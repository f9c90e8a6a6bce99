"""OpenTelemetry tracing for every service (issue 18): set-up, and the interceptors that carry context.

The client channel (``services/runtime/channel.py``) adds :func:`client_interceptors` to every channel,
so whatever this module returns travels on every call between services.
"""

from __future__ import annotations

import grpc


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that put the current trace context on outgoing calls (none until tracing is set up)."""
    return []
