"""cbec-ai model services. `runtime` is the shared serving runtime; every other package is one service."""
