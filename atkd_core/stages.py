"""One body per stage.

The local runner (``LocalStages``: ``atkd data prepare``, ``score``, ``train``, ``run --direct``)
and the Prefect tasks call these same functions, so the two ways to run a stage cannot drift; a
task adds only caching, retries and tracking around the call. Each writes its output under the
config's layout, logs one line saying what it made (or reused), and returns what the caller needs
to report it. Training stages are planned here (``distill_plan``) and run by the caller's trainer
(in-process or the DeepSpeed launcher).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic

from atkd_core.config import PipelineConfig
from atkd_core.data.generate import generate_teacher_data
from atkd_core.data.prepare import prepare_data
from atkd_core.devices import default_device
from atkd_core.evaluation.harness import run_evaluation
from atkd_core.manifest import Manifest
from atkd_core.outputs import CacheManifest, PreparedManifest
from atkd_core.reports.difficulty import token_difficulty_report
from atkd_core.scoring import TeacherCache, score_from_config
from atkd_core.storage import Location
from atkd_core.training.job import TrainJob, auto_split_line, distill_job

Log = Callable[[str], None]


@dataclass(frozen=True)
class StageOutput(Generic[Manifest]):
    """What a stage made: its output directory (for a teacher cache kept in object storage, its
    URL), its manifest, and whether it was reused as it was."""

    directory: Location
    manifest: Manifest
    reused: bool

    def verb(self) -> str:
        """'reused' or 'wrote', for the stage's line in the log."""
        return "reused" if self.reused else "wrote"


def prepare(config: PipelineConfig, log: Log) -> StageOutput[PreparedManifest]:
    """prepare_data into ``<workdir>/prepared``."""
    output = config.layout.prepared
    manifest, reused = prepare_data(config, output, log=log)
    made = StageOutput(output, manifest, reused)
    counts = ", ".join(f"{split} {c.rows} rows / {c.tokens} tokens" for split, c in manifest.counts.items())
    log(f"prepare_data: {made.verb()} {output}: {counts}")
    return made


def generate(
    config: PipelineConfig, prepared: Path, teacher: Path, log: Log
) -> StageOutput[PreparedManifest]:
    """SeqKD: the teacher's responses to the training prompts into ``<workdir>/teacher_generated``."""
    output = config.layout.teacher_generated
    manifest, reused = generate_teacher_data(
        config, prepared, teacher, output, device=default_device(), log=log
    )
    made = StageOutput(output, manifest, reused)
    log(f"generate_teacher_data: {made.verb()} {output}")
    return made


def score(
    config: PipelineConfig, train_data: Path, teacher: Path, log: Log
) -> tuple[StageOutput[CacheManifest], dict[str, Any]]:
    """score_teacher into ``<workdir>/teacher_cache`` (and ``scoring.location``, when set) and the
    teacher's token-difficulty report into ``<workdir>/reports/teacher``; returns (the cache, read
    from where distillation will read it, and the report)."""
    output, manifest, reused = score_from_config(config, teacher, train_data, log)
    made = StageOutput(output, manifest, reused)
    report = token_difficulty_report(
        TeacherCache(output),
        train_data,
        config.loss.hard_fraction,
        config.layout.teacher_report,
        unc_epsilon=config.loss.unc_epsilon,
    )
    log(
        f"score_teacher: {made.verb()} {output}: {manifest.tokens} tokens, "
        f"{manifest.cache_bytes / 2**20:.1f} MiB, UNC median {manifest.unc_quantiles['0.5']:.3f}"
    )
    return made, report


def distill_plan(
    config: PipelineConfig, train_data: Path, student_init: Path, cache: Location, teacher: Path, log: Log
) -> TrainJob:
    """The distillation job (``loss.hard_fraction: auto`` or ``epsilon`` made concrete from the
    cache, and said)."""
    job = distill_job(config, train_data, student_init, cache, teacher)
    if (line := auto_split_line(config, job)) is not None:
        log(f"distill: {line}")
    return job


def evaluate(config: PipelineConfig, prepared: Path, models: dict[str, Path], log: Log) -> dict[str, Any]:
    """The harness on ``models`` (name -> directory) into ``<workdir>/eval``; returns its report."""
    output = config.layout.eval
    report = run_evaluation(config, prepared, models, output, device=default_device(), log=log)
    log(f"evaluate: wrote {output}\n{report['summary_markdown']}")
    return report
