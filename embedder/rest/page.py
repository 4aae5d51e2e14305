"""The web page at ``/``: plain HTML, CSS and JavaScript files shipped in the package (``static/``), no build step.

The files hold no data, so they are served without the token (:func:`.guards.is_open`); the page asks for the
token in a login field, keeps it in ``sessionStorage`` and sends it with every call to ``/v1``. Its content
security policy lets it talk to this server only: it works offline and loads nothing from third parties.
"""
from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from .guards import PAGE_PREFIX

# the files there are; a request names one of them, never a path
FILES = {"index.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
         "page.css": "text/css; charset=utf-8"}
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidated: a new server version's page is picked up at once
}

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return (files(__package__) / "static" / name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


@router.get("/")
async def index() -> Response:
    return _file("index.html")


@router.get(PAGE_PREFIX + "{name}")
async def page_file(name: str) -> Response:
    if name not in FILES:
        raise HTTPException(404, "no such file of the web page")
    return _file(name)
