"""The server's error: an HTTP status with an OpenAI-style body (below the schemas and limits that raise it)."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error with its HTTP status and OpenAI-style body {"error": {message, type, param, code}}."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, param: str | None = None, code: str | None = None, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.param = param
        self.code = code or self.code
        self.type = error_type or self.type

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self) -> tuple[Any, ...]:
        # The keyword-only fields are not in `args`: keep them when the error crosses from the
        # preparation process (pickle would otherwise rebuild a plain 400).
        return _rebuild, (type(self), self.message, self.status, self.param, self.code, self.type)


def _rebuild(cls: type[ApiError], message: str, status: int, param: str | None, code: str | None, error_type: str) -> ApiError:
    return cls(message, status=status, param=param, code=code, error_type=error_type)
