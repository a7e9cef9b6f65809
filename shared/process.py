"""What every service's ``__main__`` shares: logging, uvloop, signals, one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from shared.errors import EdgesplitError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    """--broker, --cluster and --log-level, as every service takes them."""
    parser.add_argument("--broker", dest="broker_url", metavar="URL",
                        help="MQTT broker URL, mqtt://[user:pass@]host:port (env EDGESPLIT_BROKER_URL)")  # fmt: skip
    parser.add_argument("--cluster", help="cluster id: keeps several systems apart on one broker")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def configure_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_service(name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run ``main()`` on uvloop (when installed) until it ends, SIGTERM or Ctrl-C.

    Returns the process exit status; an EdgesplitError is one line on stderr.
    """
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        await main()

    try:
        runner(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
    except EdgesplitError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        found = first_edgesplit_error(group)
        if found is None:
            raise
        print(f"{name}: {found}", file=sys.stderr)
        return 1
    return 0


def first_edgesplit_error(error: BaseException) -> EdgesplitError | None:
    """The first EdgesplitError inside (nested) exception groups, if any."""
    if isinstance(error, EdgesplitError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = first_edgesplit_error(inner)
            if found is not None:
                return found
    return None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's initial mmap threshold, made static by ``fix_mmap_threshold``."""


def fix_mmap_threshold() -> bool:
    """Keep glibc serving allocations of ``MMAP_THRESHOLD_BYTES`` and more with mmap, for a
    process that loads model blocks. glibc raises the threshold (up to 32 MB) the first
    time such a chunk is freed; after that a block's load-time buffers (the file's bytes,
    the int8 values before packing) come from the heap, and the packed weights allocated
    between them pin pages that ``malloc_trim`` cannot return: 20 MB of SmolLM2's 30
    int8 blocks (docs/PERFORMANCE.md, "Memory"). Measured without a cost in time per
    token or a 128-token prefill. Returns False where libc is not glibc (nothing done)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
