"""Routes the official SDK 1.1.1 knows that no runtime here serves yet: each answers 501
`SANDBOX::API_NOT_SUPPORTED` naming the feature, never a bare 404 that a client reads as
"sandbox not found"."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from opensandbox_platform.server import errors
from opensandbox_platform.server.models import ErrorResponse

router = APIRouter(tags=["not supported"], responses={501: {"model": ErrorResponse}})

# (feature, why, [(method, path), ...])
FEATURES = [
    (
        "templates",
        "sandbox templates (fsb microVM templates) are not supported by this server",
        [
            ("POST", "/templates"),
            ("GET", "/templates"),
            ("GET", "/templates/{templateId}"),
            ("DELETE", "/templates/{templateId}"),
        ],
    ),
]


def _answer(message: str) -> object:
    async def not_supported() -> JSONResponse:
        return JSONResponse(errors.error_body(errors.API_NOT_SUPPORTED, message), 501)

    return not_supported


for _feature, _message, _routes in FEATURES:
    for _method, _path in _routes:
        router.add_api_route(
            _path,
            _answer(_message),  # type: ignore[arg-type]
            methods=[_method],
            status_code=501,
            operation_id=f"{_method.lower()}_{_path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            summary=f"not supported: {_feature}",
        )
