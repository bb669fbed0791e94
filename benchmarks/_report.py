"""Shared by the benchmark scripts: print lines and keep them for a markdown file; name the code a result came from."""

from __future__ import annotations

import subprocess
from pathlib import Path


class Out:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def header(self, title: str, script: str) -> None:
        """The title, the command that made the file, and the host and code it ran on."""
        import os
        import platform
        import sys

        self(f"# {title}")
        self()
        self(f"Command: `.venv/bin/python benchmarks/{script}" + "".join(f" {a}" for a in sys.argv[1:]) + "`")
        self()
        self(f"Host: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
             f"Code: {code_version()}.")
        self()

    def save(self, path: str | None) -> None:
        """Write the lines kept so far to ``path`` as markdown (nothing when no path was asked for)."""
        if path:
            Path(path).write_text("\n".join(self.lines) + "\n")

    def table(self, header: list[str], rows: list[list]) -> None:
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            self("| " + " | ".join(str(c) for c in r) + " |")
        self()


def code_version() -> str:
    """The commit the results were made with ("hash subject"), and whether src/ had edits on top of it."""
    git = dict(capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        rev = subprocess.run(["git", "log", "-1", "--format=%h %s"], **git).stdout.strip()[:100]
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], **git).returncode != 0
    except OSError:
        return "?"
    return (rev or "?") + (" + uncommitted edits to src/" if dirty else "")
