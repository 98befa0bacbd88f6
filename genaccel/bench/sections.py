"""Write one named section of docs/benchmarks.md (between BEGIN/END markers), leaving the rest intact."""

from __future__ import annotations

from pathlib import Path

from genaccel.utils.io import atomic_write

BENCH_DOC = Path("docs/benchmarks.md")
HEADER = "# Benchmarks\n\nEvery number below was measured by the command printed next to it; ratios come from one run.\n"


def write_section(name: str, body: str, path: Path = BENCH_DOC) -> Path:
    """Replace (or append) the block ``<!-- BEGIN name --> ... <!-- END name -->`` in ``path``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    return atomic_write(path, write)
