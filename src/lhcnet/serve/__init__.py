"""``lhcnet serve``: a local web page and HTTP API over a ``Predictor`` (``pip install "lhcnet[serve]"``).

``app`` (routes, errors, token), ``uploads`` (multipart bodies read into memory within limits),
``worker`` (the one inference thread and the per-request deadline), ``jobs`` (what that thread
does per endpoint), ``static/`` (the page: plain HTML, CSS and JavaScript). See docs/serve.md.
"""
from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
