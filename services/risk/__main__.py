"""``python -m services.risk``: serve ``cbec.risk.v1.RiskService``.

Settings come from ``CBEC_*`` and ``CBEC_RISK_*`` environment variables (see ``config.py``).
"""

from services.runtime.server import main

from .config import RiskSettings
from .server import build

if __name__ == "__main__":
    main("risk", build, RiskSettings)
