"""structlog set-up: readable lines on a terminal, one JSON object per event for cron and shippers."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


def configure(fmt: Literal["console", "json"] = "console", verbose: bool = False, quiet: bool = False) -> None:
    if fmt == "json":
        level = logging.DEBUG if verbose else logging.INFO
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer()
    else:
        level = logging.DEBUG if verbose else logging.WARNING
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    if quiet:
        level = logging.ERROR
    logging.getLogger("sh").setLevel(logging.WARNING)  # it logs every process start at INFO
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
