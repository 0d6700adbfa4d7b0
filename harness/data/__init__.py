"""Stage 1, data: read, clean, de-duplicate and split the records; prompts; leakage checks."""
