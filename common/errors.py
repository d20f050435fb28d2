"""The root of every error mqfed raises on purpose.

A CLI catches `MqfedError` and prints its message (which names the problem and, where there is one, the
fix); anything else escaping is a bug and crashes loudly with its traceback. Each concern defines its own
subclasses next to the code that raises them (docs/architecture.md#errors lists them).
"""
from __future__ import annotations


class MqfedError(Exception):
    """Base of mqfed's own errors."""


class InvalidValue(MqfedError, ValueError):
    """A value broke a rule of its field (`common.config.validate`); the message names the field."""
