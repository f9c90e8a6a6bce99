"""Operator tooling for cbec-ai (not part of the services): the SRE command line lives in tools.cbecctl."""
