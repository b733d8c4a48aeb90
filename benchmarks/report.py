"""The one way every benchmark shows its result: a Markdown table on stdout (pasteable into benchmarks/README.md)
and, with --json, the same rows plus the settings that produced them."""
from __future__ import annotations

import json
from pathlib import Path


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return "" if value is None else str(value)


def report(title: str, rows: list[dict], columns: list[str], json_path: str | None = None, settings: dict | None = None) -> None:
    """Prints `rows` as a table of `columns` under a `# title` line; writes {settings, rows} to json_path."""
    print(f"\n# {title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    if json_path:
        Path(json_path).write_text(json.dumps({"title": title, "settings": settings or {}, "rows": rows}, indent=2))
