"""Logging: a logger made at import time, before configure(), logs as configured."""
from __future__ import annotations

import json
import logging

import structlog

from common import logs


def test_a_logger_made_before_configure_logs_as_configured_later(capsys):
    early = logs.get_logger("early.module", role="test")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        logs.configure(level="INFO", json=True)
        early.bind(extra=1).info("hello", n=2)
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        structlog.reset_defaults()
        root.handlers, root.level = handlers, level
    assert line["event"] == "hello" and line["logger"] == "early.module"
    assert (line["role"], line["extra"], line["n"], line["level"]) == ("test", 1, 2, "info")
