"""Tables and progress for the command line: ``rich`` on a terminal, plain aligned text when the
output is piped or redirected (so ``hfoptim list | grep 8bit`` and log files stay readable)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def format_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'``; binary units, three significant decimals."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _alignments(n: int, align: str | None) -> str:
    """``align``: one letter per column, ``l`` or ``r``; default: first left, the others right."""
    align = align or "l" + "r" * (n - 1)
    if len(align) != n or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l'/'r' per column ({n}), got {align!r}")
    return align


def plain_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "", align: str | None = None
) -> str:
    """Aligned plain text (by default the first column left-aligned, the others right-aligned)."""
    align = _alignments(len(columns), align)
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(row: list[str]) -> str:
        parts = [v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(row, widths, align)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(cells[0]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    title: str = "",
    caption: str = "",
    stream: TextIO | None = None,
    align: str | None = None,
) -> None:
    """Print a table with rich on a terminal, as :func:`plain_table` otherwise."""
    stream = stream or sys.stdout
    align = _alignments(len(columns), align)
    if is_terminal(stream):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title or None, caption=caption or None)
        for i, name in enumerate(columns):
            table.add_column(str(name), justify="left" if align[i] == "l" else "right", no_wrap=i == 0)
        for row in rows:
            table.add_row(*["" if v is None else str(v) for v in row])
        Console(file=stream).print(table)
        return
    print(plain_table(columns, rows, title, align), file=stream)
    if caption:
        print(caption, file=stream)
    print(file=stream)


@contextlib.contextmanager
def status(message: str, stream: TextIO | None = None) -> Iterator[None]:
    """A spinner with ``message`` on a terminal; one line on stderr otherwise."""
    stream = stream or sys.stderr
    if is_terminal(stream):
        from rich.console import Console

        with Console(file=stream).status(message):
            yield
    else:
        print(message, file=stream, flush=True)
        yield


def progress(iterable, total: int | None = None, desc: str = "", disable: bool = False):
    """tqdm over ``iterable`` on stderr (a bar on a terminal, sparse lines when piped)."""
    from tqdm.auto import tqdm

    interval = 0.1 if is_terminal(sys.stderr) else 15.0
    return tqdm(iterable, total=total, desc=desc, disable=disable, mininterval=interval, dynamic_ncols=True)
