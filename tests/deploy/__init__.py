"""Tests of the deployment: Helm chart, alert rules, images, SRE tool, observability."""
