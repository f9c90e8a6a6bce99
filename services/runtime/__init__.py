"""The shared serving runtime: everything every service needs and no service re-implements.

Config, health, reflection, metrics, JSON logs with request ids, limits, graceful shutdown, the dynamic
micro-batcher, device selection and the versioned model store. A service supplies only its domain:
its servicer, how to load its model, and its settings.
"""
