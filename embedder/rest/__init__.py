"""The HTTP/JSON front door beside gRPC: REST for every call, OpenAI's ``/v1/embeddings``, probes and OpenAPI.

- :mod:`.app`: :func:`create_app`, the routes over one :class:`embedder.core.Service`.
- :mod:`.schema`: the JSON shapes (what ``/openapi.json`` describes).
- :mod:`.convert`: JSON <-> the core's items and results, errors through the one table.
- :mod:`.guards`: token, body limit, error answers and metrics, as ASGI middleware.
- :mod:`.runner`: :class:`HttpServer`, uvicorn on a thread beside the gRPC server.
"""
from .app import create_app
from .runner import HttpServer

__all__ = ["HttpServer", "create_app"]
