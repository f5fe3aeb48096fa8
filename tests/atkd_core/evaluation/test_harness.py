"""The evaluate stage runs the real lm-evaluation-harness on the pipeline's tiny models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from atkd_core.data.prepare import prepare_data
from atkd_core.evaluation.harness import run_evaluation
from atkd_core.evaluation.metrics import generation_results, rouge_l
from atkd_core.models.build import materialize_model
from atkd_core.training.job import TrainJob
from atkd_core.training.main import run_training
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher fine-tuned on the suite and a random-init model of the same shape."""
    root = tmp_path_factory.mktemp("evaluation")
    config = tiny_config(
        root,
        data={"embedded": {"train_size": 320, "validation_size": 16, "test_size": 48}, "max_length": 48},
        finetune={
            "training": {
                "zero_stage": 2,
                "batch_size": 16,
                "micro_batch_size": 16,
                "max_steps": 120,
                "optim": {"lr": 3e-3, "warmup_ratio": 0.05},
                "checkpoint_every": 1000,
            }
        },
        eval={"max_new_tokens": 12, "batch_size": 16},
    )
    prepare_data(config, root / "prepared", log=lambda _: None)
    random_init = Path(materialize_model(config.teacher, root / "prepared" / "tokenizer", root / "random"))
    job = TrainJob(
        stage="finetune",
        config=config,
        prepared_dir=root / "prepared",
        init_dir=random_init,
        output_dir=root / "teacher",
        checkpoint_dir=root / "ckpt",
    )
    run_training(job, lambda m, s: None, lambda _: None)
    return config, root, random_init, root / "teacher"


def test_generation_metrics():
    assert generation_results({"response": "A B C"}, [" A B C\n"]) == {"exact_match": 1.0, "rougeL": 100.0}
    assert rouge_l("the red fox", "the fox") == pytest.approx(100 * 0.8)


def test_stage_scores_models_with_the_harness_and_a_trained_teacher_beats_random_init(trained, tmp_path):
    config, root, random_init, teacher = trained
    report = run_evaluation(
        config,
        root / "prepared",
        {"student": random_init, "teacher": teacher},
        tmp_path / "eval",
        log=lambda _: None,
    )
    families = [t for t in report["tasks"] if t.startswith("atkd_") and t != "atkd_validation_ll"]
    assert len(families) == 8
    for name in (
        "student.json",
        "teacher.json",
        "summary.md",
        "summary.csv",
        "summary.png",
        "difficulty.json",
    ):
        assert (tmp_path / "eval" / name).is_file(), name
    raw = json.loads((tmp_path / "eval" / "teacher.json").read_text())
    assert set(families) <= set(raw["results"])
    # Written in a temporary sibling and renamed: the kept task files point at their final place.
    data_files = re.findall(
        r'(?:test|validation): "(.+)"', (tmp_path / "eval" / "tasks" / "atkd_add.yaml").read_text()
    )
    assert data_files and all(
        Path(f).is_file() and Path(f).parent == (tmp_path / "eval" / "tasks").resolve() for f in data_files
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".eval")] == []

    def mean_rouge(model):
        return sum(report["results"][model][t]["rougeL"] for t in families) / len(families)

    # An honest check that the metric measures something: training moves it.
    assert mean_rouge("teacher") > mean_rouge("student") + 5.0, (mean_rouge("teacher"), mean_rouge("student"))
    difficulty = report["difficulty"]
    assert difficulty["easy"]["tokens"] > 0 and difficulty["hard"]["tokens"] > 0
    assert difficulty["teacher_validation_perplexity"] < difficulty["student_validation_perplexity"]
    assert "| atkd_add | rougeL |" in report["summary_markdown"] and "gap" in report["summary_markdown"]
    # The harness's log-likelihood task scores the trained response tokens: a trained teacher's
    # perplexity is far below a random model's (whose perplexity is about the vocabulary size),
    # and close to the pipeline's own validation perplexity (which also counts EOS).
    harness_ppl = {
        m: report["results"][m]["atkd_validation_ll"]["token_perplexity"] for m in ("student", "teacher")
    }
    assert harness_ppl["teacher"] < 0.2 * harness_ppl["student"]
    assert 0.5 < harness_ppl["teacher"] / difficulty["teacher_validation_perplexity"] < 2.0


def test_user_jsonl_is_scored_and_an_unloadable_named_task_keeps_the_rest(trained, tmp_path):
    config, root, _, teacher = trained
    user = tmp_path / "my-dolly-eval.jsonl"
    user.write_text(
        "".join(
            json.dumps(
                {
                    "instruction": "Write these letters in upper case.",
                    "context": c,
                    "response": c.upper(),
                    "category": "user",
                }
            )
            + "\n"
            for c in ("a b c", "d e", "x y z")
        )
    )
    config = config.model_copy(
        update={
            "eval": config.eval.model_copy(
                update={"instruction_files": [user], "harness_tasks": ["no_such_task_here"], "limit": 4}
            )
        }
    )
    messages = []
    report = run_evaluation(
        config, root / "prepared", {"teacher": teacher}, tmp_path / "eval", log=messages.append
    )
    assert report["results"]["teacher"]["atkd_instruct_my_dolly_eval"]["rougeL"] >= 0.0
    assert "no_such_task_here" in report["errors"]
    assert any(
        "'no_such_task_here' could not be run" in m and "other results are kept" in m for m in messages
    )
    assert "atkd_add" in report["results"]["teacher"]
    assert json.loads((tmp_path / "eval" / "errors.json").read_text()) == report["errors"]


def test_the_real_configs_harness_tasks_are_known_and_name_the_hub_datasets_they_read():
    """pythia-dolly's mmlu, bbh and drop exist in the locked harness; their data are hub datasets
    (checked from the task index, offline), which a machine without the hub must have cached."""
    from atkd_core.config import load_config
    from atkd_core.errors import UserError
    from atkd_core.evaluation.harness import harness_datasets
    from tests.conftest import REPO_ROOT

    tasks = load_config(REPO_ROOT / "configs" / "pythia-dolly.yaml").eval.harness_tasks
    assert harness_datasets(tasks) == {
        "mmlu": ["cais/mmlu"],
        "bbh": ["SaylorTwift/bbh"],
        "drop": ["EleutherAI/drop"],
    }
    with pytest.raises(UserError, match=r"'mmlu_pro_typo' is not a task.*closest: mmlu_pro"):
        harness_datasets(["mmlu", "mmlu_pro_typo"])
