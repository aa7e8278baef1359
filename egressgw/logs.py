"""Log output: the usual text lines, or one JSON object per line for log pipelines.

In: log records from every logger; DNS decisions carry their fields in ``record.decision`` (see
``DecisionRecord.fields``). Out: lines on stderr.

- ``TextFormatter`` writes time, level, logger and message. A DNS decision's message is written
  from its fields as ``key=value`` pairs, a value with a space, a quote, an ``=`` or a backslash
  quoted (``reason="no rule matches \\"x\\""``), so every value stays one field that a logfmt
  parser (or ``shlex.split``) reads back as it was.
- ``JsonFormatter`` writes time, level, logger and message, plus the decision's fields when
  present and the traceback when there is one; it never raises on a record it cannot serialise
  (values fall back to ``str``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DECISION_EVENT = "dns decision"
# The fields of a decision line in the order they are written; ``reason`` is always quoted.
DECISION_KEYS = ("identity", "name", "type", "verdict", "reason", "rule", "addresses")
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_/:,*@[]+#")


def quoted(value: str) -> str:
    """``value`` in double quotes with ``\\``, ``"`` and line breaks escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def field(key: str, value: object, *, always_quote: bool = False) -> str:
    """``key=value``, the value quoted when it would not stay one field otherwise."""
    if value is None:
        text = "-"
    elif isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value) or "-"
    else:
        text = str(value)
    if always_quote or not text or not set(text) <= _PLAIN:
        text = quoted(text)
    return f"{key}={text}"


def decision_line(fields: dict[str, object]) -> str:
    """The text form of a DNS decision: ``dns decision identity=... reason="..." ...``."""
    parts = [DECISION_EVENT]
    parts += [field(k, fields.get(k), always_quote=k == "reason") for k in DECISION_KEYS]
    return " ".join(parts)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        decision = getattr(record, "decision", None)
        if isinstance(decision, dict) and decision.get("event") == DECISION_EVENT:
            record.message = decision_line(decision)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        decision = getattr(record, "decision", None)
        if isinstance(decision, dict):
            for key, value in decision.items():
                line.setdefault(str(key), value)  # never overwrite the four fields above
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) as ``fmt`` ("text" or "json") at
    ``level``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    numeric = logging.getLevelName(level)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.setLevel(numeric)
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
