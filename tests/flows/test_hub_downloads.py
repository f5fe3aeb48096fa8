"""The download paths, for real: the shipped real-scale config and the runbook against a hub on the
loopback.

tests/hub_server.py serves tiny stand-ins under the names ``configs/pythia-dolly.yaml`` and
docs/runbook.md use: GPT-NeoX "pythia-1.4b" and "pythia-160m" saved with save_pretrained (with
their tokenizer), databricks-dolly-15k's JSONL, the datasets the config's harness tasks read, and
the one ``lambada_openai`` reads; plus a Dolly-format dataset repository for ``data.source: hub``.
``atkd`` runs in a child process with ``HF_ENDPOINT`` at that server, an empty ``HF_HOME`` and no
offline variables, as on a user's machine with internet: the Hugging Face libraries read these
variables when first imported, so only a fresh process sees them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPTNeoXConfig, PreTrainedTokenizerFast

from tests.conftest import REPO_ROOT, free_port
from tests.hub_server import HubServer

pytestmark = pytest.mark.slow

TEACHER, STUDENT = "EleutherAI/pythia-1.4b", "EleutherAI/pythia-160m"  # the config's, as stand-ins
DOLLY_REPO, DOLLY_FILE = "databricks/databricks-dolly-15k", "databricks-dolly-15k.jsonl"  # the runbook's
HUB_DATA = "tiny-org/dolly"  # a dataset repository with train/validation/test splits
LAMBADA = "EleutherAI/lambada_openai"  # lambada_openai's dataset_path in lm-eval
END = "<|endoftext|>"
CONFIG = REPO_ROOT / "configs" / "pythia-dolly.yaml"
RUNBOOK = REPO_ROOT / "docs" / "runbook.md"


def _dolly_rows(count: int, offset: int) -> list[dict[str, str]]:
    return [
        {
            "instruction": f"What is {a} plus {a % 7}?",
            "context": "",
            "response": f"{a} plus {a % 7} is {a + a % 7}.",
            "category": "open_qa",
        }
        for a in range(offset, offset + count)
    ]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _save_model(tokenizer: PreTrainedTokenizerFast, directory: Path, layers: int, width: int) -> None:
    """A GPT-NeoX like Pythia's, its embeddings padded past the tokenizer to a multiple of 64."""
    vocab = -(-len(tokenizer) // 64) * 64
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=2048,  # Pythia's, so data.max_length: 512 fits as it does there
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The loopback hub with the stand-ins; yields the running HubServer."""
    root = tmp_path_factory.mktemp("hub")
    train, validation, test = _dolly_rows(96, 0), _dolly_rows(16, 200), _dolly_rows(16, 300)
    for split, rows in (("train", train), ("validation", validation), ("test", test)):
        _write_jsonl(root / "dolly" / f"{split}.jsonl", rows)
    texts = [f"{row['instruction']} {row['response']}" for row in train]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=[END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END, eos_token=END)
    _save_model(tokenizer, root / "teacher", layers=2, width=64)
    _save_model(tokenizer, root / "student", layers=1, width=32)
    lambada = root / "lambada"
    _write_jsonl(lambada / "data" / "test.jsonl", [{"text": text} for text in texts[:4]])
    (lambada / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n    path: data/test.jsonl\n---\n"
    )
    # 1,064 rows: the paper's 500 + 500 held out leave 64 to train on.
    _write_jsonl(root / "dolly-15k" / DOLLY_FILE, _dolly_rows(1064, 0))
    from atkd_core.evaluation.harness import harness_datasets

    listed = root / "listed"  # the config's harness datasets: looked up by `atkd check`, never run
    (listed / "README.md").parent.mkdir(parents=True)
    (listed / "README.md").write_text("A stand-in: atkd check reads this repository's file list.\n")
    with HubServer(root / "served") as server:
        server.add_model(TEACHER, root / "teacher")
        server.add_model(STUDENT, root / "student")
        server.add_dataset(HUB_DATA, root / "dolly")
        server.add_dataset(DOLLY_REPO, root / "dolly-15k")
        server.add_dataset(LAMBADA, lambada)
        for datasets in harness_datasets(["mmlu", "bbh", "drop"]).values():
            for dataset in datasets:
                server.add_dataset(dataset, listed)
        yield server


# Data and harness task at the hub's stand-ins (the models are already, under the config's names).
STAND_INS = [
    "data.source=hub",
    f"data.hub_name={HUB_DATA}",
    "eval.harness_tasks=[lambada_openai]",
]
# Sized for two CPU cores: one process each, a few steps, short rows, one small harness task.
SMALL = [
    "data.max_length=64",
    "scoring.top_k=8",
    "scoring.batch_size=8",
    "eval.limit=2",
    "eval.max_new_tokens=8",
    "eval.harness_tasks=[lambada_openai]",
    *(
        f"{stage}.training.{field}"
        for stage in ("finetune", "distill")
        for field in (
            "num_processes=1",
            "precision=fp32",
            "batch_size=8",
            "micro_batch_size=4",
            "epochs=1",
            "max_steps=2",
        )
    ),
]


def _environment(endpoint: str, home: Path) -> dict[str, str]:
    """A user's environment with internet: the hub at ``endpoint``, cache ``home``, nothing offline,
    no Prefect API configured (a run starts its temporary one)."""
    dropped = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "PREFECT_API_URL")
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home))
    return env


def _atkd(argv: list[str], endpoint: str, home: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``atkd`` in a fresh process that reaches the hub at ``endpoint`` only, with cache ``home``."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv],
        cwd=REPO_ROOT,
        env=_environment(endpoint, home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sets(workdir: Path, *overrides: str) -> list[str]:
    return [item for value in (f"workdir={workdir}", *overrides) for item in ("--set", value)]


def _table(stdout: str) -> dict[str, str]:
    """The rows of ``atkd check``'s table by subject."""
    return {line.split("  ")[0].strip(): line for line in stdout.splitlines()[1:] if "  " in line}


def test_check_reports_every_row_without_downloading_weights(hub, tmp_path):
    started = len(hub.requests)
    result = _atkd(["check", str(CONFIG), *_sets(tmp_path / "work", *STAND_INS)], hub.url, tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _table(result.stdout)
    for subject in (
        "hub",
        "teacher model",
        "student model",
        "tokenizer",
        "data",
        "harness lambada_openai",
        "devices finetune",
        "devices distill",
        "disk",
        "tracking",
        "Prefect API",
    ):
        assert subject in rows and " ok " in rows[subject], (subject, result.stdout)
    assert f"{TEACHER} downloadable from {hub.url}" in rows["teacher model"]
    assert f"{HUB_DATA} downloadable from {hub.url} (3 files" in rows["data"]
    assert f"{LAMBADA} downloadable from {hub.url}" in rows["harness lambada_openai"]
    # A Pythia-like vocabulary, padded to a multiple of 64, fits the tokenizer it ships.
    assert "300 tokens; fits teacher 320 (pads to 320), student 320 (pads to 320)" in rows["tokenizer"]
    fetched = [request for request in hub.requests[started:] if request.startswith("GET ")]
    assert any(request.endswith("/config.json") for request in fetched)
    assert not any(request.endswith(".safetensors") for request in fetched), fetched


def test_a_hub_dataset_is_downloaded_and_prepared(hub, tmp_path):
    workdir = tmp_path / "work"
    result = _atkd(
        ["data", "prepare", str(CONFIG), *_sets(workdir, *STAND_INS, "data.max_length=64")],
        hub.url,
        tmp_path / "hf",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((workdir / "prepared" / "manifest.json").read_text())
    assert {split: counts["rows"] for split, counts in manifest["counts"].items()} == {
        "train": 96,
        "validation": 16,
        "test": 16,
    }
    assert any(
        r.startswith(f"GET /datasets/{HUB_DATA}/resolve/") and r.endswith("train.jsonl") for r in hub.requests
    )


def _runbook_commands() -> list[str]:
    """The command block docs/runbook.md marks as run by this test."""
    text = RUNBOOK.read_text()
    block = re.search(r"<!-- runbook-commands[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert block is not None, "docs/runbook.md lost its runbook-commands block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_runbook_runs_as_written_through_downloads(hub, tmp_path):
    commands = _runbook_commands()
    assert [command.split()[:2] for command in commands] == [
        ["make", "setup"],
        [".venv/bin/hf", "download"],
        [".venv/bin/atkd", "data"],
        [".venv/bin/atkd", "check"],
        [".venv/bin/atkd", "run"],
    ]
    (tmp_path / "configs").mkdir()
    shutil.copy(CONFIG, tmp_path / "configs" / CONFIG.name)
    env = _environment(hub.url, tmp_path / "hf")
    venv_bin = f"{Path(sys.executable).parent}/"
    for command in commands[1:]:  # make setup: the suite runs in a set-up checkout
        argv = command.replace(".venv/bin/", venv_bin, 1).split()
        if argv[1] == "run":
            argv += [item for value in SMALL for item in ("--set", value)]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
        if argv[1] == "check":
            rows = _table(result.stdout)
            assert all(" ok " in row for row in rows.values()), result.stdout
            assert {"harness mmlu", "harness bbh", "harness drop", "data train"} <= set(rows)
            assert "14,011" not in rows["data train"] and "64 rows" in rows["data train"]
    fetched = [request for request in hub.requests if request.startswith("GET ")]
    for repository in (TEACHER, STUDENT):
        assert any(f"/{repository}/resolve/" in r and r.endswith("model.safetensors") for r in fetched)
    assert any(f"/datasets/{DOLLY_REPO}/resolve/" in r and r.endswith(DOLLY_FILE) for r in fetched)
    assert any(f"/datasets/{LAMBADA}/resolve/" in r and r.endswith("test.jsonl") for r in fetched)
    outputs = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.startswith("  "))
    evaluation = tmp_path / outputs["evaluate"].strip()  # relative to the directory it ran in
    assert json.loads((evaluation / "errors.json").read_text()) == {}
    student = json.loads((evaluation / "student.json").read_text())
    assert "acc" in str(student["results"]["lambada_openai"]), student["results"]
    assert "MLflow run" in result.stdout and "workflowType=machine_learning" in result.stdout


def test_without_the_server_the_same_commands_fail_in_seconds_with_one_line(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: the hub is down
    for command, limit in (("run", 20), ("check", 60)):
        started = time.monotonic()
        result = _atkd(
            [command, str(CONFIG), *_sets(tmp_path / "work", *STAND_INS)], endpoint, tmp_path / "hf"
        )
        assert result.returncode == 1 and time.monotonic() - started < limit, result.stderr
        problems = result.stderr.strip().splitlines()
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"atkd: hub: the run reads teacher.path {TEACHER}"), problems
        assert f"{endpoint} did not answer" in problems[0]
