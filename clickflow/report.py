"""What a run shows a person: live progress on a terminal, and the closing summary."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import anyio

from clickflow.runtime import Runtime
from clickflow.summary import Progress, RunSummary


def _progress_line(runtime: Runtime, started: float) -> str:
    summary = runtime.summary
    elapsed = max(time.perf_counter() - started, 1e-9)
    parts = []
    units: dict[str, list[Progress]] = {}
    for progress in runtime.progress.values():
        units.setdefault(progress.unit, []).append(progress)
    for unit, reports in units.items():
        done = sum(p.done for p in reports)
        totals = [p.total for p in reports]
        known = None if None in totals else sum(t for t in totals if t is not None)
        parts.append(f"{unit} {done:,}/{known:,}" if known is not None else f"{unit} {done:,}")
    read = sum(p.bytes_read for p in runtime.progress.values())
    if read:
        parts.append(f"{read / 1e6:,.1f} MB")
    events = summary.rows["events"]
    parts.append(f"{sum(summary.messages.values()):,} messages")
    parts.append(f"{events:,} events")
    parts.append(f"{events / elapsed:,.0f} events/s")
    return " · ".join(p for p in parts if p)


async def show_progress(runtime: Runtime, stream: TextIO = sys.stderr, interval: float = 0.5) -> None:
    """Redraw one status line until cancelled; call only when ``stream`` is a terminal."""
    started = time.perf_counter()
    try:
        while True:
            await anyio.sleep(interval)
            stream.write("\r\x1b[2K" + _progress_line(runtime, started))
            stream.flush()
    finally:
        stream.write("\r\x1b[2K")
        stream.flush()


def format_summary(summary: RunSummary) -> str:
    messages = sum(summary.messages.values())
    per_source = ", ".join(f"{name}: {count:,}" for name, count in sorted(summary.messages.items()))
    ended = "finished" if not summary.unfinished else f"stopped before the end of {', '.join(summary.unfinished)}"
    lines = [
        f"{ended} in {summary.seconds:.1f}s",
        f"  messages        {messages:>12,}  ({per_source or 'none'})",
    ]
    if summary.repeated:
        lines.append(f"    {'repeated in a batch':<24} {summary.repeated:>9,}  (parsed once)")
    for table in ("visits", "events", "purchase_items", "dead_letter"):
        lines.append(f"  {table:<15} {summary.rows[table]:>12,}")
        if table == "visits":
            for sink, count in sorted(summary.stored_already.items()):
                lines.append(f"    {f'stored already ({sink})':<24} {count:>9,}  (not stored again)")
    for reason, count in summary.dead_letters.most_common():
        lines.append(f"    {reason:<24} {count:>9,}")
    lines.append(f"  events/s        {summary.events_per_second:>12,.0f}")
    if summary.not_acknowledged:
        lines.append(f"  not acknowledged {summary.not_acknowledged:>11,}  (left for redelivery)")
    return "\n".join(lines)
