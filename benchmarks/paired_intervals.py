"""Paired differences between a comparison's arms at a chosen confidence level, from its per-run
scores: for a pre-registered rule that corrects for several comparisons (e.g. Bonferroni over m
hypotheses: --level 1-0.05/m), which the comparison report's 95% intervals do not.

Reads ``results.csv`` as ``atkd compare --report-to`` writes it (objective, seed, student_score),
pairs the two arms of each ``A:B`` by seed and prints B − A: mean, the two-sided t-interval at
``--level``, the number of pairs, their standard deviation, and the smallest true difference the
design detects with 80% power at that level.

    .venv/bin/python benchmarks/paired_intervals.py docs/cross-tokenizer/results.csv \\
        --pairs sft:uld sft:hybrid sft:atkd_x --level 0.98333
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from atkd_core.reports.statistics import confidence_interval, detectable_effect, mean_std


def main() -> None:
    """Parse the arguments and print one row per pair."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a comparison's results.csv")
    parser.add_argument("--pairs", nargs="+", required=True, help="A:B, printed as B - A")
    parser.add_argument("--level", type=float, default=0.95, help="two-sided confidence level, in (0, 1)")
    args = parser.parse_args()
    if not 0 < args.level < 1:
        parser.error(f"--level must be in (0, 1), got {args.level}")
    scores: dict[str, dict[int, float]] = defaultdict(dict)
    with args.results.open() as handle:
        for row in csv.DictReader(handle):
            if row["student_score"]:
                scores[row["objective"]][int(row["seed"])] = float(row["student_score"])
    print(
        f"{'difference':<24} {'mean':>7} {f'{args.level:.2%} interval':>20} {'n':>3} {'sd':>6} {'detectable':>10}"
    )
    for pair in args.pairs:
        first, second = pair.split(":")
        missing = [arm for arm in (first, second) if arm not in scores]
        if missing:
            parser.error(
                f"{args.results} has no runs of {', '.join(missing)}; arms: {', '.join(sorted(scores))}"
            )
        seeds = sorted(set(scores[first]) & set(scores[second]))
        differences = [scores[second][seed] - scores[first][seed] for seed in seeds]
        mean, low, high = confidence_interval(differences, args.level)
        _, spread = mean_std(differences)
        detectable = detectable_effect(differences, args.level)
        print(
            f"{second + ' - ' + first:<24} {mean:>+7.2f} {f'[{low:+.2f}, {high:+.2f}]':>20} "
            f"{len(differences):>3} {spread:>6.2f} {detectable:>10.2f}"
        )


if __name__ == "__main__":
    main()
