"""``python -m services.sentiment.defaults`` (run by ``make run``): make sure a sentiment model exists.

If the models folder holds no valid sentiment version, train one on the first ``--sample`` reviews in
priority order, embedding new ones for at most ``--budget-s`` seconds (the encoder does 15-40 texts
per second on 2 cores; vectors cached by an earlier run are free, so a second run is quick).
The full-data model is the benchmark's job (``python -m bench.sentiment``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.runtime.model_store import ModelStore

from .data import DataMissing
from .train import SERVICE, configured_settings, train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, help="default: the settings' CBEC_MODELS_DIR (models)")
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--force", action="store_true", help="train even if a model exists")
    args = parser.parse_args()
    args.models_dir = args.models_dir or configured_settings().models_dir
    existing = ModelStore(args.models_dir, SERVICE).newest_valid()
    if existing is not None and not args.force:
        print(f"sentiment: model {existing.version} exists in {args.models_dir}; nothing to do")
        return
    try:
        version, ev = train(args.models_dir, args.sample, args.budget_s)
    except DataMissing as exc:
        raise SystemExit(f"sentiment: {exc}") from None
    t = ev["test"]
    print(
        f"sentiment: trained {version} on {ev['split_sizes'].get('train', 0)} reviews: test macro-F1 "
        f"{t['macro_f1']:.3f}, accuracy {t['accuracy']:.3f}, multilingual accuracy "
        f"{ev['multilingual']['accuracy']:.3f}"
    )


if __name__ == "__main__":
    main()
