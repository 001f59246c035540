"""All benchmarks in one command: `python -m benchmarks [--quick]`.

Runs the overhead ratios (distillation live / cached vs plain, pruning callback vs none, QAT vs none) and the
compression results table (`benchmarks.results`), each ratio measured within one run, and writes
`overheads.json` beside the results table.
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> int:
    from benchmarks import distillation, pruning_overhead, quant_overhead, results
    from benchmarks.common import OUTPUT_DIRS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (minutes, not the published figures)")
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results (full), benchmarks/results-quick (--quick)")
    parser.add_argument("--skip-table", action="store_true", help="only the overhead ratios")
    a = parser.parse_args(argv)
    a.output_dir = a.output_dir or OUTPUT_DIRS["quick" if a.quick else "full"]
    steps = 8 if a.quick else 30
    overheads = {
        "distillation": distillation.run(steps=steps, rounds=1 if a.quick else 3),
        "pruning": pruning_overhead.run(steps=steps, rounds=1 if a.quick else 2),
        "qat": quant_overhead.run(steps=steps),
    }
    os.makedirs(a.output_dir, exist_ok=True)
    with open(os.path.join(a.output_dir, "overheads.json"), "w") as f:
        json.dump(overheads, f, indent=2)
    print(json.dumps(overheads, indent=2))
    if not a.skip_table:
        results.run("quick" if a.quick else "full", a.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
