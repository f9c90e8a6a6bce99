"""cbecctl: the SRE command line for cbec-ai on Kubernetes.

Shows each service's replicas, readiness, GPUs and model versions; scales services; rolls out model
versions and waits for them; restarts; reports GPU requests against node capacity. Run it as
``python -m tools.cbecctl --help``.
"""
