"""What a user meets when a config value cannot run, the filesystem refuses, or a message could
mislead: one line each, naming what to change, and nothing half-written left behind."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from atkd_core.config import config_to_yaml
from atkd_core.errors import FilesystemError, filesystem_error
from flows.cli import main
from tests.conftest import REPO_ROOT, free_port, tiny_config

TINY = {
    "finetune": {"enabled": False},
    "distill": {"training": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 1}},
    "eval": {"enabled": False},
    "tracking": {"enabled": False},
}


def _config(tmp_path: Path, name: str = "config.yaml", **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(config_to_yaml(tiny_config(tmp_path / "work", **{**TINY, **sections})))
    return path


def _one_line(capsys, code: int, argv: list[str]) -> str:
    """Run the CLI; assert its exit code and that it said exactly one line, without a traceback."""
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.out + captured.err, captured.err
    return lines[0]


# ---- the config refuses what cannot run ------------------------------------------------------


def test_top_k_over_the_trained_vocabulary_is_refused_at_load(tmp_path, capsys):
    path = _config(tmp_path, tokenizer={"vocab_size": 300})
    line = _one_line(capsys, 2, ["score", str(path), "--set", "scoring.top_k=500"])
    assert (
        "scoring.top_k: 500 is over the trained tokenizer's vocabulary (tokenizer.vocab_size = 300)" in line
    )


def test_top_k_over_a_loaded_tokenizers_vocabulary_is_refused_before_scoring(tmp_path, capsys):
    small = tmp_path / "small"
    assert main(["data", "prepare", str(_config(small, tokenizer={"vocab_size": 300}))]) == 0
    path = _config(
        tmp_path,
        tokenizer={"source": "path", "path": str(small / "work" / "prepared" / "tokenizer")},
        scoring={"top_k": 350},
    )
    capsys.readouterr()
    line = _one_line(capsys, 2, ["score", str(path)])
    assert line == (
        "atkd: config error: scoring.top_k: 350 is over the tokenizer's vocabulary of 300 tokens; "
        "set it to at most 300"
    )
    assert not (tmp_path / "work" / "teacher_cache").exists()
    assert not (tmp_path / "work" / "models").exists()  # refused before any model was made


def test_max_length_over_a_presets_positions_is_refused_at_load(tmp_path, capsys):
    path = _config(tmp_path)
    line = _one_line(capsys, 2, ["config", "show", str(path), "--set", "data.max_length=600"])
    assert "data.max_length: 600 is over the teacher preset neox-tiny's 512 positions" in line


def test_max_length_over_a_model_directorys_positions_is_refused_before_training(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from atkd_core.data.tokenizer import load_tokenizer
    from atkd_core.models.build import preset_config, save_model

    assert main(["data", "prepare", str(_config(tmp_path))]) == 0
    tokenizer = load_tokenizer(tmp_path / "work" / "prepared" / "tokenizer")
    short = preset_config("neox-tiny", tokenizer)
    short.max_position_embeddings = 32
    save_model(AutoModelForCausalLM.from_config(short), tokenizer, tmp_path / "short")
    path = _config(
        tmp_path,
        teacher={"path": str(tmp_path / "short")},
        tokenizer={"source": "teacher"},
    )
    capsys.readouterr()
    line = _one_line(capsys, 2, ["score", str(path)])
    assert "data.max_length: 48 is over the teacher's 32 positions (max_position_embeddings in" in line


def test_a_batch_larger_than_the_training_split_is_refused_before_training(tmp_path, capsys):
    path = _config(tmp_path, distill={"training": {"batch_size": 128, "micro_batch_size": 8}})
    line = _one_line(capsys, 2, ["train", str(path), "--stage", "distill"])
    assert "distill.training.batch_size: 128 is over the 64 training rows of" in line
    assert not (tmp_path / "work" / "teacher_cache").exists()


# ---- filesystem faults ---------------------------------------------------------------------


@pytest.mark.parametrize("output", ["prepared", "teacher_cache", "checkpoints"])
def test_a_regular_file_where_an_output_directory_goes_is_one_line_naming_it(tmp_path, capsys, output):
    path = _config(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / output).write_text("in the way\n")
    line = _one_line(capsys, 1, ["train", str(path), "--stage", "distill"])
    assert line == (
        f"atkd: {tmp_path / 'work' / output}: a regular file stands where a directory is expected; "
        "move or delete that file"
    )
    (tmp_path / "work" / output).unlink()
    assert main(["train", str(path), "--stage", "distill"]) == 0  # recovery: nothing half-valid kept


def _cli(argv: list[str], preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        timeout=600,
    )


def test_a_file_size_limit_while_scoring_is_one_line_naming_the_shard(tmp_path):
    import resource

    # float32 shards: the largest, so that the shard is the one file over the limit below.
    path = _config(tmp_path, scoring={"encoding": "float"})
    assert _cli(["data", "prepare", str(path)]).returncode == 0
    # The teacher is made first without a limit; then only the cache's shard is over it.
    from atkd_core.config import load_config
    from atkd_core.models.build import materialize_model

    config = load_config(path)
    materialize_model(config.teacher, config.layout.prepared / "tokenizer", config.layout.teacher_init)

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = _cli(["score", str(path)], preexec=limit_file_size)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"atkd: {tmp_path / 'work' / 'teacher_cache.partial'}/shard-00000.tmp: ")
    assert "file-size limit (ulimit -f)" in lines[0]
    assert _cli(["score", str(path)]).returncode == 0  # the same command, the limit lifted


def _namespaces_work() -> bool:
    """Whether this machine lets a process mount in a private mount namespace (unshare)."""
    try:
        probe = subprocess.run(
            ["unshare", "--mount", "--map-root-user", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.parametrize(
    ("fault", "advice"),
    [
        ("full", "no space left on its device; free space there or set workdir on a larger disk"),
        ("read-only", "the filesystem is read-only; set workdir on a writable one"),
        ("immutable", "operation not permitted; make it writable by this user or set workdir elsewhere"),
    ],
)
def test_a_filesystem_refusing_a_stages_write_is_one_line_naming_the_path(tmp_path, fault, advice):
    path = _config(tmp_path)
    models = tmp_path / "work" / "models"
    models.mkdir(parents=True)
    command = [sys.executable, "-m", "flows.cli", "score", str(path)]
    if fault == "immutable":
        if subprocess.run(["chattr", "+i", str(models)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available on this filesystem")
    elif not _namespaces_work():
        pytest.skip("no private mount namespaces (unshare) on this machine")
    else:
        mount = (
            f"mount -t tmpfs -o size=256k tmpfs {models}"
            if fault == "full"
            else f"mount --bind -o ro {models} {models}"
        )
        command = [
            "unshare",
            "--mount",
            "--map-root-user",
            "sh",
            "-c",
            f'{mount} && exec "$@"',
            "sh",
            *command,
        ]
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["chattr", "-i", str(models)], capture_output=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"atkd: {models}/.teacher-init.tmp-") and lines[0].endswith(advice)
    assert [p.name for p in models.iterdir()] == []  # nothing half-written kept
    assert main(["score", str(path)]) == 0  # the same command on a filesystem that takes the write


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.ENOSPC, "no space left on its device"),
        (errno.EROFS, "the filesystem is read-only; set workdir on a writable one"),
        (errno.EACCES, "permission denied"),
        (errno.EFBIG, "file-size limit"),
    ],
)
def test_each_filesystem_fault_names_its_path_and_what_to_do(code, advice):
    fault = filesystem_error(OSError(code, os.strerror(code), "/data/run/prepared/x.arrow"))
    assert isinstance(fault, FilesystemError)
    assert str(fault).startswith("/data/run/prepared/x.arrow: ") and advice in str(fault)
    # A library's I/O error without a path gets the one its caller names.
    named = filesystem_error(RuntimeError(f"write failed (os error {code})"), "/data/shard.tmp")
    assert named is not None and str(named).startswith("/data/shard.tmp: ")
    assert filesystem_error(OSError(errno.ENOENT, "gone", "/x")) is None  # a bug keeps its traceback


def test_temporary_siblings_of_a_killed_run_are_removed_by_the_next(tmp_path, capsys):
    path = _config(tmp_path)
    (tmp_path / "work").mkdir()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    dead = tmp_path / "work" / f".prepared.tmp-{host}-{gone.stdout.strip()}-0123abcd"
    live = tmp_path / "work" / f".prepared.tmp-{host}-{os.getpid()}-4567cdef"
    elsewhere = tmp_path / "work" / f".prepared.tmp-another-host-{gone.stdout.strip()}-89abcdef"
    for sibling in (dead, live, elsewhere):
        (sibling / "dataset").mkdir(parents=True)
    assert main(["data", "prepare", str(path)]) == 0
    assert not dead.exists() and live.exists() and elsewhere.exists()


def test_outputs_are_readable_by_others_as_the_umask_says(tmp_path):
    path = _config(tmp_path)
    assert main(["train", str(path), "--stage", "distill"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    modes = {
        str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
        for p in (tmp_path / "work").rglob("*")
        if p.is_file() and p.suffix == ".safetensors"
    }
    assert any("teacher_cache" in name for name in modes) and any("student" in name for name in modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ---- messages that tell the truth ----------------------------------------------------------


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nloss:\n  lam: [0.2\n  k: 1\n")
    line = _one_line(capsys, 2, ["config", "show", str(path)])
    assert line.startswith(f"atkd: config error: {path}:4:4: not valid YAML: ")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_is_refused(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    line = _one_line(capsys, 2, ["data", "prepare", str(path)])
    assert f"{path}: the config is empty" in line


def test_sync_with_nothing_waiting_says_whether_tracking_answers(tmp_path, capsys):
    down = f"http://127.0.0.1:{free_port()}"
    path = _config(tmp_path, tracking={"tracking_uri": down})
    assert main(["sync", str(path)]) == 0
    out = capsys.readouterr().out
    assert "atkd sync: nothing waiting in" in out and f"the tracking server at {down} did not answer" in out
    assert main(["sync", str(_config(tmp_path, name="off.yaml"))]) == 0
    assert "tracking is off (tracking.enabled: false)" in capsys.readouterr().out
    local = _config(tmp_path, name="local.yaml", tracking={"enabled": True})
    assert main(["sync", str(local)]) == 0
    assert "does not exist yet (no run has been tracked there)" in capsys.readouterr().out


def test_a_stage_the_config_disables_is_refused_not_run(tmp_path, capsys):
    line = _one_line(capsys, 2, ["train", str(_config(tmp_path)), "--stage", "finetune"])
    assert "finetune.enabled: false, so there is no teacher fine-tuning to run" in line
    assert not (tmp_path / "work" / "models").exists()


def test_an_overlong_row_under_error_names_its_file_and_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Echo {i}.", "response": str(i)} for i in range(20)]
    rows[6]["response"] = " ".join(f"w{i * 7919 % 1000}" for i in range(60))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = _config(
        tmp_path,
        data={"source": "files", "train_files": [str(data)], "on_overlong": "error", "max_length": 128},
    )
    line = _one_line(capsys, 1, ["data", "prepare", str(path)])
    assert line.startswith(f"atkd: {data}:7: ") and "over data.max_length=128" in line


def test_third_party_chatter_stays_below_the_products_lines_unless_debug(tmp_path):
    path = _config(tmp_path)
    quiet = _cli(["score", str(path)])
    assert quiet.returncode == 0, quiet.stderr
    output = quiet.stdout + quiet.stderr
    assert "score_teacher: wrote" in output
    assert "Loading weights" not in output and "Writing model shards" not in output
    assert "[WARNING]" not in output
    (tmp_path / "work" / "teacher_cache").rename(tmp_path / "old_cache")
    (tmp_path / "work" / "models").rename(tmp_path / "old_models")
    loud = _cli(["--debug", "score", str(path)])
    assert loud.returncode == 0 and "Writing model shards" in loud.stdout + loud.stderr
