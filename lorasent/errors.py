"""Errors that users see. Each message says what is wrong and how to fix it."""


class LorasentError(Exception):
    """Base class: a problem the user can fix, reported without a deep stack trace."""


class ConfigError(LorasentError, ValueError):
    """An impossible or unknown configuration value."""


class DataError(LorasentError, ValueError):
    """Input data that cannot be used as given (missing columns, bad labels, empty text, ...)."""


class AssetError(LorasentError):
    """An offline asset that is missing or fails its hash check."""


class HubUnreachableError(LorasentError, ConnectionError):
    """The Hugging Face hub cannot be reached and the requested model or data is not cached."""


class CheckpointError(LorasentError):
    """A model or checkpoint folder that is missing, truncated or corrupt."""


class ExperimentError(LorasentError):
    """A search experiment folder that is missing, empty or unreadable."""
