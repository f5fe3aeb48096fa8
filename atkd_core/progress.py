"""Progress reporting for long loops: a tqdm bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable


class Progress:
    """A progress line (units done, tokens/s, ETA): a tqdm bar on a terminal, periodic log lines
    otherwise. ``unit`` names what is counted, ``rate_unit`` what the rate is of (tokens; bytes
    for an upload)."""

    def __init__(
        self,
        total: int,
        log: Callable[[str], None],
        label: str,
        every_seconds: float = 10.0,
        unit: str = "examples",
        rate_unit: str = "tokens",
    ):
        self.total, self.log, self.label, self.every, self.unit = total, log, label, every_seconds, unit
        self.rate_unit = rate_unit
        self.done = self.tokens = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=unit)

    def update(self, units: int, tokens: int, extra: str = "") -> None:
        """Count finished units (examples or steps) and tokens; report when due."""
        self.done += units
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(units)
            self.bar.set_postfix_str(f"{rate:,.0f} {self.rate_unit}/s {extra}")
        elif time.perf_counter() - self.last >= self.every or self.done >= self.total:
            remaining = (self.total - self.done) * (time.perf_counter() - self.start) / max(self.done, 1)
            self.log(
                f"{self.label}: {self.done}/{self.total} {self.unit}, {rate:,.0f} {self.rate_unit}/s, "
                f"ETA {remaining:,.0f} s {extra}"
            )
            self.last = time.perf_counter()

    def close(self) -> None:
        """Close the bar, if any."""
        if self.bar is not None:
            self.bar.close()


# Set by an entry point run with --debug, so the processes it starts keep third-party output too.
DEBUG_VARIABLE = "ATKD_DEBUG"


def quiet_third_party_output() -> None:
    """Keep third-party chatter below the product's own progress lines: transformers' warnings and
    its per-file bars ("Loading weights", "Writing model shards"), and DeepSpeed's notices (its
    accelerator guess) below errors. Entry points call it, unless ``ATKD_DEBUG`` is set; a
    download's progress bar (huggingface_hub) is kept: it is the user's progress."""
    if os.environ.get(DEBUG_VARIABLE):
        return
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    # DeepSpeed sets its logger's level when it is imported; a filter on the logger outlasts that.
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if _errors_only not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
