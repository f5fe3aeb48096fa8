"""The wheels the GPU check needs on a GPU machine without a package index, fetched ahead of time.

A rented or sandboxed GPU machine often comes with CUDA, PyTorch and Triton installed and no way to
reach a package index. This script lists, from this machine's installed packages, everything the
training, the benchmarks and the demo import (atkd's runtime requirements and what they require in
turn, at the versions pinned in constraints.txt), leaves out what such a machine brings (torch,
triton, the NVIDIA libraries and the large scientific packages that PyTorch images carry), and
downloads the rest as wheels for the target's Python into ``.whl/`` (DeepSpeed, published as a
source archive, is built into a pure-Python wheel here; its CUDA ops compile on first use there).
``benchmarks/gpu_check.sh`` installs them from there when its interpreter lacks a package.

    make gpu-wheels                                  # Python 3.12, manylinux x86-64, into .whl/
    .venv/bin/python benchmarks/gpu_wheels.py --python-version 3.11 --dest /tmp/wheels
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# What the GPU check imports: atkd_core's runtime requirements (requirements.txt, less the
# orchestration and tracking servers, which the check runs without: `atkd run --direct`).
ROOTS = [
    "transformers",
    "datasets",
    "tokenizers",
    "accelerate",
    "safetensors",
    "pydantic",
    "pyyaml",
    "deepspeed",
    "lm-eval[hf]",
    "rouge-score",
    "tqdm",
    "packaging",
]
# Brought by a CUDA PyTorch image, and large: never downloaded. (lxml, hf-xet and pygments are
# there too, and nothing the check runs depends on their versions; leaving them out keeps the
# wheels at about 42 MiB, inside what a 64 MiB transfer holds beside the repository.)
BROUGHT = re.compile(
    r"^(torch|triton|nvidia-.*|cuda-.*|numpy|scipy|pandas|pyarrow|scikit-learn|matplotlib|pillow|"
    r"sympy|networkx|jinja2|markupsafe|mpmath|fsspec|filelock|setuptools|typing-extensions|"
    r"lxml|hf-xet|pygments)$"
)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def normalize(name: str) -> str:
    """A distribution name as pip compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], python_version: str) -> dict[str, str]:
    """{distribution: installed version} for ``roots`` and everything they require on Linux with
    ``python_version``, from this environment's metadata (extras followed where a root names them)."""
    environment = {**default_environment(), "python_version": python_version, "sys_platform": "linux"}
    found: dict[str, str] = {}
    pending = [Requirement(root) for root in roots]
    while pending:
        requirement = pending.pop()
        name = normalize(requirement.name)
        if name in found:
            continue
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this environment does not use either
        found[name] = distribution.version
        for line in distribution.requires or []:
            nested = Requirement(line)
            extras = requirement.extras or {""}
            if nested.marker is None or any(
                nested.marker.evaluate({**environment, "extra": extra}) for extra in extras
            ):
                pending.append(nested)
    return found


def main() -> None:
    """Download the wheels and print what was fetched and its size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument("--dest", type=Path, default=REPO / ".whl")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    wanted = {
        name: version
        for name, version in closure(ROOTS, args.python_version).items()
        if not BROUGHT.match(name)
    }
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    target = ["--python-version", args.python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        target += ["--platform", platform]
    source_only = []
    for name, version in sorted(wanted.items()):
        fetched = subprocess.run(
            [
                *pip,
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                *target,
                "-d",
                str(args.dest),
                f"{name}=={version}",
            ],
            capture_output=True,
            text=True,
        )
        if fetched.returncode != 0:
            source_only.append(f"{name}=={version}")
    for spec in source_only:
        # Published as a source archive only (DeepSpeed, some small pure-Python packages): built here.
        built = subprocess.run(
            [*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(args.dest), spec],
            capture_output=True,
            text=True,
        )
        if built.returncode != 0:
            sys.exit(
                f"{spec}: no wheel for Python {args.python_version} and no build here:\n{built.stderr[-2000:]}"
            )
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels)
    print(
        f"{len(wanted)} distributions ({len(source_only)} built here) -> {len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest}"
    )


if __name__ == "__main__":
    main()
