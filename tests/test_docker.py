"""docker/Dockerfile installs ptft the README's way (command 1) and keeps the checkout's heavy folders out of the build.

No Docker daemon is needed: the checks read the files (building the image needs Docker Hub, out of reach here)."""

from __future__ import annotations

import re
import shlex
import tomllib

from conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def readme_install() -> list[str]:
    """README command 1's install steps (before running the quickstart), as shell words."""
    text = (REPO / "README.md").read_text()
    line = next(row for row in text.splitlines() if row.startswith("python3 -m venv .venv") and "quickstart" in row)
    steps = [step.strip() for step in line.split("&&")]
    assert steps[-1] == ".venv/bin/ptft quickstart", steps
    return steps[:-1]


def dockerfile_run_steps() -> list[str]:
    """The ``&&``-joined steps of the Dockerfile's RUN instructions (line continuations joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            steps += [re.sub(r"\s+", " ", step).strip() for step in line[4:].split("&&")]
    return steps


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def test_dockerfile_installs_the_readme_way():
    venv, pip_install = readme_install()
    steps = dockerfile_run_steps()
    assert steps[0] == venv  # python3 -m venv .venv
    # The README's pip install, with the extras as a build argument whose default is the README's.
    readme_words = shlex.split(pip_install)
    docker_install = steps[-1]
    args = build_args()
    docker_words = shlex.split(docker_install.replace("${EXTRAS}", args["EXTRAS"]))
    assert [w for w in docker_words if w != "--no-cache-dir"] == readme_words, (docker_install, pip_install)
    # Every extra the image can be asked for exists in pyproject.toml.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert args["EXTRAS"] in extras


def test_dockerfile_torch_choice_and_entrypoint():
    text = DOCKERFILE.read_text()
    args = build_args()
    assert args["TORCH"] == "cpu" and "download.pytorch.org/whl/cpu" in text  # CPU wheels by default
    assert 'elif [ "$TORCH" != "cuda" ]' in text  # anything else stops the build with a message
    assert re.search(r"^FROM python:\$\{PYTHON\}-slim$", text, flags=re.M) and args["PYTHON"] == "3.11"
    assert 'ENTRYPOINT ["ptft"]' in text and 'CMD ["quickstart"]' in text


def test_dockerignore_keeps_environments_and_runs_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", "bench/.work", "*.ckpt", "wandb"} <= ignored
    # ...but nothing the install needs: the package, its recipes and assets, pyproject.toml and the README.
    needed = ["ptft", "ptft/recipes", "ptft/assets", "pyproject.toml", "README.md"]
    assert not [path for path in needed if path in ignored or path.split("/")[0] in ignored]
