"""The one exception type users see: a one-line message that names what is wrong and how to fix it."""


class FedsodaError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with `exit_code`, no traceback."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class SpecError(FedsodaError):
    """The experiment spec (or a --set override) is malformed or invalid."""

    exit_code = 2


class ArtifactError(FedsodaError):
    """A stage's input artifact is missing, corrupt, stale or produced out of order."""

    exit_code = 3


class PluginError(FedsodaError):
    """A plugin could not be found, imported, or broke its contract."""

    exit_code = 4


class DataError(FedsodaError):
    """A data directory, file or record is missing or malformed."""

    exit_code = 5


class ModelError(FedsodaError):
    """A model checkpoint is missing, corrupt, or not a decoder-only causal LM."""

    exit_code = 6
