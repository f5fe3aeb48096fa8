"""The ``atkd`` command line: run the pipeline, inspect configs, build the embedded data."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from atkd_core.config import PipelineConfig, config_to_yaml, load_config
from atkd_core.data.converters import EVAL_SETS, convert_eval_set, split_dolly
from atkd_core.data.wordnet import add_arguments as add_wordnet_arguments
from atkd_core.data.wordnet import build_from_arguments as build_wordnet
from atkd_core.errors import ConfigError, UserError, filesystem_error
from atkd_core.pipeline import LocalStages, pipeline_outputs, student_stages, teacher_stages
from atkd_core.progress import DEBUG_VARIABLE, quiet_third_party_output
from atkd_core.workdir import workdir_lock
from infra.settings import apply_environment_defaults

DEBUG_HELP = "show the traceback of an error caused by the input instead of its one-line message"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML config file (e.g. configs/demo.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set loss.lam=0.5 (repeatable; VALUE is parsed as YAML)",
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``atkd``."""
    parser = argparse.ArgumentParser(prog="atkd", description="ATKD knowledge-distillation pipeline")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the whole pipeline flow on a config")
    _add_config_args(run)
    run.add_argument(
        "--direct",
        action="store_true",
        help="call the same stages in this process without Prefect or MLflow (no tracking, no registry)",
    )

    config = commands.add_parser("config", help="inspect configs").add_subparsers(
        dest="config_command", required=True
    )
    _add_config_args(config.add_parser("show", help="print the resolved config as YAML"))
    config.add_parser("schema", help="print the config's JSON schema")

    data = commands.add_parser("data", help="data commands").add_subparsers(
        dest="data_command", required=True
    )
    build = data.add_parser("build", help="write the embedded suite's JSONL splits")
    _add_config_args(build)
    build.add_argument("--out", type=Path, default=None, help="output directory (default: <workdir>/suite)")
    _add_config_args(
        data.add_parser("prepare", help="run the prepare_data stage alone (no Prefect, no MLflow)")
    )
    dolly = data.add_parser(
        "dolly",
        help="split the databricks-dolly-15k JSONL into train/validation/test files (500 held out each)",
    )
    dolly.add_argument("source", type=Path, help="databricks-dolly-15k.jsonl as downloaded")
    dolly.add_argument("--out", type=Path, default=Path("data/dolly"), help="output directory")
    dolly.add_argument("--seed", type=int, default=42, help="shuffle seed")
    add_wordnet_arguments(
        data.add_parser(
            "wordnet",
            help="build the WordNet testbed (definitions, sentences, synonyms; an 8k tokenizer) from the "
            "pinned WordNet 3.1 database (make data-wordnet)",
        )
    )
    eval_set = data.add_parser(
        "eval-set",
        help="convert a published evaluation set to an instruction file for eval.instruction_files",
    )
    eval_set.add_argument("kind", choices=EVAL_SETS, help="the set's published format")
    eval_set.add_argument("source", type=Path, help="the file as published")
    eval_set.add_argument("--out", type=Path, required=True, help="the JSONL to write (Dolly fields)")
    eval_set.add_argument(
        "--answers", type=Path, default=None, help="reference answers by id (vicuna, koala, wizardlm)"
    )

    compare = commands.add_parser(
        "compare", help="run a comparison grid (objectives x teachers x seeds, or an ablation) and report it"
    )
    _add_config_args(compare)
    compare.add_argument(
        "--ablation",
        default=None,
        metavar="NAME",
        help="run the named ablation of the config instead of its axes",
    )
    compare.add_argument(
        "--list",
        action="store_true",
        help="print the grid's runs and shared teachers without running anything",
    )
    compare.add_argument(
        "--report-to",
        type=Path,
        default=None,
        metavar="DIR",
        help="also copy the report (report.md, figures, tables) into DIR, e.g. a docs folder",
    )

    serve = commands.add_parser(
        "serve", help="start (or --stop) a local Prefect server, MLflow server and process worker"
    )
    serve.add_argument("--stop", action="store_true", help="stop the servers recorded in --dir")
    serve.add_argument(
        "--dir", type=Path, default=Path(".atkd-serve"), help="state: databases, artifacts, logs, pids"
    )
    serve.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port on 127.0.0.1")
    serve.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port on 127.0.0.1")
    serve.add_argument(
        "--backend",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="where both servers keep their state: SQLite files in --dir, or a PostgreSQL started here "
        "(its data in --dir; the databases and URI forms of docker/compose.yaml)",
    )
    serve.add_argument("--postgres-port", type=int, default=5432, help="PostgreSQL port on 127.0.0.1")

    _add_config_args(
        commands.add_parser(
            "check",
            help="say in seconds whether a run of the config can start: models, tokenizer, data, harness "
            "tasks, devices, disk, tracking server, Prefect API (exit 1 with one line per problem)",
        )
    )
    _add_config_args(
        commands.add_parser(
            "score", help="run prepare_data, finetune_teacher and score_teacher (reusing outputs)"
        )
    )
    _add_config_args(
        commands.add_parser(
            "sync", help="send to MLflow what an outage kept in the workdir's tracking outbox"
        )
    )
    train = commands.add_parser("train", help="run one training stage alone (no Prefect, no MLflow)")
    _add_config_args(train)
    train.add_argument(
        "--stage",
        choices=["finetune", "distill"],
        default="distill",
        help="finetune: the teacher; distill: the student (runs the stages before it when needed)",
    )
    return parser


def _since(started: float) -> str:
    """The time since ``started`` (a perf_counter reading) as e.g. 2m50s."""
    minutes, seconds = divmod(time.perf_counter() - started, 60)
    return f"{int(minutes)}m{int(seconds):02d}s"


def _print_outputs(command: str, started: float, outputs: dict[str, str]) -> None:
    print(f"\n=== {command}: done in {_since(started)} ===")
    for stage, path in outputs.items():
        print(f"  {stage:<16} {path}")


def _cmd_run(config: PipelineConfig, direct: bool, config_path: Path) -> int:
    started = time.perf_counter()
    if direct:
        _print_outputs("atkd run --direct", started, pipeline_outputs(config, _local_stages(config)))
        return 0
    from flows.distill import distill_pipeline
    from infra.readiness import checked

    with checked(config):  # `_checks_before_running` made the flow's checks a moment ago
        result = distill_pipeline(config)
    _print_outputs("atkd run", started, result.outputs)
    if result.mlflow_run_id:
        print(f"  MLflow run       {result.mlflow_run_url or result.mlflow_run_id}")
        if result.mlflow_run_url is None:
            from infra.tracking import mlflow_ui_url

            print(
                f"  MLflow UI        mlflow ui --backend-store-uri {result.mlflow_tracking_uri}, then "
                f"{mlflow_ui_url('http://127.0.0.1:5000')}"
            )
    if result.registered_model:
        print(f"  Registered model {result.registered_model}")
    print(f"  Prefect run      {result.prefect_flow_run_url or result.prefect_flow_run_id}")
    if result.summary:
        print("\nEvaluation (lm-evaluation-harness; gap = student - teacher):\n" + result.summary)
        plot = Path(result.outputs.get("evaluate", "")) / "summary.png"
        if plot.is_file():
            print(f"Plot: {plot} (student and teacher, task by task)")
    if result.unsent_tracking_calls:
        _warn(
            f"{result.unsent_tracking_calls} tracking calls did not reach MLflow (the outputs above are "
            f"complete); send them with: atkd sync {config_path}"
        )
    return 0


def _cmd_compare(
    path: Path, overrides: list[str], ablation: str | None, list_only: bool, report_to: Path | None
) -> int:
    from atkd_core.grid import load_grid, teacher_label

    grid = load_grid(path, overrides, ablation)
    if list_only:
        for config in grid.teacher_configs.values():
            print(f"teacher  {teacher_label(config):<32} {config.workdir}")
        for cell in grid.cells:
            print(f"run      {cell.label + ' seed ' + str(cell.seed):<32} {cell.config.workdir}")
        print(f"{len(grid.cells)} runs, {len(grid.teacher_configs)} teacher group(s)")
        return 0
    from flows.compare import compare

    started = time.perf_counter()
    with workdir_lock(grid.comparison.workdir, warn=_warn):
        result = compare(str(path), overrides, ablation)
    print(f"\n=== atkd compare: {result.cells} runs done in {_since(started)} ===")
    print(f"  report           {Path(result.report_dir) / 'report.md'}")
    if report_to is not None:
        shutil.copytree(result.report_dir, report_to, dirs_exist_ok=True)
        print(f"  copied to        {report_to}")
    if result.mlflow_run_id:
        print(f"  MLflow run       {result.mlflow_run_id}")
    print(f"  Prefect run      {result.prefect_flow_run_id}")
    print("\n" + (Path(result.report_dir) / "report.md").read_text())
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from infra.servers import start, stop
    from infra.tracking import mlflow_ui_url

    if args.stop:
        if not stop(args.dir):
            print(f"atkd: no servers recorded in {args.dir}", file=sys.stderr)
            return 1
        return 0
    servers = start(
        args.dir, args.prefect_port, args.mlflow_port, backend=args.backend, postgres_port=args.postgres_port
    )
    exports = " ".join(f"{key}={value}" for key, value in servers.environment().items())
    database = (
        f"PostgreSQL    127.0.0.1:{servers.postgres_port} (databases mlflow, prefect)\n"
        if servers.postgres_port is not None
        else ""
    )
    print(
        f"Prefect UI    {servers.prefect_ui_url}\n"
        f"MLflow UI     {mlflow_ui_url(servers.mlflow_url)}\n"
        f"{database}"
        f"worker        polling work pool '{servers.work_pool}' (logs: {servers.state_dir}/worker.log)\n"
        f"state         {servers.state_dir} (stop with: atkd serve --stop)\n\n"
        f"Point this shell at them:\n  export {exports}"
    )
    return 0


def _cmd_sync(config: PipelineConfig) -> int:
    from infra.tracking import OUTBOX_NAME, Outbox, sync, tracking_status

    where = config.workdir / OUTBOX_NAME
    waiting = len(Outbox(config.workdir).entries())
    if not waiting:
        print(f"atkd sync: nothing waiting in {where}; {tracking_status(config)}")
        return 0
    sent, problems = sync(config)  # TrackingUnavailable (one line) when the server does not answer
    kept = f"; {waiting - sent} kept" if sent < waiting else ""
    print(f"atkd sync: {sent} tracking calls sent to {config.resolved_tracking_uri}, which answered{kept}")
    for problem in problems:
        print(f"atkd: not sent (kept in {where}): {problem}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_data_build(config: PipelineConfig, out: Path | None) -> int:
    from atkd_core.data.suite import write_suite

    paths = write_suite(config.data.embedded, out or config.workdir / "suite")
    for split, path in paths.items():
        print(f"{split:<10} {path}")
    return 0


def _local_stages(config: PipelineConfig) -> LocalStages:
    """The stages as library calls, training in this process or under the DeepSpeed launcher."""
    from infra.launcher import launch_training

    return LocalStages(config, train=lambda job: launch_training(job, lambda metrics, step: None))


def _cmd_data_prepare(config: PipelineConfig) -> int:
    _local_stages(config).prepare_data()
    return 0


def _cmd_score(config: PipelineConfig) -> int:
    stages = _local_stages(config)
    teacher_stages(config, stages, stages.prepare_data())
    return 0


def _cmd_train(config: PipelineConfig, stage: str) -> int:
    if stage == "finetune" and not config.finetune.enabled:
        raise ConfigError(
            "finetune.enabled: false, so there is no teacher fine-tuning to run; set finetune.enabled: "
            "true (or --set finetune.enabled=true)"
        )
    stages = _local_stages(config)
    upstream = teacher_stages(config, stages, stages.prepare_data())
    if stage == "distill":
        student_stages(config, stages, upstream, evaluate=False)
    return 0


def _warn(message: str) -> None:
    print(f"atkd: warning: {message}", file=sys.stderr)


def _checks_before_running(config: PipelineConfig, args: argparse.Namespace) -> None:
    """What can be known wrong before any stage starts: UserError with one line per problem.

    ``atkd run`` makes every check of ``atkd check`` (the services only when it uses them); the
    commands that run stages alone check the hub, the models and their devices."""
    if args.command == "run":
        from infra.readiness import ensure_ready

        ensure_ready(config, services=not args.direct)
        return
    from atkd_core.models.build import check_model_paths
    from infra.hub_access import prepare_hub_access

    prepare_hub_access(config)
    check_model_paths({"teacher": config.teacher, "student": config.student})
    if args.command == "train":
        from atkd_core.readiness import training_sections
        from atkd_core.training.ds_config import resolve_device, resolve_precision

        for section, training in training_sections(config).items():  # a device this machine lacks fails now
            resolve_precision(training, resolve_device(training, section), section)


def _cmd_check(config: PipelineConfig) -> int:
    """Print the readiness table; 0 when the run can start, else 1 with one line per problem."""
    from infra.readiness import check_run, format_table

    started = time.perf_counter()
    readiness = check_run(config)
    print(format_table(readiness))
    if readiness.problems:
        for problem in readiness.problems:
            print(f"atkd: {problem}", file=sys.stderr)
        return 1
    print(f"\nready to run ({_since(started)} to check)")
    return 0


class _UserErrorsWithoutTraceback(logging.Filter):
    """Drops the traceback from Prefect's log records of an error caused by the input or a
    filesystem fault: the flow and task runs still log their one-line failure, and ``main`` prints
    the message once."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (isinstance(error, UserError) or filesystem_error(error) is not None):
            record.exc_info, record.exc_text = None, None
        return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atkd`` console script; returns the exit code."""
    apply_environment_defaults()
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ[DEBUG_VARIABLE] = "1"  # the stages' own processes keep third-party output too
    quiet_third_party_output()
    if not args.debug:
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in logger.filters):
                logger.addFilter(_UserErrorsWithoutTraceback())
    try:
        return _dispatch(args)
    except ConfigError as exc:
        if args.debug:
            raise
        for line in str(exc).splitlines():
            print(f"atkd: config error: {line}", file=sys.stderr)
        return 2
    except UserError as exc:
        if args.debug:
            raise
        print(f"atkd: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        fault = filesystem_error(exc)
        if fault is None or args.debug:
            raise
        print(f"atkd: {fault}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; user errors propagate to ``main``."""
    if args.command == "config" and args.config_command == "schema":
        print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
        return 0
    if args.command == "serve":
        return _cmd_serve(args)
    if args.command == "compare":
        return _cmd_compare(args.config, args.overrides, args.ablation, args.list, args.report_to)
    if args.command == "data" and args.data_command == "dolly":
        counts = split_dolly(args.source, args.out, seed=args.seed)
        for split, rows in counts.items():
            print(f"{split:<10} {rows:>6} rows  {args.out / f'{split}.jsonl'}")
        return 0
    if args.command == "data" and args.data_command == "wordnet":
        manifest = build_wordnet(args, print)
        split_rows = manifest["rows"]
        assert isinstance(split_rows, dict)
        for split, count in split_rows.items():
            print(f"{split:<10} {count:>6} rows  {args.out / f'{split}.jsonl'}")
        print(f"tokenizer  {manifest['tokenizer_vocab_size']:>6} tokens  {args.out / 'tokenizer'}")
        return 0
    if args.command == "data" and args.data_command == "eval-set":
        rows = convert_eval_set(args.kind, args.source, args.out, args.answers)
        print(f"{args.kind}: {rows} rows  {args.out}")
        return 0
    config = load_config(args.config, args.overrides)
    if args.command == "config":
        print(config_to_yaml(config), end="")
        return 0
    if args.command == "data" and args.data_command == "build":
        return _cmd_data_build(config, args.out)
    if args.command == "sync":
        return _cmd_sync(config)
    if args.command == "check":
        return _cmd_check(config)
    with workdir_lock(config.workdir, warn=_warn):
        _checks_before_running(config, args)
        if args.command == "data":
            return _cmd_data_prepare(config)
        if args.command == "score":
            return _cmd_score(config)
        if args.command == "train":
            return _cmd_train(config, args.stage)
        return _cmd_run(config, args.direct, args.config)


if __name__ == "__main__":
    sys.exit(main())
