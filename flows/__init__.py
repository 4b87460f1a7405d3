"""Prefect flows and the `kpod` command; they only wire stages from `tasks/`."""
