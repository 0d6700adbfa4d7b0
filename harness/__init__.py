"""harness: evaluation-centric benchmarking for LoRA fine-tuning of small LLMs."""

__version__ = "0.1.0"
