"""``python -m services.sentiment``: serve SentimentService (settings from ``CBEC_*``)."""

from services.runtime.server import main

from .config import SentimentSettings
from .server import SentimentService

if __name__ == "__main__":
    main("sentiment", SentimentService, SentimentSettings)
