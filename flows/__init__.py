"""Prefect flows (wiring of tasks only) and the `scoder` command line."""
