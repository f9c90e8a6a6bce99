"""``python -m services.risk.defaults`` (run by ``make run``): train the default model if none exists.

The default model is trained on the evalml demo transactions (SYNTHETIC; see ``data.py``), which must be
installed first: ``.venv/bin/python -m pip install --no-deps evalml==0.18.2``.
"""

import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main(["--if-missing"]))
