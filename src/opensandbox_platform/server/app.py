"""The FastAPI application of the server."""

from fastapi import FastAPI

from opensandbox_platform import __version__


def create_app() -> FastAPI:
    app = FastAPI(title="OpenSandbox server", version=__version__)

    @app.get("/health", tags=["health"])
    async def health() -> dict[str, str]:
        return {"status": "healthy"}

    return app
