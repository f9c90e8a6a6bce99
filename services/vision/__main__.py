"""``python -m services.vision``: serve visual product search (see server.py)."""

from services.runtime.server import main

from .config import VisionSettings
from .server import VisionService

if __name__ == "__main__":
    main("vision", VisionService, VisionSettings)
