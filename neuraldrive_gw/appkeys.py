"""The one place that stores objects on the aiohttp Application (3.8 has no web.AppKey).

aiohttp ≥ 3.9 warns about plain string keys (an error under our strict warnings), 3.8.4
(Debian 12) has no AppKey: this shim gives each version what it wants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .pipeline import Pipeline


def _key(name: str, kind: type) -> Any:
    app_key = getattr(web, "AppKey", None)
    return app_key(name, kind) if app_key is not None else name


PIPELINE: Any = _key("neuraldrive_gw.pipeline", object)


def pipeline_of(app: web.Application) -> Pipeline:
    """The request pipeline (and through it every component) of an app built by create_app."""
    pipeline: Pipeline = app[PIPELINE]
    return pipeline
