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
- ``AllowedDecisions``, a filter on the ``egressgw.dns`` logger, shows allowed DNS decisions
  (which the interceptor logs at DEBUG) at INFO, at most ``per_second`` lines a second, without
  turning on DEBUG anywhere else. The daemon switches it on (``allowed_decisions``) and calls
  ``tick`` once a second: it says how many allowed decisions went unlogged in that second.
  Once the second's lines are spent the filter turns the logger back to INFO until the next
  tick, so a busy gateway stops building records it would drop (and the interceptor answers
  repeated queries from its per-second memo again).
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
DNS_LOGGER = "egressgw.dns"
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


def _is_allowed_decision(record: logging.LogRecord) -> bool:
    decision = getattr(record, "decision", None)
    return isinstance(decision, dict) and decision.get("verdict") == "allow"


class AllowedDecisions(logging.Filter):
    """Allowed DNS decisions at INFO, at most ``per_second`` lines between two ``tick``s.

    Installed on the ``egressgw.dns`` logger by ``configure``; it changes nothing until
    ``start``. While started, that logger is at DEBUG so the interceptor logs its allowed
    decisions; this filter raises each to INFO while the second's lines last and drops the rest
    (and any other DEBUG record of that logger), and the handler's level keeps every other
    logger's DEBUG records out as before.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level  # the level the operator asked for
        self.per_second = 0
        self.logged = 0  # lines written since the last tick
        self.dropped = 0  # allowed decisions seen and not written since the last tick
        self.quiet = False  # the logger is back at INFO until the next tick
        self._pinned: list[logging.Logger] = []  # children kept at the operator's level

    @property
    def active(self) -> bool:
        return self.per_second > 0

    def start(self, per_second: int) -> None:
        """Log up to ``per_second`` allowed decisions a second (until ``stop``)."""
        self.per_second, self.logged, self.dropped = per_second, 0, 0
        logger = logging.getLogger(DNS_LOGGER)
        # the interceptor's logger goes to DEBUG; its children (server, upstream) keep the
        # operator's level, so their DEBUG records are never built
        prefix = DNS_LOGGER + "."
        for name, child in list(logging.root.manager.loggerDict.items()):
            if not name.startswith(prefix) or not isinstance(child, logging.Logger):
                continue
            if child.level == logging.NOTSET:
                child.setLevel(self.level)
                self._pinned.append(child)
        logger.setLevel(logging.DEBUG)
        self.quiet = False

    def stop(self) -> None:
        self.per_second = 0
        logging.getLogger(DNS_LOGGER).setLevel(logging.NOTSET)
        for child in self._pinned:
            child.setLevel(logging.NOTSET)
        self._pinned = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.active or record.levelno != logging.DEBUG or self.level <= logging.DEBUG:
            return True
        if not _is_allowed_decision(record):
            return False  # the operator did not ask for DEBUG
        if self.logged >= self.per_second:
            self.dropped += 1
            if not self.quiet:
                self.quiet = True
                logging.getLogger(DNS_LOGGER).setLevel(logging.INFO)
            return False
        self.logged += 1
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True

    def tick(self, allowed: int | None = None) -> int:
        """End the second: if its lines ran out, log how many allowed decisions went unlogged,
        and return that number.

        ``allowed``: how many allowed answers there were in that second, when the caller counts
        them (once the filter has turned the logger back to INFO it sees no more of them)."""
        if not self.active:
            return 0
        unlogged = 0
        if self.dropped:
            unlogged = self.dropped
            if allowed is not None:
                unlogged = max(unlogged, allowed - self.logged)
            logging.getLogger(DNS_LOGGER).info(
                "dns: %d allowed decisions in the last second not logged "
                "(at most %d lines a second, --log-allowed)",
                unlogged,
                self.per_second,
            )
        self.logged = self.dropped = 0
        if self.quiet:
            self.quiet = False
            logging.getLogger(DNS_LOGGER).setLevel(logging.DEBUG)
        return unlogged


_allowed: AllowedDecisions | None = None


def allowed_decisions() -> AllowedDecisions | None:
    """The filter ``configure`` installed, or None when logging was not configured."""
    return _allowed


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) as ``fmt`` ("text" or "json") at
    ``level``, and install the allowed-decisions filter (off until the daemon starts it)."""
    global _allowed
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    numeric = logging.getLevelName(level)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.setLevel(numeric)
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    dns = logging.getLogger(DNS_LOGGER)
    if _allowed is not None:
        _allowed.stop()
        dns.removeFilter(_allowed)
    _allowed = AllowedDecisions(numeric)
    dns.addFilter(_allowed)
