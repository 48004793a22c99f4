"""The one API error of every program: an answer with a status and a JSON `{code, message}` body.

Every failure a client can cause becomes a 4xx. The codes here are the small daemons' (execd's and
the task executor's); the server adds its own (`server/errors.py`) to the same `ApiError`.
"""

from __future__ import annotations

import errno

# Codes as upstream execd names them, so clients that switch on `code` keep working.
INVALID_REQUEST_BODY = "INVALID_REQUEST_BODY"
MISSING_QUERY = "MISSING_QUERY"
RUNTIME_ERROR = "RUNTIME_ERROR"
INVALID_FILE = "INVALID_FILE"
INVALID_FILE_CONTENT = "INVALID_FILE_CONTENT"
INVALID_FILE_METADATA = "INVALID_FILE_METADATA"
FILE_NOT_FOUND = "FILE_NOT_FOUND"
NOT_FOUND = "NOT_FOUND"
NOT_SUPPORTED = "NOT_SUPPORTED"
API_NOT_SUPPORTED = "API_NOT_SUPPORTED"  # a known API of the SDK this daemon does not offer (named in the message)
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
UNAUTHORIZED = "UNAUTHORIZED"
CONFLICT = "CONFLICT"
RANGE_NOT_SATISFIABLE = "RANGE_NOT_SATISFIABLE"
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
TOO_MANY_SESSIONS = "TOO_MANY_SESSIONS"


class ApiError(Exception):
    """An error the HTTP layer turns into `status` with body `{"code": code, "message": message}`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def bad_request(message: str, code: str = INVALID_REQUEST_BODY) -> ApiError:
    return ApiError(400, code, message)


def not_found(message: str, code: str = NOT_FOUND) -> ApiError:
    return ApiError(404, code, message)


def os_error(exc: OSError, path: str) -> ApiError:
    """Map a filesystem error caused by the request's path to a 4xx; other OS errors stay 500."""
    detail = f"{exc.strerror or exc}: {path}"
    if exc.errno == errno.ENOENT:
        return ApiError(404, FILE_NOT_FOUND, f"file not found: {path}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ApiError(403, RUNTIME_ERROR, detail)
    if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST, errno.EINVAL, errno.ENAMETOOLONG):
        return ApiError(400, INVALID_FILE, detail)
    if exc.errno == errno.EXDEV:
        return ApiError(400, INVALID_FILE, detail)
    if exc.errno == errno.ELOOP:
        return ApiError(400, INVALID_FILE, detail)
    return ApiError(500, RUNTIME_ERROR, detail)
