"""Errors a user can act on. Each message names what to change."""


class SALMConfigError(ValueError):
    """A config value is missing, unknown or out of range."""


class AudioLoadError(ValueError):
    """An audio file is missing or cannot be decoded."""


class PromptError(ValueError):
    """A prompt does not match its audios (placeholder count) or the prompt format."""


class CheckpointError(ValueError):
    """A model file or directory is incomplete or does not match the model's architecture."""
