"""A training stage from start to finish, and its entry point on every launched rank.

In-process, ``run_training(job, ...)``. Under the DeepSpeed launcher, every rank runs::

    deepspeed --num_gpus 2 --master_addr 127.0.0.1 --module atkd_core.training.main --job job.json

where ``job.json`` is ``TrainJob.save``'s file (the resolved config and the paths).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from atkd_core.manifest import (
    atomic_output,
    content_identity,
    fingerprint,
    sha256_file,
    up_to_date_manifest,
    write_manifest,
)
from atkd_core.outputs import TrainedModelManifest
from atkd_core.progress import quiet_third_party_output
from atkd_core.training.checkpoint import METRICS_FILE, save_model
from atkd_core.training.distributed import process_group
from atkd_core.training.ds_config import render_ds_config, resolve_device
from atkd_core.training.job import MetricsFn, TrainJob
from atkd_core.training.loop import cleanup, setup, train
from atkd_core.training.ops import needed_op_builders


def model_card(job: TrainJob, history: list[dict[str, float]]) -> str:
    """A short README saying how the model was made."""
    final = history[-1] if history else {}
    how = job.build_objective().describe()
    if job.stage == "distill" and job.objective != "sft":
        how += f", teacher {job.config.distill.teacher_source}"
    return (
        f"# {job.config.name}: {job.stage}\n\nMade by the ATKD distillation pipeline by {how}.\n\n"
        f"- initial weights: `{job.init_dir}`\n- data: `{job.prepared_dir}`\n"
        f"- steps: {final.get('step', 0)}, final loss {final.get('loss', float('nan')):.4f}, "
        f"validation loss {final.get('val_loss', float('nan')):.4f}\n"
        f"- training: {json.dumps(job.training.model_dump(mode='json'))}\n"
    )


def finished_output(job: TrainJob) -> TrainedModelManifest | None:
    """The manifest of an output already trained from the same settings and inputs."""
    return up_to_date_manifest(job.output_dir, TrainedModelManifest, job.fingerprint())


def run_training(
    job: TrainJob, log_metrics: MetricsFn, log: Callable[[str], None] = print
) -> TrainedModelManifest | None:
    """setup -> train -> save -> cleanup on this rank; returns the output's manifest on rank 0,
    None on the others.

    An output already trained from the same settings and inputs is reused, not trained again. The
    model is written the way every stage output is (``atkd_core.manifest``): into a temporary
    sibling of ``job.output_dir`` that replaces it, manifest last, in one rename.
    """
    finished = finished_output(job)
    if finished is not None:
        log(f"{job.stage}: reused {job.output_dir}")
        return finished
    device = resolve_device(job.training, f"{job.stage}.training")
    with process_group(device, needed_op_builders(job.training, device), log) as (rank, world_size):
        state = setup(job, rank, world_size, device, log)
        try:
            history = train(job, state, log_metrics, log)
            with atomic_output(job.output_dir) if rank == 0 else nullcontext(None) as staging:
                save_model(job, state, model_card(job, history), staging)
                manifest = (
                    None if staging is None else _finish_output(job, history, world_size, device, staging)
                )
        finally:
            cleanup(state)
    return manifest


def _finish_output(
    job: TrainJob, history: list[dict[str, float]], world_size: int, device: str, staging: Path
) -> TrainedModelManifest:
    """The output's metrics, DeepSpeed config and manifest beside the saved model in ``staging``."""
    shutil.copy(job.checkpoint_dir / METRICS_FILE, staging / METRICS_FILE)
    (staging / "ds_config.json").write_text(json.dumps(render_ds_config(job.training, device), indent=2))
    # The weights and architecture only: metrics.jsonl carries timings that differ run to run.
    weights = sorted(staging.glob("*.safetensors")) + [staging / "config.json"]
    return write_manifest(
        staging,
        TrainedModelManifest,
        stage=job.stage,
        input_fingerprint=job.fingerprint(),
        content_sha256=fingerprint({p.name: sha256_file(p) for p in weights}),
        objective=job.objective,
        steps=int(history[-1]["step"]) if history else 0,
        final=history[-1] if history else {},
        world_size=world_size,
        # What it was trained on, for the registry's tags (the fingerprint hashes it in too).
        train_data_sha256=content_identity(job.prepared_dir),
    )


def main(argv: list[str] | None = None) -> None:
    """Load the job file and run the stage on this rank."""
    parser = argparse.ArgumentParser(description="one training stage (every rank runs this)")
    parser.add_argument("--job", type=Path, required=True, help="the job file TrainJob.save wrote")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_third_party_output()
    run_training(TrainJob.load(args.job), log_metrics=lambda metrics, step: None)


if __name__ == "__main__":
    main()
