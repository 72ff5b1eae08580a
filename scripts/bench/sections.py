"""Tables of BENCHMARKS.md that a benchmark script rewrites in place: the lines between
``<!-- bench: NAME -->`` and ``<!-- bench: end NAME -->``; the prose around them is hand-written and kept."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def replace_between(name: str, lines: list[str], path: Path = BENCHMARKS) -> None:
    """Put ``lines`` between the two markers of ``name`` (both must be in ``path`` already)."""
    begin, end = f"<!-- bench: {name} -->", f"<!-- bench: end {name} -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} block to write the {name} table into")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)
