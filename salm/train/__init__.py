"""Training: a NeMo-style recipe run by Ray Train workers, each driving a DeepSpeed engine."""
