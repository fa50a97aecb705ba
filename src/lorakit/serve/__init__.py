"""``lorakit serve``: one frozen base model, many adapters, an OpenAI-compatible HTTP API.

Concurrent requests are gathered into mixed-adapter batches (each row runs its own adapter or
the bare base) and decoded together, one forward per step. See :mod:`lorakit.serve.app` for the
endpoints and :mod:`lorakit.serve.engine` for batching, decoding and the default chat template.
Needs the ``serve`` extra: ``pip install 'lorakit[serve]'`` (fastapi, uvicorn).
"""

from __future__ import annotations

from lorakit.serve.engine import DEFAULT_CHAT_TEMPLATE, Engine
from lorakit.serve.jobs import ServeError
from lorakit.serve.loading import build_engine

__all__ = ["DEFAULT_CHAT_TEMPLATE", "Engine", "ServeError", "build_engine", "create_app", "run_server"]


def create_app(engine: Engine, **options):
    """The FastAPI app serving ``engine`` (see :func:`lorakit.serve.app.create_app`)."""
    from lorakit.serve.app import create_app as _create_app

    return _create_app(engine, **options)


def run_server(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               **options) -> None:
    """Serve ``engine`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine, **options), host=host, port=port, log_level=log_level)
