"""Training step time and tokens/s for the same student: sft, kd offline, atkd offline, atkd online.

All four train the demo's student on the demo's data (same batches, same steps) in one process under
DeepSpeed ZeRO-2, fp32 on CPU; the teacher is the demo's teacher preset (its weights do not change
the cost). Step times are medians after the first steps; ratios are to sft.

    .venv/bin/python benchmarks/train_bench.py
    .venv/bin/python benchmarks/train_bench.py --steps 30 --teacher neox-medium
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from atkd_core.config import load_config
from atkd_core.data.prepare import prepare_data
from atkd_core.models.build import count_parameters, load_model, materialize_model
from atkd_core.scoring import score_from_config
from atkd_core.training.job import distill_job
from atkd_core.training.main import run_training

REPO = Path(__file__).resolve().parents[1]
CASES = [
    ("sft", "offline", {"objective": "sft"}),
    ("kd offline", "offline", {"objective": "kd"}),
    ("atkd offline", "offline", {"objective": "atkd"}),
    ("atkd online", "online", {"objective": "atkd"}),
]


def main() -> None:
    """Train each case for the same steps and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per case")
    parser.add_argument("--teacher", default="neox-small", help="teacher preset")
    parser.add_argument("--student", default="neox-tiny", help="student preset")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak dense TFLOP/s: adds an MFU column"
    )
    args = parser.parse_args()
    started = time.perf_counter()

    def progress(message: str) -> None:
        """Each phase on stderr with the time since start: a real-size run spends minutes before
        its first step (model init, scoring, op builds), and a timed-out run shows where."""
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shared = [
            # A random-init teacher's UNC has no valley for ``auto`` to split at; the split's
            # share does not change the cost, so the paper's k.
            "loss.hard_fraction=0.5",
            f"teacher.preset={args.teacher}",
            f"student.preset={args.student}",
            *args.overrides,
        ]
        base = load_config(REPO / "configs" / "demo.yaml", [f"workdir={root}", *shared])
        prepare_data(base, root / "prepared", log=lambda _: None)
        tokenizer = root / "prepared" / "tokenizer"
        progress("data prepared")
        teacher = Path(materialize_model(base.teacher, tokenizer, root / "teacher"))
        progress(f"teacher {args.teacher} initialised")
        student = Path(materialize_model(base.student, tokenizer, root / "student"))
        progress(f"student {args.student} initialised")
        # The pipeline's scoring stage: on the GPU when there is one, with the config's settings.
        cache, _, _ = score_from_config(base, teacher, root / "prepared", log=lambda _: None)
        progress("teacher scored")
        rows = []
        for name, source, loss in CASES:
            config = load_config(
                REPO / "configs" / "demo.yaml",
                [
                    f"workdir={root / name.replace(' ', '-')}",
                    f"distill.teacher_source={source}",
                    f"distill.training.max_steps={args.steps}",
                    f"loss.objective={loss['objective']}",
                    "distill.training.eval_every=100000",
                    *shared,
                ],
            )
            # The pipeline's own distillation job (it resolves loss.hard_fraction auto, if --set asks for it).
            job = distill_job(config, root / "prepared", student, cache, teacher)
            progress(f"{name}: training")
            run_training(job, lambda metrics, step: None, log=progress)
            history = [
                json.loads(line) for line in (job.output_dir / "metrics.jsonl").read_text().splitlines()
            ]
            steady = history[min(3, len(history) - 1) :]
            rows.append((name, statistics.median(r["tokens_per_s"] for r in steady)))
        sizes = {
            role: count_parameters(load_model(path))
            for role, path in (("student", student), ("teacher", teacher))
        }
    sft_rate = rows[0][1]
    training = base.distill.training
    print(
        f"student {args.student} ({sizes['student'] / 1e6:.1f}M), teacher {args.teacher} ({sizes['teacher'] / 1e6:.1f}M), "
        f"demo data, vocabulary {base.tokenizer.pad_to or base.tokenizer.vocab_size}, batch {training.batch_size}, "
        f"{args.steps} steps, ZeRO-{training.zero_stage}, precision {training.precision}, optimizer {training.optim.name}"
    )
    mfu_title = " MFU |" if args.peak_tflops else ""
    print(f"| objective | response tokens/s | step time vs sft |{mfu_title}")
    print("|---|---|---|" + ("---|" if args.peak_tflops else ""))
    # Every case trains on the same batches, so the step-time ratio is the inverse throughput ratio.
    for name, rate in rows:
        line = f"| {name} | {rate:,.0f} | {sft_rate / rate:.2f}x |"
        if args.peak_tflops:
            # Model FLOPs: 6 per student parameter per token (forward + backward), 2 per teacher
            # parameter when the teacher runs in the loop (online).
            flops = 6 * sizes["student"] + (2 * sizes["teacher"] if "online" in name else 0)
            line += f" {flops * rate / (args.peak_tflops * 1e12):.1%} |"
        print(line)


if __name__ == "__main__":
    main()
