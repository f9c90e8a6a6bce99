"""cbecctl: the SRE command line for cbec-ai on Kubernetes.

Shows each service's replicas, readiness, GPUs and model versions; scales services; rolls out model
versions through the runtime's model-admin API (never by patching the Helm-managed Deployments) and
verifies them on every pod; prints the Helm values that make a change part of the release; restarts;
reports GPU requests against node capacity. Run it as
``python -m tools.cbecctl --help``.
"""
