"""Prefect tasks: the unit steps of each stage, thin wrappers over the core in `alignflow/`."""
