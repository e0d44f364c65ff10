"""The error of a model that cannot be loaded: one class for the factory and the GGUF reader (both raise it, neither
imports the other for it)."""


class ModelNotAvailableError(OSError):
    """A model (or its tokenizer) could not be loaded; the message says why and what to do."""
