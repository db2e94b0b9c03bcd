"""The error types a user can meet.

Every error raised for a user's input is an `ImfreeError` whose message names
what is wrong and how to fix it; the CLI prints it on one line and exits 1.
"""


class ImfreeError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(ImfreeError):
    """An option, flag or configuration file is invalid."""


class ModelLoadError(ImfreeError):
    """A backbone or its weights could not be loaded."""


class ArtifactError(ImfreeError):
    """A classifier artifact is missing, damaged or of another version."""


class ExportError(ImfreeError):
    """An export could not be built, or failed its parity gate."""


class BundleError(ImfreeError):
    """An export folder is missing, damaged or of another version."""


class EngineUnavailable(ImfreeError):
    """The requested inference engine cannot run on this machine."""
