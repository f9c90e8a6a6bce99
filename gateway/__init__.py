"""The gateway: the thin front of the suite (``python -m gateway``).

- ``GatewayService`` (gRPC, port 50050): page-level aggregations that fan out to the services
  concurrently, each part with its own deadline, returning partial results with ``missing_parts``
  (``AssessOrder`` fails closed without a risk answer).
- HTTP/JSON bridge (port 8080): every RPC with a ``google.api.http`` annotation, in every service,
  routed from the compiled descriptors; unary and streaming; proto3 JSON mapping; ``google.rpc.Status``
  error bodies; an OpenAPI document generated from the same descriptors at ``/openapi.json``;
  ``/healthz`` (liveness) and ``/readyz`` (the backends' gRPC health).
- Security and resilience on both ports: API keys (hashed at rest) and/or signed JWTs with scopes,
  per-principal rate limits, request size limits, CORS; optional TLS/mTLS to the services; retries
  only for idempotent methods through gRPC's own retry policy with retry throttling; a circuit
  breaker per backend; request ids propagated everywhere.

The gateway is a runtime service with no model (``slot = None``): the shared runtime gives it
config, health, reflection, metrics (port 9100), JSON logs and graceful shutdown.
"""
