"""Format the AUCs of several evaluation reports (metrics.json) as one markdown table.

    python benchmarks/auc_table.py runs/llmrouter-low runs/llmrouter-medium ...   # dirs or metrics.json files
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["linear", "oracle", "rules", "routing", "threshold_cascade", "cascade", "cascade_routing"]


def main(paths: list[str]) -> None:
    reports = []
    for p in paths:
        path = Path(p) / "metrics.json" if Path(p).is_dir() else Path(p)
        reports.append((Path(p).name if Path(p).is_dir() else path.parent.name, json.loads(path.read_text())))
    methods = [m for m in ORDER if any(m in r["auc"] for _, r in reports)]
    print("| run | " + " | ".join(methods) + " | wall time |")
    print("|---|" + "---|" * (len(methods) + 1))
    for name, r in reports:
        cells = []
        for m in methods:
            if m in r["auc"]:
                lo, hi = r["auc_ci"][m]
                cells.append(f"{r['auc'][m]:.2f} [{lo:.1f}, {hi:.1f}]")
            else:
                cells.append("–")
        wall = f"{r['wall_time_s']:.0f} s" if "wall_time_s" in r else "–"
        print(f"| {name} | " + " | ".join(cells) + f" | {wall} |")


if __name__ == "__main__":
    main(sys.argv[1:])
