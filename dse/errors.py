"""One error family for everything a user can get wrong."""


class DSEError(Exception):
    """Root of the errors raised at the project's boundaries (CLI, config, files, bundles).

    Messages name the value received and what was expected, so the user can fix it
    without reading the source.
    """


class AudioError(DSEError):
    """An audio file is missing, unreadable, corrupt or empty."""


class DatasetError(DSEError):
    """A manifest or dataset directory is malformed."""


class ModelLoadError(DSEError):
    """A checkpoint or weights directory is missing, incomplete or incompatible."""


class ConfigError(DSEError):
    """A trial configuration or search space is invalid."""
