"""Plain-text tables: left-aligned text columns, right-aligned numbers, one header row."""

from __future__ import annotations


def table(header, rows, align=None, gap="  ") -> str:
    """``rows`` (sequences of cells) under ``header`` as aligned text. ``align``: one character per column,
    ``<`` or ``>`` (default: numbers right, text left, judged by the first row)."""
    rows = [[str(c) for c in row] for row in rows]
    header = [str(h) for h in header]
    if align is None:
        first = rows[0] if rows else header
        align = "".join(">" if _numeric(c) else "<" for c in first)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [gap.join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(",", "").replace("±", "").strip() or "x")
    except ValueError:
        return False
    return True
