"""Config validation: good configs load, bad values fail with one line naming field, value and range."""

from __future__ import annotations

import subprocess
import sys

import pytest

from atkd_core.config import ConfigError, PipelineConfig, apply_overrides, config_to_yaml, load_config
from flows.cli import main
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("name", ["demo.yaml", "pythia-dolly.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO_ROOT / "configs" / name)
    assert isinstance(config, PipelineConfig)


def test_demo_config_is_the_embedded_default():
    config = load_config(REPO_ROOT / "configs" / "demo.yaml")
    assert config.data.source == "embedded"
    assert config.teacher.preset and config.student.preset


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", ["loss.lam=0.5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config


def test_override_sets_nested_value_parsed_as_yaml():
    config = load_config(
        None, ["loss.lam=0.5", "distill.training.zero_stage=3", "eval.harness_tasks=[mmlu, bbh]"]
    )
    assert config.loss.lam == 0.5
    assert config.distill.training.zero_stage == 3
    assert config.eval.harness_tasks == ["mmlu", "bbh"]


def test_override_without_equals_is_a_config_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["loss.lam"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.lam=1.5", ["loss.lam", "1.5", "<= 1", ">= 0"]),
        ("loss.hard_fraction=0", ["loss.hard_fraction", "0", "(0, 1)", "auto"]),
        ("loss.hard_fraction=1.5", ["loss.hard_fraction", "1.5", "(0, 1)", "epsilon"]),
        ("loss.unc_epsilon=1", ["loss.unc_epsilon", "1", "< 1"]),
        ("loss.taid.t_start=1", ["loss.taid.t_start", "1", "< 1"]),
        ("loss.taid.t_end=0.3", ["loss.taid", "0.3", "below t_start"]),
        ("loss.adakd.min_ratio=0", ["loss.adakd.min_ratio", "0", "> 0"]),
        ("loss.chunk_size=0", ["loss.chunk_size", "0", ">= 1", "auto or null"]),
        ("distill.training.zero_stage=4", ["distill.training.zero_stage", "4", "<= 3"]),
        ("loss.objective=magic", ["loss.objective", "'magic'", "'atkd'"]),
        ("loss.divergence=kl", ["loss.divergence", "'kl'", "'forward_kl'", "'reverse_kl'"]),
        ("loss.unknown=1", ["loss.unknown", "unknown field"]),
        ("teacher.preset=gpt-5", ["teacher", "gpt-5", "neox-small"]),
        ("distill.training.batch_size=33", ["batch_size", "33", "multiple of"]),
    ],
)
def test_bad_value_message_names_field_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(REPO_ROOT / "configs" / "demo.yaml", [override])
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_every_problem_gets_its_own_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["loss.lam=2", "loss.temperature=-1", "scoring.top_k=0"])
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert {line.split(" = ")[0].split(": ")[-1] for line in lines} == {
        "loss.lam",
        "loss.temperature",
        "scoring.top_k",
    }


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="unc_threshold"):
        load_config(None, ["loss.split_scope=threshold"])
    with pytest.raises(ConfigError, match="teacher_source"):
        load_config(None, ["distill.data_source=student_generated"])
    with pytest.raises(ConfigError, match="train_files"):
        load_config(None, ["data.source=files"])
    with pytest.raises(ConfigError, match="exactly one of preset and path"):
        load_config(REPO_ROOT / "configs" / "demo.yaml", ["teacher.path=some/model"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing)


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            for candidate in (annotation, *getattr(annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, PipelineConfig.__mro__[1]):
                    walk(candidate, f"{prefix}{name}.")

    walk(PipelineConfig)


def test_cli_bad_value_exits_nonzero_with_one_line(capsys):
    code = main(["config", "show", str(REPO_ROOT / "configs" / "demo.yaml"), "--set", "loss.lam=1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "loss.lam" in err[0] and "1.5" in err[0] and "<= 1" in err[0]


def test_cli_schema_is_json(capsys):
    import json

    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "loss" in schema["properties"]


def test_atkd_core_imports_neither_prefect_nor_mlflow():
    code = (
        "import sys, atkd_core, atkd_core.config, atkd_core.manifest, atkd_core.data.prepare, atkd_core.models.build\n"
        "bad = [m for m in ('prefect', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
