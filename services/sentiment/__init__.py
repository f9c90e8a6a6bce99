"""Multilingual review sentiment and aggregated market reports (``cbec.sentiment.v1``)."""
