"""Entry point of a training stage: in-process, or on every rank under the DeepSpeed launcher.

    deepspeed --num_gpus 2 --master_addr 127.0.0.1 --module atkd_core.training.main \
        --config resolved.yaml --stage distill --prepared P --init S --out O --checkpoints C --cache K
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atkd_core.config import load_config
from atkd_core.manifest import fingerprint, read_manifest, sha256_file
from atkd_core.training.ds_config import render_ds_config, resolve_device
from atkd_core.training.loop import MetricsFn, TrainJob, cleanup, save_model, setup, train


def model_card(job: TrainJob, history: list[dict[str, float]]) -> str:
    """A short README saying how the model was made."""
    final = history[-1] if history else {}
    loss = job.config.loss
    how = (
        "supervised fine-tuning (cross-entropy)"
        if job.objective == "sft"
        else f"{job.objective} ({loss.divergence if job.objective == 'kd' else loss.setting + ' setting'}, "
        f"k={loss.hard_fraction}, lambda={loss.lam}, T={loss.temperature}), teacher {job.config.distill.teacher_source}"
    )
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
    """setup -> train -> save -> cleanup; returns the output manifest (rank 0) or {}."""
    finished = finished_output(job)
    if finished is not None:
        log(f"{job.stage}: reused {job.output_dir}")
        return finished
    state = setup(job, log)
    try:
        history = train(job, state, log_metrics, log)
        save_model(job, state, model_card(job, history))
    finally:
        cleanup(state)
    if state.rank != 0:
        return {}
    shutil.copy(job.checkpoint_dir / "metrics.jsonl", job.output_dir / "metrics.jsonl")
    device = resolve_device(job.training)
    (job.output_dir / "ds_config.json").write_text(
        json.dumps(render_ds_config(job.training, device), indent=2)
    )
    manifest = {
        "stage": job.stage,
        "input_fingerprint": job.fingerprint(),
        "objective": job.objective,
        "steps": len(history) and history[-1]["step"],
        "final": history[-1] if history else {},
        "world_size": state.world_size,
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
    """Parse the launcher's arguments and run the stage on this rank."""
    parser = argparse.ArgumentParser(description="one training stage (every rank runs this)")
    parser.add_argument("--config", type=Path, required=True, help="resolved pipeline YAML")
    parser.add_argument("--stage", choices=["finetune", "distill"], required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--init", type=Path, required=True, help="initial model directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None, help="teacher cache (offline)")
    parser.add_argument("--teacher", type=Path, default=None, help="teacher model (online)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    job = TrainJob(
        stage=args.stage,
        config=load_config(args.config),
        prepared_dir=args.prepared,
        init_dir=args.init,
        output_dir=args.out,
        checkpoint_dir=args.checkpoints,
        cache_dir=args.cache,
        teacher_dir=args.teacher,
    )
    run_training(job, log_metrics=lambda metrics, step: None)


if __name__ == "__main__":
    main()
