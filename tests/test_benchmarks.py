"""benchmarks/: every script runs to its table at a tiny size, so a change to the code they drive
cannot leave them broken until someone next measures (the training bench once was, for weeks: it
built its jobs by hand and missed ``loss.hard_fraction: auto``). Figures are not checked; the
scripts exist to print them. The GPU check is only parsed here (no GPU on these machines)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"
TINY_PIPELINE = [
    "--set",
    "finetune.training.max_steps=2",
    "--set",
    "distill.training.max_steps=2",
    "--set",
    "data.embedded.train_size=64",
    "--set",
    "data.embedded.validation_size=16",
    "--set",
    "data.embedded.test_size=16",
    "--set",
    "eval.limit=4",
    "--set",
    "eval.max_new_tokens=4",
]


def run_benchmark(script: str, *args: str, timeout: int = 300) -> str:
    """stdout of ``benchmarks/<script> args``; fails the test with its output on a non-zero exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_loss_bench_prints_every_case():
    out = run_benchmark(
        "loss_bench.py", "--tokens", "64", "--vocab", "300", "--chunk", "16", "--repeats", "1"
    )
    for case in ("naive log_softmax+kl_div", "forward_kl", "atkd_loss sparse K=64"):
        assert f"| {case}" in out


def test_memory_bench_runs_every_variant():
    out = run_benchmark("memory_bench.py", "--vocab", "500", "--tokens", "64", "--hidden", "16")
    for variant in ("sft model loss", "sft fused", "atkd plain", "atkd fused", "atkd fused online"):
        assert f"| {variant} |" in out
    assert "failed:" not in out and "skipped: needs" not in out


def test_scoring_bench_prints_its_comparison():
    out = run_benchmark(
        "scoring_bench.py",
        *("--vocab", "300", "--hidden", "64", "--layers", "1", "--top-k", "8"),
        *("--batches", "2", "--batch-size", "2", "--length", "16"),
    )
    assert "scor" in out.lower() and "bytes" in out.lower()


def test_train_bench_trains_every_objective_padded_and_packed():
    out = run_benchmark("train_bench.py", "--steps", "2", "--rows", "96", "--max-length", "128")
    assert "dolly data (max_length 128)" in out
    for name in ("sft", "sft plain logits", "kd offline", "atkd offline", "kd online", "atkd online"):
        assert f"| {name} |" in out


def test_dolly_shaped_rows_follow_the_written_quantiles(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from dolly_shape import CATEGORIES, RESPONSE, WITH_CONTEXT, dolly_shaped_rows

    rows = dolly_shaped_rows(4000, seed=1)
    responses = sorted(len(row["response"].split()) for row in rows)
    median = responses[len(responses) // 2]
    assert abs(median - dict(RESPONSE)[0.5]) <= 5
    with_context = sum(1 for row in rows if row["context"]) / len(rows)
    expected = sum(CATEGORIES[c] for c in WITH_CONTEXT) / sum(CATEGORIES.values())
    assert abs(with_context - expected) < 0.03
    assert dolly_shaped_rows(10, seed=1) == rows[:10]


def test_overhead_bench_times_both_variants():
    out = run_benchmark("overhead_bench.py", "--repeats", "1", *TINY_PIPELINE, timeout=600)
    assert "prefect" in out.lower() and "direct" in out.lower()


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_wheels_lists_what_the_check_imports_and_leaves_out_what_cuda_images_bring():
    """The wheel list is computed from this environment's metadata (no download here: that needs
    a package index)."""
    sys.path.insert(0, str(BENCHMARKS))
    from gpu_wheels import BROUGHT, ROOTS, closure

    found = closure(ROOTS, "3.12")
    assert {"pydantic", "pydantic-core", "deepspeed", "datasets", "lm-eval", "transformers"} <= set(found)
    assert "torch" in found and BROUGHT.match("torch") and BROUGHT.match("nvidia-cublas")
    assert not BROUGHT.match("pydantic-core")
    # Versions are the installed (locked) ones.
    from importlib.metadata import version

    assert found["transformers"] == version("transformers")


def test_cache_memory_bench_prints_a_row_per_cache_size_and_store():
    out = run_benchmark(
        "cache_memory_bench.py",
        "--tokens",
        "20000",
        "40000",
        "--top-k",
        "8",
        "--vocab",
        "300",
        "--store",
        "local",
        "reopen",
        "file",
        "s3",
    )
    for tokens in ("20,000", "40,000"):
        for store in ("local", "reopen", "file", "s3"):
            assert re.search(rf"\| {tokens} \| [\d,]+ \| {store} \|", out), out


def test_cache_fidelity_bench_compares_every_encoding_with_float32(tmp_path):
    """On a workdir laid out as a pipeline leaves it: prepared data and random-init models."""
    from atkd_core.data.prepare import prepare_data
    from atkd_core.models.build import materialize_model
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path / "work")
    prepared = tmp_path / "work" / "prepared"
    prepare_data(config, prepared, log=lambda _: None)
    for name, model in (
        ("teacher", config.teacher),
        ("student-init", config.student),
        ("student", config.student),
    ):
        materialize_model(model, prepared / "tokenizer", tmp_path / "work" / "models" / name)
    out = run_benchmark(
        "cache_fidelity.py",
        "--workdir",
        str(tmp_path / "work"),
        "--top-k",
        "8",
        "--examples",
        "16",
        "--batch-size",
        "8",
    )
    for student in ("student-init", "student"):
        assert f"student {student}: against the float32 record" in out
    for encoding in ("float, bfloat16", "compact, 8-bit", "compact, 4-bit"):
        assert f"| {encoding} | atkd k=0.5 |" in out


def test_alignment_share_prints_a_share_per_pair_and_category():
    out = run_benchmark("alignment_share.py", "--pairs", "512:512", "512:300")
    rows = [line.split() for line in out.splitlines()[2:]]
    assert len(rows) == 2 and all(len(row) == 3 + 4 for row in rows), out
    assert all(float(share) == 1.0 for share in rows[0][2:]), "one tokenizer: every span matched"
    assert 0 < float(rows[1][2]) < 1, out


def test_paired_intervals_pair_arms_by_seed_at_the_level_asked(tmp_path):
    results = tmp_path / "results.csv"
    rows = ["label,objective,seed,student_score,student_perplexity,workdir"]
    for seed, (a, b) in enumerate([(10.0, 11.0), (12.0, 12.5), (11.0, 13.0), (9.0, 9.5)]):
        rows += [f"x,a,{seed},{a},1,w", f"x,b,{seed},{b},1,w"]
    results.write_text("\n".join(rows) + "\n")
    wide = run_benchmark("paired_intervals.py", str(results), "--pairs", "a:b", "--level", "0.99")
    narrow = run_benchmark("paired_intervals.py", str(results), "--pairs", "a:b", "--level", "0.9")
    # Differences 1.0, 0.5, 2.0, 0.5: mean +1.00 over 4 pairs; the 99% interval is the wider.
    wide_row, narrow_row = wide.splitlines()[1].split(), narrow.splitlines()[1].split()
    assert wide_row[:4] == ["b", "-", "a", "+1.00"] and wide_row[6] == "4"
    assert float(wide_row[4].strip("[,")) < float(narrow_row[4].strip("[,")) < 1.0
