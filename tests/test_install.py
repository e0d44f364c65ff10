"""The Makefile's torch selection (launch/torch_index.py) with a fake environment: GPU or not, pip configured with
its own index or public PyPI, and the TORCH_INDEX overrides; and the Makefile really calls it."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("torch_index", REPO / "launch" / "torch_index.py")
ti = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ti)

CPU = ["--index-url", ti.CPU_INDEX]
HERE = {"global.extra-index-url": "file:///opt/pypi/simple", "global.find-links": "/opt/wheels",
        "global.cert": "/etc/ssl/certs/ca-certificates.crt"}  # this machine's pip config


@pytest.mark.parametrize("gpu,config,env,want", [
    (False, {}, {}, CPU),  # a fresh public machine without a GPU: the CPU wheels
    (True, {}, {}, []),  # with a GPU: PyPI's CUDA build
    (False, HERE, {}, []),  # a machine-local wheel index: it decides, nothing public is added
    (False, {}, {"PIP_INDEX_URL": "https://mirror.example/simple"}, []),
    (False, {"global.index-url": "https://pypi.org/simple"}, {"PIP_INDEX_URL": "https://pypi.org/simple"}, CPU),
    (False, {"global.cert": "/x.crt", "global.timeout": "60"}, {}, CPU),  # settings that are not an index
])
def test_auto(gpu, config, env, want):
    args, why = ti.torch_args("auto", gpu, config, env)
    assert args == want, why


def test_overrides():
    assert ti.torch_args("default", False, {}, {})[0] == []
    assert ti.torch_args("cpu", True, HERE, {})[0] == CPU
    assert ti.torch_args("https://download.pytorch.org/whl/cu126", False, {}, {})[0] == [
        "--index-url", "https://download.pytorch.org/whl/cu126"]


def test_pip_config_parsing(tmp_path):
    fake = tmp_path / "pip"
    fake.write_text("#!/bin/sh\necho \"global.find-links='/opt/wheels'\"\necho \":env:.default-timeout='180'\"\n")
    fake.chmod(0o755)
    assert ti.pip_config(str(fake)) == {"global.find-links": "/opt/wheels", ":env:.default-timeout": "180"}
    assert ti.pip_config(str(tmp_path / "missing")) == {}


def test_makefile_installs_torch_from_the_selection():
    r = subprocess.run(["make", "-n", "install", "TORCH_INDEX=cpu", "VENV=/nonexistent/venv"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "No such file" in r.stderr and "make" in r.stderr:
        pytest.skip("make is not installed")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "torch==2.13.0" in x)
    assert "launch/torch_index.py --index \"cpu\"" in line


def test_readme_links_resolve_inside_the_repository():
    import re

    text = (REPO / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://", "#"))]
    assert links, "no relative links found"
    for target in links:
        path = (REPO / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO) and path.exists(), f"README links {target}, outside or missing"
