"""The demo marketplace shared by every service under ``make run`` (see ``catalogue.py``)."""
