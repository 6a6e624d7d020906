"""Invoker: per-host agent with the multi-tier model cache and inference endpoints."""
