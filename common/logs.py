"""Structured logging (structlog) shared by every mqfed process.

`configure()` is called once by each CLI entry point; library code only calls `get_logger(__name__)`.
Output is one JSON object per line when `json=True` (daemons under systemd or in containers), or
readable key=value lines on a terminal.
"""
from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(level: str | None = None, json: bool | None = None) -> None:
    """Set up structlog and the stdlib root logger.

    level: a logging level name; defaults to $MQFED_LOG_LEVEL or INFO.
    json: JSON lines; defaults to $MQFED_LOG_JSON=1, else JSON when stderr is not a terminal.
    """
    level_name = (level or os.environ.get("MQFED_LOG_LEVEL", "INFO")).upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level_name!r}")
    if json is None:
        env = os.environ.get("MQFED_LOG_JSON")
        json = env == "1" if env is not None else not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    # Records of stdlib loggers (pika, transformers) go through the same renderer: one format per process.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=[
        structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    logging.getLogger("pika").setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),  # the stderr of the moment (tests swap it)
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None, **bound) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger bound to `logger=name` and any extra key/values. Lazy: it takes the configuration in
    force when it logs, so a module that makes its logger at import, before `configure()`, logs as configured."""
    if name:
        bound = {"logger": name, **bound}
    return _Deferred(bound)  # a FilteringBoundLogger structurally: bind, and __getattr__ for the rest


class _Deferred:
    """Binds its values at each call, under the configuration in force then."""

    def __init__(self, bound: dict) -> None:
        self._bound = bound

    def bind(self, **more) -> "_Deferred":
        return _Deferred({**self._bound, **more})

    def __getattr__(self, method: str):
        return getattr(structlog.get_logger().new(**self._bound), method)
