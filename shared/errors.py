"""Error types of every process, and how they cross the wire.

Each subclass fixes a stable `code` (machine-readable, part of the SDK/HTTP interface) and the HTTP
status the frontend answers with. Errors about one request never stop the process that raised them.
"""


class MMRuntimeError(Exception):
    """Root of all mm-runtime errors: a stable `code` plus a human-readable message."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidRequest(MMRuntimeError):
    """The request itself is wrong (too long, bad parameters, placeholder/media mismatch)."""

    code = "invalid_request"
    http_status = 400


class MediaError(MMRuntimeError):
    """A media item could not be loaded or decoded (corrupt, empty, unsupported)."""

    code = "invalid_media"
    http_status = 400


class PreprocessError(MMRuntimeError):
    """The HF processor failed on an item that decoded fine."""

    code = "preprocess_failed"
    http_status = 500


class FeatureCacheMiss(MMRuntimeError):
    """The GPU worker lacks features the frontend believed it held; retryable after a reset."""

    code = "feature_cache_miss"
    http_status = 503


class EngineDead(MMRuntimeError):
    """The GPU worker is gone."""

    code = "engine_dead"
    http_status = 503


class ProtocolError(MMRuntimeError):
    """A message on a socket is malformed (garbage, wrong version, tensor sizes that disagree)."""

    code = "protocol_error"
    http_status = 400


class ConfigError(MMRuntimeError):
    """A configuration value or model directory cannot be served."""

    code = "config_error"
    http_status = 500


class ModelNotFound(MMRuntimeError):
    """A request names a model this server does not serve."""

    code = "model_not_found"
    http_status = 404


class Overloaded(MMRuntimeError):
    """The frontend holds `max_waiting_requests` already; the client may retry later."""

    code = "rate_limit_exceeded"
    http_status = 429


# code -> HTTP status: each class's own code, plus the codes raised with a base class's status.
_HTTP_STATUS = {
    cls.code: cls.http_status
    for cls in (
        InvalidRequest,
        MediaError,
        PreprocessError,
        FeatureCacheMiss,
        EngineDead,
        ProtocolError,
        ConfigError,
        ModelNotFound,
        Overloaded,
    )
} | {
    "too_many_media_items": 400,
    "placeholder_mismatch": 400,
    "prompt_too_long": 400,
    "unsupported_media": 400,
}


def http_status(code: str) -> int:
    """The HTTP status the frontend answers an error of this code with (500 if unknown)."""
    return _HTTP_STATUS.get(code, 500)


def error_from_wire(code: str, message: str) -> MMRuntimeError:
    """An error that crossed the wire as `ErrorInfo(code, message, ...)`, as an exception again,
    with the HTTP status of its code."""
    error = MMRuntimeError(message, code=code)
    error.http_status = http_status(code)
    return error
