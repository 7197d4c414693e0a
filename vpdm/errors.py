"""Errors that users see.

Every bad input raises a subclass of :class:`VPDMError` whose message names the offending
file or value and says what was expected, so a CLI can print it without a traceback.
"""


class VPDMError(ValueError):
    """Base class for every user-facing error of the library."""


class ConfigError(VPDMError):
    """A configuration value is out of range or of the wrong kind."""


class DataError(VPDMError):
    """A dataset, image or mask on disk is missing or malformed."""


class CheckpointError(VPDMError):
    """A checkpoint file is missing, corrupt, or was not written by vpdm."""


class OutputError(VPDMError):
    """A file or folder cannot be written: disk full, file-size limit, read-only, no permission, bad path."""
