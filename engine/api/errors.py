"""API errors and their OpenAI-shaped bodies: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from http import HTTPStatus


class APIError(Exception):
    """An error the client caused (or must wait out); rendered as an OpenAI error body."""

    def __init__(self, message: str, *, status: int = HTTPStatus.BAD_REQUEST, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(self.status, "server_error")
        self.headers = headers


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "server_overloaded",
}
