"""The registry's one error: a model version or model folder that cannot be found or loaded."""


class ModelNotFoundError(FileNotFoundError):
    """The configured model cannot be found or loaded."""
