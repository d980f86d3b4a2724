"""Wheel metadata that says which torch a ddtree build needs (a scikit-build-core dynamic-metadata provider).

A compiled ddtree extension loads only under the exact torch it was compiled against (``import ddtree`` checks
and names both versions). So a *wheel* pins that torch and carries it in a local version label, the way torch
extensions label their builds, so that builds for different torches live side by side in one wheelhouse:

    ddtree 0.1.0+pt2141cu130          against torch 2.14.1 (CUDA 13.0), CUDA kernels compiled in
    ddtree 0.1.0+pt2141cu130.cpuonly  against torch 2.14.1 (CUDA 13.0), CPU kernels only (no nvcc, DDTREE_CUDA=OFF)
    ddtree 0.1.0+pt2130cpu            against torch 2.13.0+cpu (a CPU build of torch)

and requires ``torch==<that torch's distribution version>`` (``2.14.1``, or ``2.13.0+cpu``: pip then needs the
index that serves ``+cpu`` builds). The source distribution keeps the loose range (``torch>=2.4``): whoever
builds from it compiles against the torch they have. A wheel built from an unpacked sdist (which has PKG-INFO)
still pins its torch but keeps the sdist's version: pip refuses a wheel whose version differs from the sdist
file's name, and the standard forbids a version that changes between an sdist and its wheels.

Configured in pyproject.toml ([[tool.dynamic-metadata]]): ``version`` (the base version), ``dependencies`` (the
requirements other than torch) and ``torch`` (the sdist's torch range). CMakeLists.txt checks that the label's
"CUDA kernels or not" matches what it really builds, so the label cannot lie.
"""
from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

_state = "wheel"


def build_state(state: str) -> None:
    """scikit-build-core says which artefact it is building before it asks for the metadata."""
    global _state
    _state = state


def dynamic_wheel(settings: Mapping[str, Any]) -> dict[str, bool]:
    # A wheel's dependencies differ from the sdist's: marked Dynamic in the sdist's metadata.
    return {"dependencies": True}


def _off(value: str | None) -> bool:
    return (value or "").strip().upper() in ("0", "OFF", "NO", "FALSE", "N")


def _nvcc_present() -> bool:
    """The same search as CMakeLists.txt: $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc."""
    home = os.environ.get("CUDA_HOME")
    if home and Path(home, "bin", "nvcc").exists():
        return True
    return Path("/usr/local/cuda/bin/nvcc").exists()


def torch_build() -> tuple[str, str, bool]:
    """(torch's distribution version, local label, CUDA kernels compiled) for the torch this build compiles against."""
    import torch  # the build runs without isolation: the torch installed is the one compiled against

    dist_version = metadata.version("torch")  # "2.14.1" on PyPI (its __version__ says +cu130), or "2.13.0+cpu"
    public = dist_version.split("+")[0]
    digits = "".join(public.split(".")[:3])
    cuda = torch.version.cuda
    if cuda:
        with_kernels = not _off(os.environ.get("DDTREE_CUDA")) and _nvcc_present()
        label = f"pt{digits}cu{cuda.replace('.', '')}" + ("" if with_kernels else ".cpuonly")
    else:
        with_kernels = False
        label = f"pt{digits}cpu"
    return dist_version, label, with_kernels


def dynamic_metadata(settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, Any]:
    base, deps, loose = settings["version"], list(settings["dependencies"]), settings["torch"]
    if _state == "sdist":
        return {"version": base, "dependencies": [f"torch{loose}", *deps]}
    dist_version, label, _ = torch_build()
    from_sdist = Path("PKG-INFO").exists()  # the backend runs in the source tree's root
    version = base if from_sdist else f"{base}+{label}"
    return {"version": version, "dependencies": [f"torch=={dist_version}", *deps]}


if __name__ == "__main__":  # what a build here would say: python buildsys/ddtree_wheel_metadata.py
    v, lab, k = torch_build()
    print(f"torch=={v}  label +{lab}  cuda_kernels={k}  ({shutil.which('nvcc') or 'nvcc not on PATH'})")
