"""Training throughput per objective, padded against packed batches, on Dolly-shaped lengths.

Every case trains the same student on the same batches (same seed, same steps) in one process under
DeepSpeed ZeRO-2, twice: right-padded batches (training.packing false) and packed ones (true). The
data are synthetic rows whose prompt and response lengths follow databricks-dolly-15k's
(``benchmarks/dolly_shape.py``; ``--data demo`` takes the demo's suite instead), at the paper's
512-token limit. The teacher is the demo's teacher preset, random-init (its weights do not change
the cost). Rates are medians over the steps after the first three; response tokens are the trained
targets. The packed and padded runs log the same per-step losses up to float rounding; the table
shows the largest relative difference.

    .venv/bin/python benchmarks/train_bench.py
    .venv/bin/python benchmarks/train_bench.py --steps 30 --teacher neox-medium --data demo
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dolly_shape import write_dolly_shaped  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# (name, teacher source, objective, extra overrides). "sft plain logits": the model's own output
# layer makes every logit before the loss (loss.fused_linear false), the reference a user compares with.
CASES = [
    ("sft", "offline", "sft", []),
    ("sft plain logits", "offline", "sft", ["loss.fused_linear=false"]),
    ("kd offline", "offline", "kd", []),
    ("atkd offline", "offline", "atkd", []),
    ("kd online", "online", "kd", []),
    ("atkd online", "online", "atkd", []),
]


def data_settings(kind: str, root: Path, rows: int, max_length: int) -> list[str]:
    """Config overrides that point the demo config at ``kind``'s data."""
    if kind == "demo":
        return []
    path = write_dolly_shaped(root / "dolly-shaped.jsonl", rows)
    return [
        "data.source=files",
        f"data.train_files=[{path}]",
        f"data.max_length={max_length}",
        "data.field_preset=dolly",
    ]


def main() -> None:
    """Train each case padded and packed for the same steps and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--teacher", default="neox-small", help="teacher preset")
    parser.add_argument("--student", default="neox-tiny", help="student preset")
    parser.add_argument("--data", choices=("dolly", "demo"), default="dolly", help="the rows trained on")
    parser.add_argument("--rows", type=int, default=1200, help="Dolly-shaped rows written (--data dolly)")
    parser.add_argument("--max-length", type=int, default=512, help="data.max_length for --data dolly")
    parser.add_argument("--cases", nargs="+", default=[case[0] for case in CASES], help="which objectives")
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
            *data_settings(args.data, root, args.rows, args.max_length),
            *args.overrides,
        ]
        base = load_config(REPO / "configs" / "demo.yaml", [f"workdir={root}", *shared])
        prepared, _ = prepare_data(base, root / "prepared", log=lambda _: None)
        tokenizer = root / "prepared" / "tokenizer"
        progress(f"data prepared: {prepared.counts['train'].rows} training examples")
        teacher = Path(materialize_model(base.teacher, tokenizer, root / "teacher"))
        progress(f"teacher {args.teacher} initialised")
        student = Path(materialize_model(base.student, tokenizer, root / "student"))
        progress(f"student {args.student} initialised")
        # The pipeline's scoring stage: on the GPU when there is one, with the config's settings.
        cache, _, _ = score_from_config(base, teacher, root / "prepared", log=lambda _: None)
        progress("teacher scored")
        results = []
        for name, source, objective, extra in (case for case in CASES if case[0] in args.cases):
            runs = {}
            for packing in (False, True):
                label = f"{name.replace(' ', '-')}-{'packed' if packing else 'padded'}"
                config = load_config(
                    REPO / "configs" / "demo.yaml",
                    [
                        f"workdir={root / label}",
                        f"distill.teacher_source={source}",
                        f"distill.training.max_steps={args.steps}",
                        f"distill.training.packing={str(packing).lower()}",
                        f"loss.objective={objective}",
                        "distill.training.eval_every=100000",
                        *shared,
                        *extra,
                    ],
                )
                # The pipeline's own distillation job (it resolves loss.hard_fraction auto, if --set asks).
                job = distill_job(config, root / "prepared", student, cache, teacher)
                progress(f"{label}: training")
                run_training(job, lambda metrics, step: None, log=progress)
                runs[packing] = [
                    json.loads(line) for line in (job.output_dir / "metrics.jsonl").read_text().splitlines()
                ]
            results.append((name, runs))
        sizes = {
            role: count_parameters(load_model(path))
            for role, path in (("student", student), ("teacher", teacher))
        }
    training = base.distill.training
    print(
        f"student {args.student} ({sizes['student'] / 1e6:.1f}M), teacher {args.teacher} ({sizes['teacher'] / 1e6:.1f}M), "
        f"{args.data} data (max_length {base.data.max_length}), vocabulary {base.tokenizer.pad_to or base.tokenizer.vocab_size}, "
        f"batch {training.batch_size} (micro {training.micro_batch_size}), {args.steps} steps, "
        f"ZeRO-{training.zero_stage}, precision {training.precision}, optimizer {training.optim.name}"
    )

    def median(history: list[dict[str, float]], key: str) -> float:
        return statistics.median(record[key] for record in history[min(3, len(history) - 1) :])

    sft_packed = median(results[0][1][True], "tokens_per_s") if results[0][0] == "sft" else None
    mfu_title = " MFU packed |" if args.peak_tflops else ""
    print(
        "| objective | padded tokens/s | packed tokens/s | packed / padded | padding share padded → packed "
        f"| step time vs sft (packed) | largest loss difference |{mfu_title}"
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if args.peak_tflops else ""))
    for name, runs in results:
        padded, packed = median(runs[False], "tokens_per_s"), median(runs[True], "tokens_per_s")
        difference = max(
            abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)
            for a, b in zip(runs[True], runs[False], strict=True)
        )
        versus_sft = f"{sft_packed / packed:.2f}x" if sft_packed else "-"
        line = (
            f"| {name} | {padded:,.0f} | {packed:,.0f} | {packed / padded:.2f}x "
            f"| {median(runs[False], 'padding_share'):.0%} → {median(runs[True], 'padding_share'):.0%} "
            f"| {versus_sft} | {difference:.1e} |"
        )
        if args.peak_tflops:
            # Model FLOPs per response token: 6 per student parameter (forward + backward), 2 per
            # teacher parameter when the teacher runs in the loop (online).
            flops = 6 * sizes["student"] + (2 * sizes["teacher"] if "online" in name else 0)
            line += f" {flops * packed / (args.peak_tflops * 1e12):.1%} |"
        print(line)


if __name__ == "__main__":
    main()
