"""One exception root for the compiler, so callers (the CLI, the server) can catch it in one place."""


class OptimizeError(Exception):
    """Base of every error the compiler raises on purpose; its message is one line for the user."""


class SourceError(OptimizeError):
    """The model source is missing, of an unsupported kind, or cannot be loaded."""


class ConfigError(OptimizeError, ValueError):
    """A `CompileConfig` field has a value outside what is allowed."""


class CaptureError(OptimizeError):
    """`torch.export` could not capture the model over the requested shape ranges."""


class AccuracyError(OptimizeError):
    """The built engine disagrees with the fp32 eager model beyond the tolerance."""


class EngineError(OptimizeError):
    """An engine directory is unreadable, or an engine was called with inputs it does not accept."""
