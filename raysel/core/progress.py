"""Where a long stage stands, on the driver: units k/N (shards), items/s (samples) and an ETA.

On a terminal it is a tqdm bar; elsewhere (CI, `ray job logs`, a file) one log line every
`every` seconds and one at the end, so a log stays readable."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def in_notebook() -> bool:
    """In a Jupyter kernel, where stderr is no terminal but progress bars render."""
    return "ipykernel" in sys.modules


class Progress:
    def __init__(
        self, stage: str, units: int, items: int, unit: str = "shards", item: str = "samples", every=30.0, bar=True
    ):
        self.stage, self.units, self.items, self.unit, self.item, self.every = stage, units, items, unit, item, every
        self.units_done = self.items_done = 0
        self.start = self.last_log = time.monotonic()
        self.bar = None
        if bar and (sys.stderr.isatty() or in_notebook()):
            from tqdm.auto import tqdm  # a widget in Jupyter, text on a terminal

            self.bar = tqdm(total=items, desc=stage, unit=f" {item}", dynamic_ncols=True)

    def update(self, items: int) -> None:
        """One unit finished, holding `items` items."""
        self.units_done += 1
        self.add(items)

    def add(self, items: int) -> None:
        """`items` more items done, within a unit."""
        self.items_done += items
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.unit} {self.units_done}/{self.units}")
            self.bar.update(items)
        elif time.monotonic() - self.last_log >= self.every:
            self.last_log = time.monotonic()
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.items_done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.items - self.items_done)
        eta = f"{left / rate:,.0f} s" if rate > 0 else "unknown"
        units = f"{self.unit} {self.units_done}/{self.units}, " if self.units else ""  # 0: items alone
        return (
            f"{self.stage}: {units}{self.item} {self.items_done:,}/{self.items:,}, {rate:,.1f} {self.item}/s, ETA {eta}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        log.info("%s (done in %.1f s)", self.line(), time.monotonic() - self.start)
