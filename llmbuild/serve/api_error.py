"""APIError: a failed request as an HTTP status and an OpenAI error body."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from llmbuild.errors import LLMBuildError, RequestError
from llmbuild.serve import protocol
from llmbuild.serve.async_engine import QueueFullError


class APIError(Exception):
    """An HTTP error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    @classmethod
    def from_engine(cls, exc: LLMBuildError) -> APIError:
        """The answer to an error the engine raised for a request, streamed or not.

        A refused request is the client's (400), a full queue asks it to retry (429), anything
        else means the engine cannot serve (503).
        """
        if isinstance(exc, RequestError):
            return cls(400, str(exc))
        if isinstance(exc, QueueFullError):
            return cls(429, str(exc), "rate_limit_error")
        return cls(503, str(exc), "service_unavailable")

    def body(self) -> dict:
        """The OpenAI error object, with the status as its code."""
        return protocol.error_body(self.message, self.kind, self.param, self.status)

    def response(self) -> JSONResponse:
        """The HTTP response; a 401 says which scheme to authenticate with."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), self.status, headers)
