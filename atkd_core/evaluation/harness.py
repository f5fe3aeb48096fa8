"""Stage ``evaluate``: lm-evaluation-harness over the saved models, on the project's own tasks.

Task YAMLs are generated per run from ``atkd_core/evaluation/templates/`` (their data files are
the run's, so their paths are absolute) into ``<output>/tasks`` and loaded with a
``TaskManager`` include path:

* ``atkd_<family>``: one generate_until task per embedded-suite family on the test split: greedy,
  stop at EOS or newline, exact match and ROUGE-L;
* ``atkd_instruct_<name>``: the same protocol (ROUGE-L, greedy, up to ``eval.max_new_tokens``)
  for each user JSONL in ``eval.instruction_files`` (Dolly / Alpaca fields);
* ``atkd_validation_ll``: the reference responses' log-likelihood on the validation split
  (pooled per-token perplexity, greedy match), scoring exactly the tokens prepare_data trains.

Named harness tasks (``eval.harness_tasks``) pass straight through, each on its own so that one
that cannot be loaded offline is reported and the others' results are kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import Any

from atkd_core.config import FieldMap, PipelineConfig
from atkd_core.data.encoding import format_prompt
from atkd_core.data.records import read_rows
from atkd_core.errors import UserError
from atkd_core.manifest import (
    atomic_output,
    content_identity,
    fingerprint,
    up_to_date_manifest,
    write_manifest,
)
from atkd_core.outputs import EvaluationManifest
from atkd_core.reports.evaluation import summary_table, write_summary

TEMPLATES = Path(__file__).parent / "templates"
UTILS_SHIM = (
    "from atkd_core.evaluation.metrics import generation_results, loglikelihood_results  # noqa: F401\n"
)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _render(template: str, path: Path, **values: Any) -> None:
    """Fill a shipped task template (``$name`` placeholders; Jinja's braces are left alone)."""
    path.write_text(Template((TEMPLATES / template).read_text()).substitute(values))


def write_tasks(config: PipelineConfig, prepared_dir: Path, tasks_dir: Path, tokenizer: Any) -> list[str]:
    """Write the run's task YAMLs and data files into ``tasks_dir``; return the task names."""
    eos_token = tokenizer.eos_token
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "utils.py").write_text(UTILS_SHIM)
    data, limit = config.data, config.eval.limit
    raw = prepared_dir / "raw"
    names: list[str] = []

    def docs_of(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
        docs = [
            {"prompt": format_prompt(data, r["instruction"], r["context"]), "response": r["response"]}
            for r in rows
        ]
        return docs[:limit] if limit else docs

    def generation_task(name: str, rows: list[dict[str, str]], until: list[str]) -> None:
        _write_jsonl(tasks_dir / f"{name}.jsonl", docs_of(rows))
        _render(
            "generation.yaml",
            tasks_dir / f"{name}.yaml",
            task=name,
            until=json.dumps(until),
            data_file=(tasks_dir / f"{name}.jsonl").resolve(),
            max_new_tokens=config.eval.max_new_tokens,
        )
        names.append(name)

    test_rows, _ = read_rows(raw / "test.jsonl", FieldMap())
    if data.source == "embedded":
        # Suite answers are one line: a newline ends them as surely as EOS.
        for family in sorted({r["category"] for r in test_rows}):
            generation_task(
                f"atkd_{family}", [r for r in test_rows if r["category"] == family], ["\n", eos_token]
            )
    else:
        generation_task("atkd_test", test_rows, [eos_token])
    for path in config.eval.instruction_files:
        rows, _ = read_rows(Path(path), config.data.field_map())
        generation_task(f"atkd_instruct_{Path(path).stem.replace('-', '_')}", rows, [eos_token])

    validation_rows, _ = read_rows(raw / "validation.jsonl", FieldMap())
    docs = docs_of(validation_rows)
    for doc in docs:
        # The tokens the harness scores: the whole text's beyond the stripped prompt's (its split).
        context = len(tokenizer(doc["prompt"].rstrip(), add_special_tokens=False)["input_ids"])
        whole = len(tokenizer(doc["prompt"] + doc["response"], add_special_tokens=False)["input_ids"])
        doc["scored_tokens"] = whole - context
    _write_jsonl(tasks_dir / "atkd_validation_ll.jsonl", docs)
    _render(
        "loglikelihood.yaml",
        tasks_dir / "atkd_validation_ll.yaml",
        task="atkd_validation_ll",
        data_file=(tasks_dir / "atkd_validation_ll.jsonl").resolve(),
    )
    names.append("atkd_validation_ll")
    return names


def evaluate_model(
    model_dir: Path,
    tasks_dir: Path,
    task_names: list[str],
    harness_tasks: list[str],
    *,
    batch_size: int,
    device: str,
    log: Callable[[str], None],
) -> tuple[dict[str, dict[str, float]], dict[str, str], dict[str, Any]]:
    """Run the harness on one model: (metrics per task, errors per named task, raw results)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=str(model_dir), batch_size=batch_size, device=device)
    own = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    raw = simple_evaluate(
        model=model, tasks=task_names, task_manager=own, bootstrap_iters=0, log_samples=False
    )
    metrics = _metrics(raw)
    errors: dict[str, str] = {}
    for name in harness_tasks:
        try:
            result = simple_evaluate(
                model=model, tasks=[name], task_manager=TaskManager(), bootstrap_iters=0, log_samples=False
            )
        except Exception as exc:  # the harness raises many kinds for an unloadable task
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log(
                f"evaluate: named task {name!r} could not be run ({errors[name]}); the other results are kept"
            )
            continue
        metrics.update(_metrics(result))
        raw["results"].update(result["results"])
    return metrics, errors, raw


def _metrics(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from a harness result, numbers only, filter suffixes dropped."""
    out: dict[str, dict[str, float]] = {}
    for task, values in raw["results"].items():
        for key, value in values.items():
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and "_stderr" not in key
                and key != "sample_len"
            ):
                out.setdefault(task, {})[key.split(",")[0]] = float(value)
    return out


def harness_datasets(names: list[str]) -> dict[str, list[str]]:
    """The datasets (hub ids) each named lm-eval task, group or tag reads: {name: sorted paths}.

    Read from the harness's task index, without loading any data, so it works offline. An unknown
    name is a UserError naming it, with the closest known names.
    """
    import difflib

    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index

    def datasets(name: str, seen: frozenset[str]) -> set[str]:
        entry = index[name]
        kind = entry.kind.name
        if kind == "TASK":
            path = entry.cfg.get("dataset_path")
            return {str(path)} if path else set()
        if kind == "TAG":
            members = [other for other, candidate in index.items() if name in candidate.tags]
        else:
            listed = entry.cfg.get("task") or []
            listed = listed if isinstance(listed, list) else [listed]
            members = [item["task"] if isinstance(item, dict) else item for item in listed]
        found: set[str] = set()
        for member in members:
            if isinstance(member, str) and member in index and member not in seen:
                found |= datasets(member, seen | {member})
        return found

    unknown = [name for name in names if name not in index]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(index), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise UserError(f"eval.harness_tasks: {unknown[0]!r} is not a task, group or tag of lm-eval{hint}")
    return {name: sorted(datasets(name, frozenset({name}))) for name in names}


def check_models(models: dict[str, Path]) -> None:
    """Every model to score must be a saved directory."""
    for name, path in models.items():
        if not (Path(path) / "config.json").is_file():
            raise UserError(
                f"evaluate: {name} model {path} is not a save_pretrained directory (no config.json)"
            )


def run_evaluation(
    config: PipelineConfig,
    prepared_dir: Path,
    models: dict[str, Path],
    output_dir: Path,
    *,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The evaluate stage: harness results per model, the summary table, the easy/hard analysis.

    ``models`` maps a name (student, teacher, ...) to a saved model directory. Writes
    ``<name>.json`` per model, ``summary.{md,csv,png}``, ``difficulty.json``, ``errors.json``,
    ``tasks/`` and, last, ``manifest.json``, in a temporary sibling of ``output_dir`` that replaces
    it in one rename; an output whose manifest matches the inputs now is reused (the report comes
    back with ``reused: True``).
    """
    check_models(models)
    identity = evaluation_fingerprint(config, prepared_dir, models)
    existing = up_to_date_manifest(output_dir, EvaluationManifest, identity)
    if existing is not None:
        log(f"evaluate: reused {output_dir}")
        return {
            **existing.report,
            "summary_markdown": (output_dir / "summary.md").read_text(),
            "reused": True,
        }
    with atomic_output(output_dir) as staging:
        report, markdown = _evaluate_into(config, prepared_dir, models, staging, device, log)
        _relocate_tasks(staging / "tasks", staging, output_dir)
        write_manifest(
            staging,
            EvaluationManifest,
            stage="evaluate",
            input_fingerprint=identity,
            content_sha256=fingerprint(report),
            models={name: str(directory) for name, directory in models.items()},
            report=report,
        )
    return {**report, "summary_markdown": markdown, "reused": False}


def _relocate_tasks(tasks_dir: Path, staging: Path, output_dir: Path) -> None:
    """Point the task YAMLs' data files at where they will be once ``staging`` is ``output_dir``:
    the harness needs absolute paths, and the tasks are kept for anyone re-running them."""
    for path in tasks_dir.glob("*.yaml"):
        path.write_text(path.read_text().replace(str(staging.resolve()), str(output_dir.resolve())))


def _evaluate_into(
    config: PipelineConfig,
    prepared_dir: Path,
    models: dict[str, Path],
    output_dir: Path,
    device: str,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], str]:
    """Run the harness on every model into ``output_dir``; return (the report, the summary table)."""
    from atkd_core.data.tokenizer import load_tokenizer
    from atkd_core.evaluation.analysis import easy_hard_agreement

    tasks_dir = output_dir / "tasks"
    names = write_tasks(config, prepared_dir, tasks_dir, load_tokenizer(prepared_dir / "tokenizer"))
    results: dict[str, dict[str, dict[str, float]]] = {}
    errors: dict[str, str] = {}
    for name, directory in models.items():
        log(f"evaluate: {name} ({directory}) on {len(names)} tasks")
        metrics, model_errors, raw = evaluate_model(
            directory,
            tasks_dir,
            names,
            config.eval.harness_tasks,
            batch_size=config.eval.batch_size,
            device=device,
            log=log,
        )
        results[name] = metrics
        errors.update(model_errors)
        (output_dir / f"{name}.json").write_text(json.dumps(raw, indent=2, default=str))
    rows = summary_table(results)
    markdown = write_summary(rows, output_dir)
    (output_dir / "errors.json").write_text(json.dumps(errors, indent=2))
    difficulty = None
    if "student" in models and "teacher" in models and config.cross_tokenizer:
        log(
            "evaluate: no easy/hard agreement: it compares the two models token by token, and the "
            "teacher has its own tokenizer"
        )
    elif "student" in models and "teacher" in models:
        difficulty = easy_hard_agreement(
            models["student"],
            models["teacher"],
            prepared_dir,
            config.loss.hard_fraction,
            unc_epsilon=config.loss.unc_epsilon,
        )
        (output_dir / "difficulty.json").write_text(json.dumps(difficulty, indent=2))
    report = {"results": results, "errors": errors, "difficulty": difficulty, "tasks": names}
    return report, markdown


def evaluation_fingerprint(config: PipelineConfig, prepared_dir: Path, models: dict[str, Path]) -> str:
    """What an evaluation depends on: the eval and data settings, k (the easy/hard analysis), and
    the contents of the data and of each model."""
    return fingerprint(
        {
            "config": config.section_hash("eval", "data"),
            "hard_fraction": config.loss.hard_fraction,
            # Only the epsilon split reads it: other settings keep the fingerprints they had.
            **({"unc_epsilon": config.loss.unc_epsilon} if config.loss.hard_fraction == "epsilon" else {}),
            "prepared": content_identity(prepared_dir),
            "models": {name: content_identity(directory) for name, directory in sorted(models.items())},
        }
    )
