"""Speed benchmarks of training, scoring and serving (`harness bench`)."""
