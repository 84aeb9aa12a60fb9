"""Engine errors, by cause. Each message says what failed, where, and what to try."""


class EngineError(Exception):
    """Base of every error raised by ``engines``."""


class EngineUnavailable(EngineError):
    """The engine's library or device is not usable on this host."""


class ModelInvalid(EngineError):
    """The ONNX model itself is malformed or unsupported."""


class PrepareError(EngineError):
    """Building or optimising the model for this device failed."""


class LoadError(EngineError):
    """A prepared artifact could not be loaded as a session."""


class RunError(EngineError):
    """Running a batch failed inside the engine."""


class ConversionRefused(PrepareError):
    """The graph converted to a lower precision would break the model (overflow, NaN, a
    gross error): the build is refused and ``fallback`` is the precision to build with."""

    fallback = "fp32"
