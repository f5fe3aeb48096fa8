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
from pathlib import Path
from typing import Any

from atkd_core.manifest import content_identity, fingerprint, read_manifest, sha256_file
from atkd_core.progress import quiet_third_party_output
from atkd_core.training.checkpoint import METRICS_FILE, save_model
from atkd_core.training.distributed import process_group
from atkd_core.training.ds_config import render_ds_config, resolve_device
from atkd_core.training.job import MetricsFn, TrainJob
from atkd_core.training.loop import cleanup, setup, train


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


def finished_output(job: TrainJob) -> dict[str, Any] | None:
    """The manifest of an output already trained from the same settings and inputs, marked reused."""
    existing = read_manifest(job.output_dir)
    if existing is not None and existing.get("input_fingerprint") == job.fingerprint():
        return {**existing, "reused": True}
    return None


def run_training(job: TrainJob, log_metrics: MetricsFn, log: Callable[[str], None] = print) -> dict[str, Any]:
    """setup -> train -> save -> cleanup on this rank; returns the output manifest (rank 0) or {}.

    An output already trained from the same settings and inputs is reused, not trained again.
    """
    finished = finished_output(job)
    if finished is not None:
        log(f"{job.stage}: reused {job.output_dir}")
        return finished
    device = resolve_device(job.training, f"{job.stage}.training")
    with process_group(device) as (rank, world_size):
        state = setup(job, rank, world_size, device, log)
        try:
            history = train(job, state, log_metrics, log)
            save_model(job, state, model_card(job, history))
        finally:
            cleanup(state)
    if rank != 0:
        return {}
    return _write_manifest(job, history, world_size, device)


def _write_manifest(
    job: TrainJob, history: list[dict[str, float]], world_size: int, device: str
) -> dict[str, Any]:
    """The output's metrics, DeepSpeed config and manifest beside the saved model."""
    shutil.copy(job.checkpoint_dir / METRICS_FILE, job.output_dir / METRICS_FILE)
    (job.output_dir / "ds_config.json").write_text(
        json.dumps(render_ds_config(job.training, device), indent=2)
    )
    manifest = {
        "stage": job.stage,
        "input_fingerprint": job.fingerprint(),
        "objective": job.objective,
        "steps": len(history) and history[-1]["step"],
        "final": history[-1] if history else {},
        "world_size": world_size,
        # What it was trained on, for the registry's tags (the fingerprint above hashes it in too).
        "train_data_sha256": content_identity(job.prepared_dir),
        # The weights and architecture only: metrics.jsonl carries timings that differ run to run.
        "content_sha256": fingerprint(
            {
                p.name: sha256_file(p)
                for p in sorted(job.output_dir.glob("*.safetensors")) + [job.output_dir / "config.json"]
            }
        ),
    }
    (job.output_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


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
