"""Plain-Python stages and helpers; nothing here imports Prefect."""
