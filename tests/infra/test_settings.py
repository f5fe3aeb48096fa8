"""Environment defaults: set by the entry points, never by importing a module."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from infra.settings import ENVIRONMENT_DEFAULTS
from tests.conftest import REPO_ROOT

NAMES = sorted(ENVIRONMENT_DEFAULTS)
PROBE = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {NAMES!r}}}))"


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ENVIRONMENT_DEFAULTS}


def test_importing_the_flows_and_the_cli_leaves_the_environment_alone():
    code = "import flows, flows.cli, flows.distill, flows.compare; " + PROBE
    out = subprocess.run(
        [sys.executable, "-c", code], env=_clean_environment(), cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == dict.fromkeys(NAMES)


def test_the_image_entry_point_applies_the_defaults_and_a_users_value_wins():
    env = {**_clean_environment(), "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run(
        [sys.executable, "-m", "infra.settings", sys.executable, "-c", PROBE],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {**ENVIRONMENT_DEFAULTS, "TOKENIZERS_PARALLELISM": "true"}


def test_the_entry_point_without_a_command_says_how_to_use_it():
    out = subprocess.run(
        [sys.executable, "-m", "infra.settings"],
        env=_clean_environment(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "usage: python -m infra.settings COMMAND" in out.stderr
