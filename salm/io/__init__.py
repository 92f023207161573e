"""Model files: the canary-qwen-2.5b HF layout (and, later, .nemo / Ray checkpoints)."""
