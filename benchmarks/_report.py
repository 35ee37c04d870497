"""What a benchmark measured, as JSON beside its text.

docs/performance.md is rendered from these files by
`benchmarks/render_performance.py`, so that no figure in the docs is typed by
hand. Each script adds one `Figure` per row of the table and writes
`benchmarks/results/<script>.json` (or the path given with `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    what: str
    figure: str  # the measured value, with its unit or ratio
    target: str = ""
    met: bool | None = None  # None: no target
    how: str = ""  # how it was measured, in a few words


@dataclass
class Report:
    script: str
    figures: list[Figure] = field(default_factory=list)

    def add(self, what: str, figure: str, target: str = "", met: bool | None = None, how: str = "") -> None:
        self.figures.append(Figure(what, figure, target, met, how))

    def write(self, path: Path | None) -> Path | None:
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "script": self.script,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                        "python": platform.python_version()},
            "figures": [asdict(f) for f in self.figures],
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


def add_json_option(parser: argparse.ArgumentParser, script: str) -> None:
    """`--json PATH` (default benchmarks/results/<script>.json; `--json ''` writes none)."""
    default = RESULTS_DIR / (Path(script).stem + ".json")
    parser.add_argument("--json", type=lambda s: Path(s) if s else None, default=default,
                        help=f"where to write the figures as JSON (default {default.relative_to(RESULTS_DIR.parent.parent)};"
                             " '' for none)")
