"""What a wheel says it needs: its version's local label names the torch it was built against, its requirements pin
that torch, the sdist keeps the loose range (buildsys/ddtree_wheel_metadata.py); a source tree without a build
says so on import; benchmarks use the checkout's package only when it is built (bench/checkout.py)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"version": "0.1.0", "dependencies": ["numpy", "tqdm"], "torch": ">=2.4"}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def provider(monkeypatch, tmp_path):
    module = load(ROOT / "buildsys" / "ddtree_wheel_metadata.py", "ddtree_wheel_metadata_under_test")
    monkeypatch.chdir(tmp_path)  # the backend runs in the source root; tmp_path has no PKG-INFO
    monkeypatch.delenv("DDTREE_CUDA", raising=False)
    return module


def fake_torch(monkeypatch, provider, dist_version: str, cuda: str | None, nvcc: bool):
    monkeypatch.setattr(provider.metadata, "version", lambda name: {"torch": dist_version}[name])
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(provider, "_nvcc_present", lambda: nvcc)


@pytest.mark.parametrize("dist_version, cuda, nvcc, env, label", [
    ("2.14.1", "13.0", True, None, "pt2141cu130"),
    ("2.14.1", "13.0", True, "OFF", "pt2141cu130.cpuonly"),
    ("2.14.1", "13.0", False, None, "pt2141cu130.cpuonly"),
    ("2.13.0+cpu", None, True, None, "pt2130cpu"),
    ("2.4.0", "12.1", True, "1", "pt240cu121"),
])
def test_wheel_label_and_pin(monkeypatch, provider, dist_version, cuda, nvcc, env, label):
    fake_torch(monkeypatch, provider, dist_version, cuda, nvcc)
    if env is not None:
        monkeypatch.setenv("DDTREE_CUDA", env)
    provider.build_state("wheel")
    out = provider.dynamic_metadata(SETTINGS, {})
    assert out["version"] == f"0.1.0+{label}"
    # The exact distribution version, local label included: 2.13.0+cpu must not resolve to PyPI's CUDA 2.13.0.
    assert out["dependencies"] == [f"torch=={dist_version}", "numpy", "tqdm"]


def test_sdist_keeps_the_loose_range(monkeypatch, provider):
    fake_torch(monkeypatch, provider, "2.14.1", "13.0", True)
    provider.build_state("sdist")
    assert provider.dynamic_metadata(SETTINGS, {}) == {"version": "0.1.0", "dependencies": ["torch>=2.4", "numpy", "tqdm"]}
    assert provider.dynamic_wheel(SETTINGS) == {"dependencies": True}  # never the version (the standard forbids it)


def test_wheel_from_an_unpacked_sdist_keeps_its_version_but_pins_torch(monkeypatch, provider, tmp_path):
    fake_torch(monkeypatch, provider, "2.14.1", "13.0", True)
    (tmp_path / "PKG-INFO").write_text("Metadata-Version: 2.2\nName: ddtree\nVersion: 0.1.0\n")
    provider.build_state("wheel")
    assert provider.dynamic_metadata(SETTINGS, {}) == {"version": "0.1.0", "dependencies": ["torch==2.14.1", "numpy", "tqdm"]}


def test_pyproject_feeds_the_provider():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(cfg["project"]["dynamic"]) == {"version", "dependencies"}
    assert "version" not in cfg["project"] and "dependencies" not in cfg["project"]
    (entry,) = cfg["tool"]["dynamic-metadata"]
    assert entry["provider"] == {"path": "buildsys", "module": "ddtree_wheel_metadata"}
    assert entry["torch"].startswith(">=") and not any(d.startswith("torch") for d in entry["dependencies"])


def installed_from_wheel() -> metadata.Distribution | None:
    """The ddtree distribution this test imports, when it was installed (not a source tree on PYTHONPATH)."""
    import ddtree

    try:
        dist = metadata.distribution("ddtree")
    except metadata.PackageNotFoundError:
        return None
    files = [Path(dist.locate_file(f)).resolve() for f in dist.files or [] if f.name == "__init__.py"]
    return dist if Path(ddtree.__file__).resolve() in files else None


def test_installed_wheel_pins_the_torch_it_runs_under():
    dist = installed_from_wheel()
    if dist is None:
        pytest.skip("ddtree is imported from a source tree, not an installed wheel")
    import ddtree

    info = ddtree.info()
    torch_dist = metadata.version("torch")
    assert f"torch=={torch_dist}" in [r.split(";")[0].replace(" ", "") for r in dist.requires]
    version = dist.version
    assert ddtree.__version__ == version  # the extension reports the wheel's own version
    public, _, label = version.partition("+")
    digits = "".join(torch_dist.split("+")[0].split(".")[:3])
    if torch.version.cuda:
        assert label == f"pt{digits}cu{torch.version.cuda.replace('.', '')}" + ("" if info["cuda_kernels"] else ".cpuonly")
    else:
        assert label == f"pt{digits}cpu" and not info["cuda_kernels"]


def test_source_tree_without_extension_says_so(tmp_path):
    src = tmp_path / "python" / "ddtree"
    src.mkdir(parents=True)
    for f in (ROOT / "python" / "ddtree").glob("*.py"):
        if f.name != "_build_info.py":
            (src / f.name).write_text(f.read_text())
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "python"))
    r = subprocess.run([sys.executable, "-c", "import ddtree"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "source tree without its compiled extension" in last and str(src) in last, r.stderr
    assert "circular import" not in r.stderr and "rebuild ddtree against this torch" not in r.stderr


def test_benchmarks_use_the_checkout_only_when_built(tmp_path, monkeypatch):
    checkout = load(ROOT / "bench" / "checkout.py", "bench_checkout_under_test")
    root = tmp_path / "python"
    (root / "ddtree").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert not checkout.use_checkout_if_built(root) and str(root) not in sys.path
    (root / "ddtree" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert checkout.use_checkout_if_built(root) and sys.path[0] == str(root)
