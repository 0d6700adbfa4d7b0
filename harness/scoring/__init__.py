"""Stage 3, scoring: generate on the held-out split and score base and tuned models."""
