"""``python -m services.recommender``: serve the newest valid recommender model version."""

import os

# Serving makes many small matrix-vector products; BLAS thread hand-offs cost more than they save
# (20x slower on a busy 2-core machine). Set before numpy loads its BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from services.runtime.server import main

from .server import RecommenderService
from .settings import RecommenderSettings

if __name__ == "__main__":
    main("recommender", RecommenderService, RecommenderSettings)
