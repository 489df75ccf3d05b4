"""The line budget: no source module of the package over MAX_LINES lines, checked in CI.

A module that outgrows it wants to be split along its sections (STYLE.md). Prints every
module's share of the budget, largest first, and exits 1 if any is over.
"""

from __future__ import annotations

import sys
from pathlib import Path

MAX_LINES = 520  # "about 500": room for a docstring's worth of growth before a split
SOURCE_FOLDERS = ("compiler", "frontend", "backends")


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    sizes = sorted(((len(path.read_text().splitlines()), path.relative_to(root))
                    for folder in SOURCE_FOLDERS for path in (root / folder).rglob("*.py")),
                   reverse=True)
    total = sum(lines for lines, _ in sizes)
    print(f"line budget: {MAX_LINES} lines per module; {len(sizes)} modules, {total} lines")
    for lines, path in sizes[:10]:
        print(f"  {lines:5d}  {lines / MAX_LINES:4.0%}  {path}")
    over = [(lines, path) for lines, path in sizes if lines > MAX_LINES]
    for lines, path in over:
        print(f"over budget: {path} has {lines} lines (budget {MAX_LINES})", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
