"""Forward+backward time and peak memory of forward_kl and atkd_loss, unchunked and chunked.

Prints one table, every figure also as a ratio to unchunked forward_kl; the first row is the naive
eager forward KL (``log_softmax`` of both sides + ``kl_div``) for comparison, and the last rows put
the other dense divergences (unchunked) beside naive eager versions of them: TRL's generalized JSD
(a logsumexp mixture and two ``kl_div``), TVD from two softmaxes, DistiLLM's skew KL. The rows
marked "compiled" run the training objectives (cross-entropy, forward KL, ATKD on a sparse K=64
teacher, chunked) eagerly and with ``loss.compile: on`` (each chunk's math through torch.compile;
compiling happens in the untimed warm-up pass). Time is the median of the
timed passes. Peak memory is the most tensor memory allocated at once during one pass, above the
inputs: on CPU from the profiler's allocation events, on CUDA ``torch.cuda.max_memory_allocated``.

    .venv/bin/python benchmarks/loss_bench.py                 # N=4096, V=32000, chunk 128
    .venv/bin/python benchmarks/loss_bench.py --tokens 1024 --vocab 8000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from atkd_core.losses import SparseTeacher, atkd_loss, divergence_loss, forward_kl

NAIVE = "naive log_softmax+kl_div"
OBJECTIVES = ("sft", "kd", "atkd K=64")
CASES = [
    (NAIVE, None),
    ("forward_kl", None),
    ("forward_kl", "chunk"),
    ("atkd_loss", None),
    ("atkd_loss", "chunk"),
    ("atkd_loss sparse K=64", "chunk"),
    ("naive jsd (TRL)", None),
    ("generalized_jsd", None),
    ("naive tvd", None),
    ("tvd", None),
    ("naive skew kl", None),
    ("skew_forward_kl", None),
    *((f"{objective} objective", how) for objective in OBJECTIVES for how in ("chunk", "compiled")),
]
BETA, ALPHA = 0.5, 0.1


def naive_loss(name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The eager loss a user would write for ``name`` from the definitions: [N, V] x 2 -> mean."""
    functional = torch.nn.functional
    log_q, log_p = functional.log_softmax(student, -1), functional.log_softmax(teacher, -1)
    if name == NAIVE:
        total = functional.kl_div(log_q, log_p, log_target=True, reduction="sum")
    elif name == "naive jsd (TRL)":
        mixture = torch.logsumexp(torch.stack([log_q + math.log(1 - BETA), log_p + math.log(BETA)]), dim=0)
        total = (
            BETA * functional.kl_div(mixture, log_p, reduction="none", log_target=True)
            + (1 - BETA) * functional.kl_div(mixture, log_q, reduction="none", log_target=True)
        ).sum()
    elif name == "naive tvd":
        total = 0.5 * (functional.softmax(student, -1) - functional.softmax(teacher, -1)).abs().sum()
    else:
        mixture = torch.logaddexp(log_p + math.log(ALPHA), log_q + math.log(1 - ALPHA))
        total = functional.kl_div(mixture, log_p, reduction="sum", log_target=True)
    return total / student.shape[0]


def _peak_cpu_bytes(step: Callable[[], None]) -> int:
    """Most tensor bytes live at once during ``step``, counted from its start (profiler events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def _peak_cuda_bytes(step: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def run_case(args: argparse.Namespace, name: str, chunked: str | None) -> tuple[float, int]:
    """(median seconds of forward+backward, peak extra bytes) for one case."""
    torch.manual_seed(0)
    device = args.device
    chunk_size = args.chunk if chunked else None
    student = torch.randn(args.tokens, args.vocab, device=device, requires_grad=True)
    teacher = torch.randn(args.tokens, args.vocab, device=device) * 2
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    if "sparse" in name or "K=64" in name:
        log_p = torch.log_softmax(teacher, -1)
        top = log_p.topk(64, -1)
        teacher = SparseTeacher(log_p.gather(-1, targets[:, None]).squeeze(-1), top.indices.int(), top.values)

    objective = None
    if name.endswith(" objective"):
        from atkd_core.config import LossConfig
        from atkd_core.losses.objective import CrossEntropy, StepCounts, build_objective

        kind = name.split()[0]
        compiled = chunked == "compiled"
        config = LossConfig(objective=kind, chunk_size=args.chunk, hard_fraction=0.5)  # type: ignore[arg-type]
        objective = CrossEntropy(args.chunk, compiled) if kind == "sft" else build_objective(config, compiled)
        counts = StepCounts(float(args.tokens))

    def step() -> None:
        if objective is not None:
            loss = objective(student, teacher, targets, counts).loss
        elif name.startswith("naive"):
            loss = naive_loss(name, student, teacher)
        elif name == "forward_kl":
            loss = forward_kl(student, teacher, targets, chunk_size=chunk_size)
        elif name in ("generalized_jsd", "tvd", "skew_forward_kl"):
            params = {"generalized_jsd": {"beta": BETA}, "skew_forward_kl": {"alpha": ALPHA}}.get(name, {})
            loss = divergence_loss(name, student, teacher, targets, chunk_size=chunk_size, **params)
        else:
            loss = atkd_loss(student, teacher, targets, chunk_size=chunk_size).loss
        loss.backward()
        student.grad = None

    step()  # warm-up: first-call costs are not the loss's
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = _peak_cuda_bytes(step) if device == "cuda" else _peak_cpu_bytes(step)
    return statistics.median(times), peak


def main() -> None:
    """Run every case and print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N token positions")
    parser.add_argument("--vocab", type=int, default=32000, help="V vocabulary size")
    parser.add_argument("--chunk", type=int, default=128, help="tokens per chunk in the chunked cases")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    results = [(name, chunked, *run_case(args, name, chunked)) for name, chunked in CASES]

    base_time, base_memory = results[1][2], results[1][3]
    print(
        f"device={args.device} threads={torch.get_num_threads()} N={args.tokens} V={args.vocab} "
        f"chunk={args.chunk} repeats={args.repeats} (fp32, forward+backward)"
    )
    print(
        f"| {'loss':<24} | {'chunked':<8} | {'time (s)':>8} | {'x fwd KL':>8} | {'peak extra MiB':>14} | {'x fwd KL':>8} |"
    )
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 16}|{'-' * 10}|")
    for name, chunked, seconds, memory in results:
        print(
            f"| {name:<24} | {chunked or 'no':<8} | {seconds:>8.3f} | {seconds / base_time:>8.2f} | "
            f"{memory / 2**20:>14.0f} | {memory / base_memory:>8.2f} |"
        )


if __name__ == "__main__":
    main()
