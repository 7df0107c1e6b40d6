"""Prefect tasks: thin wrappers that take dataset URIs and configs, call synth_core, return small results."""
