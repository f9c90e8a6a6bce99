"""Risk service: cross-border transaction fraud scoring with reasons, anomaly scores and outcome feedback.

Modules: ``features`` (the one feature module for training and serving), ``state`` (durable SQLite
velocity state, scored transactions, outcome labels), ``data`` (the evalml demo data, SYNTHETIC),
``train`` (``python -m services.risk.train``), ``model`` (load, predict, reason codes), ``server``
(the gRPC servicer), ``config`` (``CBEC_RISK_*`` settings), ``defaults`` (the ``make run`` default
model) and ``credit`` (the model code on the real credit-risk sets of R's modeldata).
``rates.json`` is a dated, static snapshot of approximate exchange rates; ``countries.json`` maps ISO
country codes to time zones and currencies.
"""
