"""A built wheel, installed outside the repository: ``tw-rl --version``, ``tw-rl demo --help`` and the demo's config
resolve to the shipped ``demo.yaml``; the runtime env of ``tw-rl submit`` is found; ``tw_rl.envs`` registers the
Gymnasium id; no top-level ``envs`` is installed. No network: the fresh venv reads this venv's site-packages
through a ``.pth`` line (without its editable-install hooks) for the dependencies."""

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel, = (tmp / "dist").glob("tw_rl-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
            if Path(p).is_dir()]
    (Path(purelib) / "twrl_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))  # after the venv's own
    # --ignore-installed: the dependency path holds this venv's own (editable) tw_rl metadata, which pip would
    # otherwise take as "already installed" and skip the wheel
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                        "--ignore-installed",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "no such option: --python" in r.stderr:
        pytest.skip("this pip has no --python option (pip < 22.3)")
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return {"wheel": wheel, "bin": venv / "bin", "py": py, "cwd": tmp, "env": env, "purelib": Path(purelib)}


def _run(inst, *argv):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, cwd=inst["cwd"],
                          env=inst["env"])


def test_wheel_holds_the_configs_and_no_top_level_envs(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "tw_rl/_launch/configs/demo.yaml" in names and "tw_rl/_launch/runtime_env.yaml" in names
    assert "tw_rl/envs/token_mdp.py" in names
    assert not any(n.startswith("envs/") for n in names), [n for n in names if n.startswith("envs/")]


def test_installed_cli_version_and_demo_help(installed):
    r = _run(installed, installed["bin"] / "tw-rl", "--version")
    assert r.returncode == 0 and r.stdout.strip() == "tw-rl 0.1.0", r.stdout + r.stderr  # no git outside a checkout
    r = _run(installed, installed["bin"] / "tw-rl", "demo", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "site-packages/tw_rl/_launch/configs/demo.yaml" in text.replace(" ", ""), text  # argparse wraps it
    assert "36 iterations" in text and "rl.trainable=tau" in text, text  # phase 2 as demo.yaml configures it


def test_installed_package_finds_its_files_not_the_repositorys(installed):
    code = ("import tw_rl, tw_rl.envs, gymnasium, sys; from tw_rl.cli import demo_config, build_parser; "
            "from tw_rl.distributed.launch import load_runtime_env; "
            "a = build_parser().parse_args(['demo']); "
            "print(tw_rl.__file__); print(a.config); print(load_runtime_env()['env_vars']['TOKENIZERS_PARALLELISM']); "
            "print('tw_rl/TokenMDP-v0' in gymnasium.registry); print(tw_rl.envs.__file__)")
    r = _run(installed, installed["py"], "-c", code)
    assert r.returncode == 0, r.stderr
    pkg, config, tok_par, registered, envs_file = r.stdout.split()
    assert pkg.startswith(str(installed["purelib"])) and not pkg.startswith(str(REPO))
    assert config == str(installed["purelib"] / "tw_rl" / "_launch" / "configs" / "demo.yaml")
    assert tok_par == "false" and registered == "True" and envs_file.startswith(str(installed["purelib"]))


def test_installed_wheel_trains_and_evaluates_a_smoke_run(installed, tmp_path):
    """The wheel alone, outside the repository, runs every phase and writes a report (Ray kept out: no workers)."""
    from tests.test_train import TINY

    out = tmp_path / "smoke"
    r = _run(installed, installed["bin"] / "tw-rl", "train", *TINY, "rl.iterations=1", f"out_dir={out}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = (out / "report.json").read_text()
    assert '"tw"' in report and (out / "models" / "final").is_dir()
