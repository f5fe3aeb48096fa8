"""Can this run start? Everything a config will need, resolved in seconds without loading weights.

A real run costs hours on rented GPUs; a wrong model id, a missing file, too few GPUs or a disk too
small for the teacher cache should show before the first stage, not when its stage starts. Each
check here gives one ``Check`` row (a subject, ok or not, and what was found); the whole table is
what ``atkd check`` prints, and its problems are what ``atkd run`` and the flows refuse to start on
(infra.readiness adds the tracking server and the Prefect API, which this layer does not know).

Nothing here downloads weights: a hub model is looked up by its repository's file list and its
``config.json``; tokenizers, which are small, are loaded to compare vocabularies. Checks that need
the hub are left out, with a note, when the hub does not answer (that is one problem, not one per
model), and read the local cache when ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from atkd_core.audit import config_positions, max_length_problem, top_k_problem
from atkd_core.config import ModelConfig, PipelineConfig, ScoringConfig, TrainingConfig
from atkd_core.errors import UserError
from atkd_core.hub import hub_endpoint, hub_offline, hub_problem, looks_like_hub_id
from atkd_core.manifest import read_manifest
from atkd_core.outputs import CacheManifest
from atkd_core.scoring.encoding import TopKCodec
from atkd_core.storage import RemoteDirectory

# Bytes per parameter of a DeepSpeed checkpoint: fp32 master weights and Adam's two moments
# (12 B), plus the module's own weights (4 B at most).
CHECKPOINT_BYTES_PER_PARAMETER = 16
# Bytes per parameter of a saved model (fp32 safetensors at most).
SAVED_MODEL_BYTES_PER_PARAMETER = 4
# Rows tokenised to estimate the tokens per training row.
TOKEN_SAMPLE_ROWS = 256
# Characters per token where no tokenizer exists yet (a tokenizer trained by the run): the usual
# figure for English BPE, used only to size the cache.
CHARACTERS_PER_TOKEN = 4.0
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


@dataclass(frozen=True)
class Check:
    """One row of the readiness table: ``ok`` False is a problem the run cannot start with."""

    subject: str
    ok: bool
    detail: str


@dataclass
class _Model:
    """What was learnt about one model without loading its weights."""

    vocab_size: int | None = None
    parameters: int | None = None


@dataclass
class Readiness:
    """The table's rows, and what the later rows reuse from the earlier ones."""

    checks: list[Check] = field(default_factory=list)
    hub_answers: bool = True
    models: dict[str, _Model] = field(default_factory=dict)
    tokenizer: Any = None  # the pipeline's tokenizer, when the check loaded it

    def add(self, subject: str, ok: bool, detail: str) -> None:
        """Append one row."""
        self.checks.append(Check(subject, ok, detail))

    @property
    def problems(self) -> list[str]:
        """One line per problem: ``subject: detail``."""
        return [f"{check.subject}: {check.detail}" for check in self.checks if not check.ok]


def human_bytes(size: float) -> str:
    """``size`` bytes as B / KB / MB / GB / TB (powers of 1000, one decimal)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


def cache_bytes_per_token(scoring: ScoringConfig, vocab_size: int) -> int:
    """Bytes one scored token takes in the teacher cache (the writer's record) with the config's
    scoring section, for a ``vocab_size`` vocabulary (compact ids take about log2(V / K) bits)."""
    codec = TopKCodec(
        scoring.encoding, scoring.top_k, vocab_size, scoring.storage_dtype, scoring.logprob_bits
    )
    return codec.bytes_per_token()


def _checked(readiness: Readiness, subject: str, check: Callable[[], str]) -> bool:
    """Run one check; its return is the ok detail, a UserError (or any failure) the problem."""
    try:
        readiness.add(subject, True, check())
        return True
    except UserError as exc:
        readiness.add(subject, False, str(exc))
    except Exception as exc:  # a check must report, never crash the table
        readiness.add(
            subject, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        )
    return False


def check_hub(readiness: Readiness, needs: list[str], probe: Callable[[], str | None] = hub_problem) -> None:
    """The hub row: what the run reads from it and whether it answers (``needs`` from hub_needs;
    ``probe``: hub_problem, or the caller's memo of it so that one command probes once)."""
    if not needs:
        readiness.add("hub", True, "nothing read from the hub (runs offline)")
        return
    if hub_offline():
        readiness.add("hub", True, f"HF_HUB_OFFLINE set: {len(needs)} items read from the local cache")
        return
    problem = probe()
    readiness.hub_answers = problem is None
    if problem is None:
        readiness.add("hub", True, f"{hub_endpoint()} answers ({len(needs)} items to read from it)")
    else:
        readiness.add("hub", False, f"the run reads {'; '.join(needs)} from the hub but {problem}")


def _config_vocab(config_json: dict[str, Any]) -> int | None:
    """vocab_size of a model's config.json (or of its text_config, for multimodal wrappers)."""
    size = config_json.get("vocab_size") or (config_json.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _parameters(config_json: dict[str, Any], weight_bytes: int) -> int | None:
    """Parameters from the weight files' bytes and the dtype config.json says they are in."""
    dtype = str(config_json.get("torch_dtype") or config_json.get("dtype") or "float32")
    return weight_bytes // DTYPE_BYTES.get(dtype, 4) if weight_bytes else None


def _weight_bytes(names_and_sizes: list[tuple[str, int]]) -> int:
    """Bytes of the weights among a repository's files: safetensors if any, else .bin."""
    for suffix in (".safetensors", ".bin"):
        sizes = [size for name, size in names_and_sizes if name.endswith(suffix) and "/" not in name]
        if sizes:
            return sum(sizes)
    return 0


def _describe_model(role: str, spec: ModelConfig, max_length: int, readiness: Readiness) -> str:
    """The model row's detail; fills ``readiness.models[role]``. UserError when it is missing or
    its context is shorter than ``max_length`` (data.max_length)."""
    facts = readiness.models.setdefault(role, _Model())
    if spec.path is None:
        return f"preset {spec.preset}, built by the run with the pipeline's tokenizer"
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    from atkd_core.models.build import check_model_paths

    # Neither a directory nor a hub id, or offline and not cached: the stages' own one line.
    check_model_paths({role: spec})
    local = Path(spec.path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(
                f"{role}.path {spec.path}: no config.json (a save_pretrained directory is expected)"
            )
        config_json = json.loads((local / "config.json").read_text())
        files = [(p.name, p.stat().st_size) for p in local.iterdir() if p.is_file()]
        found = f"local directory {local}"
    elif hub_offline():
        config_json = json.loads(Path(str(try_to_load_from_cache(spec.path, "config.json"))).read_text())
        files = []
        found = f"{spec.path} in the local Hugging Face cache"
    elif not readiness.hub_answers:
        return f"{spec.path} on the hub (not looked up: the hub does not answer)"
    else:
        try:
            info = HfApi().model_info(spec.path, files_metadata=True)
        except Exception as exc:  # not found, gated, private: the hub library raises a type per case
            raise UserError(
                f"{role}.path {spec.path!r} cannot be read from {hub_endpoint()} ({_reason(exc)})"
            ) from None
        files = [(sibling.rfilename, sibling.size or 0) for sibling in info.siblings or []]
        config_json = json.loads(Path(hf_hub_download(spec.path, "config.json")).read_text())
        found = (
            f"{spec.path} downloadable from {hub_endpoint()} "
            f"({len(files)} files, {human_bytes(sum(size for _, size in files))})"
        )
    facts.vocab_size = _config_vocab(config_json)
    facts.parameters = _parameters(config_json, _weight_bytes(files))
    _check_positions(config_json, spec.path, role, max_length)
    return f"{found}{_size_note(facts)}"


def _check_positions(config_json: dict[str, Any], where: str, role: str, max_length: int) -> None:
    """UserError when data.max_length is over the model's context (the line audit_prepared gives)."""
    if (problem := max_length_problem(max_length, role, config_positions(config_json, where))) is not None:
        raise UserError(problem)


def _size_note(facts: _Model) -> str:
    parts = []
    if facts.parameters:
        parts.append(f"~{facts.parameters / 1e6:,.1f}M parameters")
    if facts.vocab_size:
        parts.append(f"vocabulary {facts.vocab_size}")
    return f"; {', '.join(parts)}" if parts else ""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def check_models(config: PipelineConfig, readiness: Readiness) -> None:
    """A row per model (local / downloadable / missing), then the tokenizer row: its size against
    every model's vocabulary and, for a model with its own tokenizer, token by token."""
    for role, spec in (("teacher", config.teacher), ("student", config.student)):
        _checked(
            readiness,
            f"{role} model",
            partial(_describe_model, role, spec, config.data.max_length, readiness),
        )
    _checked(readiness, "tokenizer", lambda: _check_tokenizer(config, readiness))


def _check_tokenizer(config: PipelineConfig, readiness: Readiness) -> str:
    from atkd_core.data.preflight import compare_vocabularies
    from atkd_core.data.tokenizer import load_tokenizer

    source = config.tokenizer.source
    if source == "train":
        size = config.tokenizer.pad_to or config.tokenizer.vocab_size
        too_small = [
            f"{role} ({facts.vocab_size})"
            for role, facts in readiness.models.items()
            if facts.vocab_size is not None and facts.vocab_size < config.tokenizer.vocab_size
        ]
        if too_small:
            raise UserError(
                f"a tokenizer of {config.tokenizer.vocab_size} tokens is trained, but {', '.join(too_small)} "
                "has fewer output rows; set tokenizer.vocab_size to at most that, or tokenizer.source: teacher"
            )
        return f"trained by the run on the training data ({size} tokens)"
    where = config.tokenizer.path if source == "path" else config.teacher.path
    if where is None:
        raise UserError(
            "tokenizer.source 'teacher' needs teacher.path (a preset has no tokenizer of its own)"
        )
    if not Path(where).expanduser().is_dir() and not looks_like_hub_id(where):
        if source == "teacher":  # the teacher model's row says so already
            return f"{where} (not loaded: see the teacher model's problem)"
        raise UserError(
            f"tokenizer.path {where!r} does not exist (a directory saved with save_pretrained, or a hub id, is expected)"
        )
    if looks_like_hub_id(where) and not hub_offline() and not readiness.hub_answers:
        return f"{where} (not loaded: the hub does not answer)"
    tokenizer = load_tokenizer(where)
    readiness.tokenizer = tokenizer
    # With its own tokenizer the teacher is checked against that one, by prepare_data's preflight,
    # and the cache's top-K against its vocabulary.
    cross = config.cross_tokenizer
    if not cross and (problem := top_k_problem(config.scoring.top_k, len(tokenizer))) is not None:
        raise UserError(problem)
    notes = ["the teacher reads its own (teacher.tokenizer)"] if cross else []
    roles = (
        [("student", config.student)] if cross else [("teacher", config.teacher), ("student", config.student)]
    )
    for role, spec in roles:
        facts = readiness.models.get(role)
        if spec.path is None or facts is None or facts.vocab_size is None:
            continue
        if facts.vocab_size < len(tokenizer):
            raise UserError(
                f"{role} model has {facts.vocab_size} output rows but the tokenizer ({where}) {len(tokenizer)} tokens; "
                "use the tokenizer the model was saved with, or resize its embeddings (resize_token_embeddings)"
            )
        if spec.path != where:
            compare_vocabularies(
                tokenizer, load_tokenizer(spec.path, trust_remote_code=spec.trust_remote_code), role
            )
        padded = f" (pads to {facts.vocab_size})" if facts.vocab_size > len(tokenizer) else ""
        notes.append(f"{role} {facts.vocab_size}{padded}")
    fits = f"; fits {', '.join(notes)}" if notes else ""
    return f"{where}: {len(tokenizer)} tokens{fits}"


def count_rows(path: Path) -> int:
    """Rows of a data file without parsing its records: JSONL lines, Parquet metadata, CSV records,
    JSON list items. UserError when the file does not exist."""
    if not path.is_file():
        raise UserError(f"{path}: file does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            return max(sum(1 for _ in csv.reader(handle)) - 1, 0)
    if suffix == ".json":
        items = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        return len(items) if isinstance(items, list) else 0
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def check_data(config: PipelineConfig, readiness: Readiness) -> dict[str, int]:
    """A row per split (files and row counts) or for the dataset; returns {split: rows} where known."""
    data = config.data
    rows: dict[str, int] = {}
    if data.source == "embedded":
        suite = data.embedded
        rows = {"train": suite.train_size, "validation": suite.validation_size, "test": suite.test_size}
        readiness.add(
            "data",
            True,
            "the embedded suite, generated by the run ("
            + ", ".join(f"{k} {v}" for k, v in rows.items())
            + " rows)",
        )
        return rows
    if data.source == "files":
        for split, files in (
            ("train", data.train_files),
            ("validation", data.validation_files),
            ("test", data.test_files),
        ):
            if not files:
                readiness.add(f"data {split}", True, "none (taken from the training files)")
                continue

            def split_rows(files: list[Path] = files, split: str = split) -> str:
                counts = [count_rows(Path(f).expanduser()) for f in files]
                rows[split] = sum(counts)
                return f"{len(files)} file{'s' * (len(files) > 1)}, {rows[split]:,} rows"

            _checked(readiness, f"data {split}", split_rows)
        return rows
    name = data.hub_name or ""
    _checked(readiness, "data", lambda: _hub_dataset(name, readiness))
    return rows


def _hub_dataset(name: str, readiness: Readiness) -> str:
    """A ``datasets`` name: a local directory, or a hub dataset looked up by its file list."""
    if not looks_like_hub_id(name):
        if Path(name).expanduser().exists():
            return f"local dataset {name}"
        raise UserError(f"data.hub_name {name!r}: neither a local dataset nor a hub id (org/name)")
    if hub_offline():
        return f"{name}: HF_HUB_OFFLINE set, read from the datasets cache"
    if not readiness.hub_answers:
        return f"{name} on the hub (not looked up: the hub does not answer)"
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(name, files_metadata=True)
    except Exception as exc:
        raise UserError(f"dataset {name!r} cannot be read from {hub_endpoint()} ({_reason(exc)})") from None
    files = info.siblings or []
    size = sum(sibling.size or 0 for sibling in files)
    return f"{name} downloadable from {hub_endpoint()} ({len(files)} files, {human_bytes(size)})"


def check_harness(
    config: PipelineConfig, readiness: Readiness, datasets: dict[str, list[str]] | None
) -> None:
    """A row per named lm-eval task: known to the harness, and its datasets reachable."""
    if not (config.eval.enabled and config.eval.harness_tasks):
        return
    if datasets is None:
        from atkd_core.evaluation.harness import harness_datasets

        try:
            datasets = harness_datasets(config.eval.harness_tasks)
        except UserError as exc:
            readiness.add("harness tasks", False, str(exc))
            return
    for task, paths in datasets.items():
        _checked(readiness, f"harness {task}", partial(_harness_datasets, paths, readiness))


def _harness_datasets(paths: list[str], readiness: Readiness) -> str:
    hub_ids = [path for path in paths if looks_like_hub_id(path)]
    if not hub_ids:
        return "known to lm-eval; reads no hub dataset"
    if hub_offline():
        return f"known to lm-eval; HF_HUB_OFFLINE set, {', '.join(hub_ids)} read from the datasets cache"
    if not readiness.hub_answers:
        return f"known to lm-eval; {', '.join(hub_ids)} not looked up (the hub does not answer)"
    from huggingface_hub import HfApi

    api = HfApi()
    for dataset in hub_ids:
        try:
            api.dataset_info(dataset)
        except Exception as exc:
            raise UserError(
                f"its dataset {dataset!r} cannot be read from {hub_endpoint()} ({_reason(exc)})"
            ) from None
    return f"known to lm-eval; {', '.join(hub_ids)} downloadable from {hub_endpoint()}"


def training_sections(config: PipelineConfig) -> dict[str, TrainingConfig]:
    """The training stages the run has: {config section: its training settings}."""
    sections = {"distill.training": config.distill.training}
    if config.finetune.enabled:
        sections = {"finetune.training": config.finetune.training, **sections}
    return sections


def check_devices(config: PipelineConfig, readiness: Readiness) -> None:
    """A row per training stage: its device and precision exist on this machine, and this node has
    a GPU for each of its ``num_processes`` ranks."""
    from atkd_core.training.ds_config import resolve_device, resolve_precision

    for section, training in training_sections(config).items():

        def devices(section: str = section, training: TrainingConfig = training) -> str:
            device = resolve_device(training, section)
            precision = resolve_precision(training, device, section)
            job = f"{training.num_processes} process{'es' * (training.num_processes > 1)} x {training.num_nodes} node{'s' * (training.num_nodes > 1)}"
            if device != "cuda":
                return f"{job} on the CPU, {precision}"
            import torch

            available = torch.cuda.device_count()
            if available < training.num_processes:
                raise UserError(
                    f"{section}.num_processes is {training.num_processes} but this machine has {available} CUDA "
                    f"device{'s' * (available != 1)}; lower num_processes, or run on a machine with more GPUs"
                )
            return f"{job} on CUDA ({available} GPUs on this machine), {precision}"

        _checked(readiness, f"devices {section.split('.')[0]}", devices)


def _tokens_per_row(config: PipelineConfig, readiness: Readiness) -> float:
    """Mean tokens of a training row, capped at data.max_length, from a sample of the training
    files (tokenised when the tokenizer exists, else by characters); max_length where unknown."""
    data = config.data
    if data.source != "files":
        return float(data.max_length)
    from atkd_core.data.records import file_records, json_object

    texts: list[str] = []
    try:
        records = [
            (where, record)
            for path in data.train_files
            for where, record in file_records(Path(path).expanduser())[:TOKEN_SAMPLE_ROWS]
        ]
        for where, record in records[:TOKEN_SAMPLE_ROWS]:
            values = json_object(record, where).values() if isinstance(record, str) else record.values()
            texts.append(" ".join(str(value) for value in values if value is not None))
    except UserError:  # the data rows and the prepare stage report the file; this takes the bound
        return float(data.max_length)
    if not texts:
        return float(data.max_length)
    if readiness.tokenizer is not None:
        lengths = [len(ids) for ids in readiness.tokenizer(texts)["input_ids"]]
    else:
        lengths = [int(len(text) / CHARACTERS_PER_TOKEN) + 1 for text in texts]
    return sum(min(length, data.max_length) for length in lengths) / len(lengths)


def _vocab_size(config: PipelineConfig, readiness: Readiness) -> int:
    """The vocabulary the cache's ids index: the loaded tokenizer's, the size a tokenizer still to
    be trained is given, else the teacher's, else Llama 3's 128,256 (a compact cache's bytes grow
    with log2 of it, so a guess costs a few bytes a token)."""
    if readiness.tokenizer is not None:
        return len(readiness.tokenizer)
    if config.tokenizer.source == "train":
        return config.tokenizer.vocab_size
    teacher = readiness.models.get("teacher")
    return teacher.vocab_size if teacher is not None and teacher.vocab_size else 128_256


def check_disk(config: PipelineConfig, readiness: Readiness, rows: dict[str, int]) -> None:
    """Free space where the workdir is against the teacher cache (training tokens x bytes per
    token for the scoring section) and the checkpoints (kept x 16 B per parameter)
    and saved models (4 B per parameter) of each training stage."""

    def disk() -> str:
        needs: list[str] = []
        total = 0
        if "train" in rows and config.distill.teacher_source == "offline":
            tokens = rows["train"] * _tokens_per_row(config, readiness)
            per_token = cache_bytes_per_token(config.scoring, _vocab_size(config, readiness))
            cache = tokens * per_token
            total += int(cache)
            needs.append(f"teacher cache at most {human_bytes(cache)} ({tokens:,.0f} tokens x {per_token} B)")
        stage_models = {"finetune.training": "teacher", "distill.training": "student"}
        for section, training in training_sections(config).items():
            facts = readiness.models.get(stage_models[section])
            if facts is None or facts.parameters is None:
                continue
            size = facts.parameters * (
                CHECKPOINT_BYTES_PER_PARAMETER * training.keep_checkpoints + SAVED_MODEL_BYTES_PER_PARAMETER
            )
            total += size
            needs.append(f"{section.split('.')[0]} checkpoints and model ~{human_bytes(size)}")
        if "train" not in rows:
            needs.append(
                "teacher cache not estimated (training rows unknown until the dataset is downloaded)"
            )
        existing = Path(config.workdir).expanduser().absolute()
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        summary = f"{human_bytes(free)} free at {existing}; needs ~{human_bytes(total)}" + (
            f" ({'; '.join(needs)})" if needs else ""
        )
        if total > free:
            raise UserError(f"{summary}: free some space or point workdir at a larger disk")
        return summary

    _checked(readiness, "disk", disk)


def check_cache_location(config: PipelineConfig, readiness: Readiness) -> None:
    """With ``scoring.location``: its filesystem installed, the URL listed with the user's
    credentials, and what it holds (a finished cache, or nothing yet)."""
    location = config.scoring.location
    if location is None:
        return

    def reachable() -> str:
        remote = RemoteDirectory(location)
        try:
            files = remote.sizes()
            bucket = None if files else remote.missing_bucket()
        except Exception as exc:  # an unreachable store or refused credentials: say which
            raise UserError(
                f"{location}: cannot be listed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "check the store's credentials and endpoint (for S3: the AWS environment variables)"
            ) from None
        if bucket is not None:
            raise UserError(
                f"{location}: the bucket {bucket!r} does not exist, and score_teacher's upload does not "
                "create one; create it, or set scoring.location to a bucket that exists"
            )
        manifest = read_manifest(location, CacheManifest)
        if manifest is None:
            held = f"{len(files)} files, no finished cache" if files else "empty"
            return f"{location}: reachable, {held}; score_teacher uploads the cache there"
        return (
            f"{location}: reachable, holds a cache of {manifest.tokens:,} tokens "
            f"({human_bytes(manifest.cache_bytes)}); reused when made from the same inputs"
        )

    _checked(readiness, "cache location", reachable)


def check_config(
    config: PipelineConfig,
    needs: list[str],
    harness: dict[str, list[str]] | None = None,
    probe: Callable[[], str | None] = hub_problem,
) -> Readiness:
    """Every check this layer can make for ``config`` (``needs``: hub_needs of it; ``harness``:
    harness_datasets of its tasks when the caller has them; ``probe``: see check_hub), in the
    table's order."""
    readiness = Readiness()
    check_hub(readiness, needs, probe)
    check_models(config, readiness)
    rows = check_data(config, readiness)
    check_harness(config, readiness, harness)
    check_devices(config, readiness)
    check_disk(config, readiness, rows)
    check_cache_location(config, readiness)
    return readiness
