"""Offline material made on the spot: a tiny Qwen3 LLM directory and synthetic speech."""
