"""The one error type the API answers with: an HTTP status and a JSON ``error`` document."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answer: status, machine-readable code and a description free of secrets and PHI.

    :param status_code: the HTTP status to answer with.
    :param error: the machine-readable error code (RFC 6749 / RFC 6750 codes for auth errors).
    :param description: a human-readable reason.
    :param headers: extra response headers such as ``WWW-Authenticate`` or ``Retry-After``.
    :param details: extra JSON fields for the body.
    """

    def __init__(
        self,
        status_code: int,
        error: str,
        description: str,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.status_code = status_code
        self.error = error
        self.description = description
        self.headers = headers or {}
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        """Return the JSON error document."""
        return {"error": self.error, "error_description": self.description, **self.details}
