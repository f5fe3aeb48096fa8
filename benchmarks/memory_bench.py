"""Peak memory and time of one optimizer step at real vocabulary sizes: fused-linear vs plain logits.

Each variant runs in a fresh subprocess: a student trunk (embedding -> linear -> tanh, width H) and
its output layer [V, H], one optimizer step (forward + loss + backward + AdamW step) on N tokens.
Memory: the most the allocator held at once during the step above what it held before (the
model, the inputs and the teacher are already there; gradients and AdamW's state, allocated by
the step, are the same for every variant): on CPU from the profiler's allocation events, on CUDA
``max_memory_allocated``. Time: on CPU the same step (under the profiler, whose overhead is small
next to these matmuls); on CUDA the median of three further steps, since the first pays one-time
set-up. Ratios are to "sft fused".

    .venv/bin/python benchmarks/memory_bench.py                       # V 32k and 128k at N 4k, CPU
    .venv/bin/python benchmarks/memory_bench.py --vocab 152064 --tokens 16384 --device cuda
    PYTHONPATH=/tmp/liger .venv/bin/python benchmarks/memory_bench.py  # with Liger-Kernel beside it

Variants: sft with the model's own loss (logits, then cross-entropy as transformers computes it),
sft fused, kd (forward KL) and atkd on plain logits (the pre-fusion path), kd and atkd fused with
the offline top-64 teacher, atkd fused with an online teacher (its hidden states [N, 2048] and
output layer), and Liger-Kernel's fused-linear JSD on the same online inputs when it imports
(install it outside the lock, e.g. ``pip install --no-deps --target /tmp/liger liger-kernel``).
A variant whose plain logits would not fit (an estimate against the machine's free memory) is
reported as skipped, not run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER_WIDTH = 2048  # Pythia-1.4B's width
TOP_K = 64
CUDA_TIMED_STEPS = 3
VARIANTS = (
    "sft model loss",
    "sft fused",
    "kd plain",
    "atkd plain",
    "kd fused",
    "atkd fused",
    "atkd fused online",
    "liger jsd fused online",
)


def run_variant(
    variant: str, vocab: int, tokens: int, hidden: int, device: str, chunk: str, dtype: str
) -> dict:
    """One step of ``variant`` in this process; returns its peak memory above the start and time."""
    import torch

    sys.path.insert(0, str(REPO))
    from atkd_core.config import LossConfig
    from atkd_core.losses import LinearHead, SparseTeacher
    from atkd_core.losses.objective import StepCounts, build_objective

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(
        torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, hidden), torch.nn.Tanh()
    )
    head = torch.nn.Linear(hidden, vocab, bias=False)
    model = torch.nn.ModuleDict({"trunk": trunk, "head": head}).to(device, getattr(torch, dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (tokens,), device=device)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    logprobs = torch.log_softmax(torch.randn(tokens, TOP_K + 1, device=device), -1)
    sparse = SparseTeacher(
        target_logprob=logprobs[:, 0],
        topk_ids=torch.randint(0, vocab, (tokens, TOP_K), device=device).int(),
        topk_logprobs=logprobs[:, :TOP_K],
        log_tail_mass=logprobs[:, TOP_K],
    )
    teacher_hidden = torch.randn(tokens, TEACHER_WIDTH, device=device, dtype=getattr(torch, dtype))
    teacher_weight = torch.randn(vocab, TEACHER_WIDTH, device=device, dtype=getattr(torch, dtype)) * 0.02
    counts = StepCounts(tokens=float(tokens))
    chunk_size: int | str = int(chunk) if chunk.isdigit() else chunk

    def objective(name: str):
        return build_objective(LossConfig(objective=name, chunk_size=chunk_size))  # type: ignore[arg-type]

    def step() -> None:
        hidden_states = trunk(ids)
        if variant == "sft model loss":
            logits = head(hidden_states)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        elif variant == "liger jsd fused online":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            loss = LigerFusedLinearJSDLoss(beta=0.5, compiled=False)(
                hidden_states, head.weight, teacher_hidden, teacher_weight, targets
            )
        else:
            name = variant.split()[0]
            fused = "fused" in variant
            student = LinearHead(hidden_states, head.weight, None, vocab) if fused else head(hidden_states)
            teacher = None
            if name != "sft":
                teacher = (
                    LinearHead(teacher_hidden, teacher_weight, None, vocab) if "online" in variant else sparse
                )
            loss = objective(name)(student, teacher, targets, counts).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device == "cuda":
        # Memory from the first step, as on CPU (it allocates the gradients and AdamW's state);
        # time as the median of the steps after it, since the first pays cuBLAS's and the
        # kernels' one-time set-up.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - start_memory) / 2**20
        seconds = []
        for _ in range(CUDA_TIMED_STEPS):
            started = time.perf_counter()
            step()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        return {"peak_mib": peak_mib, "seconds": sorted(seconds)[len(seconds) // 2]}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
    return {"peak_mib": _allocator_peak(profiler.events()) / 2**20, "seconds": seconds}


def _allocator_peak(events) -> int:
    """The most bytes the CPU allocator held at once during the profile, above its start: the
    running sum of its allocation (+) and free (-) events in time order, each op counting only its
    own (a parent op's usage includes its children's)."""
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in events
        if event.self_cpu_memory_usage
    )
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak


def _available_bytes(device: str) -> int:
    """Free bytes where the variant will allocate: the GPU's free memory, or the host's."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    """Run every variant at every (V, N) in fresh subprocesses; print one table per size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--hidden", type=int, default=768, help="student width (Pythia-160M: 768)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunk", default="auto", help="loss.chunk_size: auto or a number of tokens")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model and inputs"
    )
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:
        result = run_variant(
            args.variant, args.vocab[0], args.tokens[0], args.hidden, args.device, args.chunk, args.dtype
        )
        print(json.dumps(result))
        return
    import torch

    liger = _liger_available()
    print(
        f"device={args.device} threads={torch.get_num_threads()} H={args.hidden} teacher width={TEACHER_WIDTH} "
        f"top-K={TOP_K} chunk={args.chunk} {args.dtype}; Liger-Kernel {'imported' if liger else 'not importable: row skipped'}"
    )
    for vocab in args.vocab:
        for tokens in args.tokens:
            logits_gib = tokens * vocab * 4 / 2**30
            print(f"\nV={vocab} N={tokens} (one [N, V] float32 copy: {logits_gib:.2f} GiB)")
            print("| variant | step peak MiB | x sft fused | step s | x sft fused |")
            print("|---|---|---|---|---|")
            results = {}
            for variant in VARIANTS:
                if variant.startswith("liger") and not liger:
                    continue
                # Plain logits hold about three [N, V] float32 copies at once (logits, their float
                # copy or softmax, the gradient): refuse what would not fit rather than swap.
                if (
                    "plain" in variant or "model loss" in variant
                ) and 3.5 * logits_gib * 2**30 > 0.8 * _available_bytes(args.device):
                    results[variant] = None
                    continue
                command = [sys.executable, __file__, "--variant", variant, "--vocab", str(vocab)]
                command += ["--tokens", str(tokens), "--hidden", str(args.hidden), "--device", args.device]
                command += ["--chunk", args.chunk, "--dtype", args.dtype]
                done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                lines = done.stdout.strip().splitlines()
                results[variant] = (
                    json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr[-300:]}
                )
            base = results.get("sft fused")
            for variant, result in results.items():
                if result is None:
                    print(f"| {variant} | skipped: needs ~{3.5 * logits_gib:.0f} GiB | | | |")
                elif "error" in result:
                    print(f"| {variant} | failed: {result['error'].strip().splitlines()[-1]} | | | |")
                else:
                    memory_ratio = (
                        result["peak_mib"] / base["peak_mib"] if base and "peak_mib" in base else float("nan")
                    )
                    time_ratio = (
                        result["seconds"] / base["seconds"] if base and "seconds" in base else float("nan")
                    )
                    print(
                        f"| {variant} | {result['peak_mib']:,.0f} | {memory_ratio:.2f} | "
                        f"{result['seconds']:.2f} | {time_ratio:.2f} |"
                    )


if __name__ == "__main__":
    main()
