"""No Docker engine runs here: lint the Dockerfile, and keep its install step the README's."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_hadolint_reports_nothing():
    exe = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed; `make install` installs it with the test extras")
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_installs_the_way_the_readme_does():
    docker = DOCKERFILE.read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make install" in docker and "make install" in readme
    assert "ENTRYPOINT [\"sparse-ad\"]" in docker
    for cmd in ("docker build -f docker/Dockerfile -t sparse-ad .", "docker run --gpus all"):
        assert cmd in readme
    for path in re.findall(r"^COPY (\S+)", docker, flags=re.M):
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repo"


def test_pins_satisfy_setup_requirements():
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version
    setup = (ROOT / "setup.py").read_text()
    reqs = [Requirement(r) for r in re.findall(r'"([A-Za-z0-9_.-]+(?:[<>=!~]=?[^"]+)?)"', setup)
            if re.match(r"^[A-Za-z0-9_.-]+(>=|==|<=|~=)[0-9]", r)]
    checked = 0
    for req in reqs:
        if req.name.lower() in pins:
            assert req.specifier.contains(pins[req.name.lower()]), f"{req} vs pin {pins[req.name.lower()]}"
            checked += 1
    assert checked >= 6
    assert "torch==" + pins["torch"] in DOCKERFILE.read_text()
