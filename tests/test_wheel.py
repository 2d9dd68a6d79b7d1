"""A plain (non-editable) install of the built wheel: the shipped recipes and the quickstart work from any folder."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the ptft wheel, reusing this environment's other packages (a .pth file, no downloads)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: the build writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(["cp", "-r", str(REPO / "ptft"), str(source / "ptft")], check=True)
    run = dict(check=True, capture_output=True, text=True, timeout=600)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root),
                    str(source)], **run)
    (wheel,) = root.glob("ptft-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **run)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          **run).stdout.strip()
    # A plain path entry: the test venv's own .pth files (the editable ptft among them) are not run from there.
    (Path(site) / "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], **run)
    return venv


def test_installed_wheel_lists_recipes_and_runs_the_quickstart_anywhere(installed, tmp_path):
    ptft = installed / "bin" / "ptft"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the venv decides what imports
    listing = subprocess.run([str(ptft), "recipes"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env=env)
    assert listing.returncode == 0, listing.stderr[-2000:]
    folder = Path(listing.stdout.split("(in ")[1].split(")")[0])
    assert folder.is_relative_to(installed)  # the installed copy, not the checkout's editable ptft
    assert "text/sst2.yaml" in listing.stdout and "quickstart.yaml" in listing.stdout

    quick = subprocess.run(
        [str(ptft), "quickstart", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    assert quick.returncode == 0, quick.stderr[-3000:]
    assert list((tmp_path / "runs" / "quickstart").rglob("last.ckpt"))
