"""The server's log lines as text or JSON (`llmbuild serve --log-format`), uvicorn's included.

JSON is one object per line: time, level, logger, then either a request log line's fields
(request_log.py) or the message (with the request id when the line is about one request).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ASCII only, so no field can break the line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if fields is not None:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
            if (request_id := getattr(record, "request_id", None)) is not None:
                out["request_id"] = request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True)


def configure_logging(log_format: LogFormat, level: str) -> None:
    """Send llmbuild.serve's and uvicorn's records to stderr in `log_format` at `level` and above.

    Called before uvicorn starts, which is then told to leave logging alone (log_config=None).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter("%(levelname)s:  %(message)s"))
    for name in ("llmbuild.serve", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
