"""Tokens kept out of the logs. Browsers send theirs as ``?token=…`` (a
WebSocket or an EventSource cannot set headers), and uvicorn logs every
request's path with its query: without this, each access-log line would hold
a bearer token anyone reading the logs could use until it expires."""

from __future__ import annotations

import logging
import re

_TOKEN_IN_QUERY = re.compile(r"([?&](?:token|access_token)=)[^&\s\"']*")
# uvicorn's request lines (HTTP) and its WebSocket "[accepted]" lines.
SERVER_LOGGERS = ("uvicorn.access", "uvicorn.error")


def redact(text: str) -> str:
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_tokens_in_logs(loggers: tuple[str, ...] = SERVER_LOGGERS) -> None:
    """Install the filter (once) on the server's request loggers."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
