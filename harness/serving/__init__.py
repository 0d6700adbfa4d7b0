"""Serving a finished run: load it once, generate from the CLI or over HTTP in micro-batches."""
