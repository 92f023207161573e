"""salm-ray: train and serve SALM speech recognisers (Canary-Qwen family) on Ray."""

__version__ = "0.1.0"
