"""Stage 2, training: LoRA fine-tuning on the prepared split, and its attention kernel."""
