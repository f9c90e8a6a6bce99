"""``python -m tools.cbecctl``."""

from tools.cbecctl.cli import main

if __name__ == "__main__":
    main()
