"""Renders docs/performance.md from the JSON the benchmark scripts write.

    python benchmarks/render_performance.py      # after running the benchmarks

One table of the current figures (what, script, how measured, figure, target,
date), then the levers that mattered and those measured not to pay
(benchmarks/levers.md, kept by hand: it says why, not how much).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
LEVERS = HERE / "levers.md"
OUT = HERE.parent / "docs" / "performance.md"

HEADER = """# Performance

Measured on the project's 2-core development machine (24 GiB, no GPU), whose
speed drifts up to 2x from one minute to the next: each script measures the
things it compares side by side, alternated in one run, and reports ratios
from that run. This page is rendered by `benchmarks/render_performance.py` from
the JSON the scripts write (`benchmarks/results/`); run a script, then the
renderer, to refresh it. Load is the 1-minute load average when the script
finished.

"""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(results_dir: Path = RESULTS_DIR) -> str:
    rows = ["| what | script | how measured | figure | target | date (load) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        when = f"{data['date']} ({data['machine']['load_average_1m']})"
        for f in data["figures"]:
            target = f["target"] or "-"
            if f["met"] is not None:
                target = f"{target}: **{'met' if f['met'] else 'missed'}**"
            rows.append(" | ".join(["", _cell(f["what"]), f"`{data['script']}`", _cell(f["how"]),
                                    _cell(f["figure"]), _cell(target), when, ""]).strip())
    levers = LEVERS.read_text() if LEVERS.exists() else ""
    return HEADER + "\n".join(rows) + "\n\n" + levers


def main() -> int:
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
