"""Log lines as text (the default) or as one JSON object per line, for log shippers.

``iotdlm --log-format json`` (or ``IOTDLM_LOG_FORMAT=json``) picks JSON; the choice is put in the
environment, so the services ``iotdlm up`` starts log the same way into ``DIR/logs/``. Each line::

    {"time": "2026-12-05T03:15:27.123Z", "level": "WARNING", "logger": "iotdlm.sm.updater",
     "message": "...", "process": 1234, "exception": "Traceback ..."}   (exception only with one)
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os

LOG_FORMAT_ENV = "IOTDLM_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, object] = {
            "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def chosen() -> str:
    """The format the environment asks for (``text`` when unset or unknown)."""
    value = os.environ.get(LOG_FORMAT_ENV, "text").strip().lower()
    return value if value in FORMATS else "text"


def formatter(kind: str | None = None) -> logging.Formatter:
    """A formatter for ``kind`` (default: :func:`chosen`)."""
    return JsonFormatter() if (kind or chosen()) == "json" else logging.Formatter(TEXT)
