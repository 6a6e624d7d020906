"""Helpers shared by integration and end-to-end tests: servers on loopback and their settings."""
