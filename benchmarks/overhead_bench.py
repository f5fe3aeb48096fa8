"""Orchestration overhead: the demo pipeline as a Prefect flow with MLflow tracking vs the same
stage functions called directly with tracking off, side by side in one process.

Each run starts from an empty workdir (no reused stage), and the two variants alternate so that
neither gets all the warm runs. Before timing, the local Prefect API is started once (a one-time
cost per process, reported separately) and a tiny untimed direct run pays the imports and one-time
op builds that would otherwise land on whichever variant runs first.

    .venv/bin/python benchmarks/overhead_bench.py
    .venv/bin/python benchmarks/overhead_bench.py --repeats 3 --set eval.limit=10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from infra.settings import apply_environment_defaults

apply_environment_defaults()

from atkd_core.config import PipelineConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_direct(config: PipelineConfig) -> None:
    """Every stage through atkd_core alone, in the pipeline's order: no Prefect, no MLflow."""
    from atkd_core.pipeline import LocalStages, pipeline_outputs
    from infra.launcher import launch_training

    def quiet(_: str) -> None:
        return None

    stages = LocalStages(
        config, train=lambda job: launch_training(job, lambda metrics, step: None, quiet), log=quiet
    )
    pipeline_outputs(config, stages)


def run_flow(config: PipelineConfig) -> None:
    """The pipeline flow with MLflow tracking (a local SQLite store in the workdir)."""
    from flows.distill import distill_pipeline

    distill_pipeline(config)


def main() -> None:
    """Time both variants ``--repeats`` times each and print the table and the overhead."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from prefect import flow

    @flow
    def warm_up() -> None:
        """Starts the temporary local API (the one-time cost excluded from the comparison)."""

    started = time.perf_counter()
    warm_up()
    api_start = time.perf_counter() - started

    times: dict[str, list[float]] = {"direct, tracking off": [], "Prefect flow + MLflow": []}
    variants = list(zip(times, (run_direct, run_flow), strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        tiny = ["data.embedded.train_size=32", "data.embedded.validation_size=8", "data.embedded.test_size=8"]
        run_direct(
            load_config(args.config, [*args.overrides, *tiny, "eval.limit=1", f"workdir={tmp}/warm-up"])
        )
        for repeat in range(args.repeats):
            order = variants if repeat % 2 == 0 else variants[::-1]
            for name, run in order:
                workdir = Path(tmp) / f"{repeat}-{name.split(',')[0].split()[0]}"
                config = load_config(args.config, [*args.overrides, f"workdir={workdir}"])
                started = time.perf_counter()
                run(config)
                times[name].append(time.perf_counter() - started)
                print(f"repeat {repeat + 1}: {name:<24} {times[name][-1]:7.1f} s", flush=True)

    direct, orchestrated = (statistics.median(v) for v in times.values())
    print(f"\none-time local Prefect API start: {api_start:.1f} s (not counted)")
    print(f"{'variant':<24} {'median s':>9}  runs")
    for name, values in times.items():
        print(f"{name:<24} {statistics.median(values):9.1f}  {', '.join(f'{v:.1f}' for v in values)}")
    print(f"overhead: {100 * (orchestrated / direct - 1):+.1f}% of wall time (target <= 5%)")


if __name__ == "__main__":
    main()
