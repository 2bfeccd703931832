"""structlog JSON logging; the request id is bound per RPC via contextvars."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

# (request id, rpc name) of the RPC this task serves. One ContextVar.set per
# call is cheaper than structlog's bind/unbind; a processor adds it to events.
REQUEST_CONTEXT: ContextVar[tuple[str, str] | None] = ContextVar("myl_request", default=None)


def add_request_context(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    current = REQUEST_CONTEXT.get()
    if current is not None:
        event.setdefault("request_id", current[0])
        event.setdefault("rpc", current[1])
    return event


def configure_logging(level: str = "info", fmt: str = "json", service: str = "") -> None:
    numeric = logging.getLevelName(level.upper())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_request_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
