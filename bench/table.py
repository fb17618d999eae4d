"""The benches' printed tables: Markdown, columns right-aligned."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(lines: Sequence[Sequence[str]]) -> None:
    """lines[0] is the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for k, line in enumerate(lines):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(line, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
