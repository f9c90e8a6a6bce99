"""``python -m gateway``: the gateway on the shared runtime (gRPC 50050, HTTP 8080, metrics 9100)."""

from services.runtime.server import main

from .config import GatewaySettings
from .service import Gateway

if __name__ == "__main__":
    main("gateway", Gateway, GatewaySettings)
