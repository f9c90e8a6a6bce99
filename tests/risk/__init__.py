"""Tests of the risk service."""
