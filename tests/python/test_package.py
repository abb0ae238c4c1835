"""The package as users get it, without torch or a GPU: importing it changes
nothing in the process; an installed package (the layout pip install .
produces: the library inside the package, _build_version.py beside it) finds
its own library and version; NCCL_MOE_LIBRARY overrides, alone; the
version is one number everywhere."""

import os
import shutil
import subprocess
import sys

import pytest

import nccl_moe
from nccl_moe import _lib, _version

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.dirname(os.path.abspath(nccl_moe.__file__))

# Imports the package and reports what changed in the process.
PROBE = r"""
import os, sys
before = dict(os.environ)
import nccl_moe
after = dict(os.environ)
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
assert not changed, "import nccl_moe changed the environment: %s" % changed
assert nccl_moe._lib._library is None, "import nccl_moe loaded the library"
if "torch" in sys.modules:
    assert not sys.modules["torch"].cuda.is_initialized(), "import nccl_moe initialized CUDA"
print("clean")
"""


def _child(code, env_changes, cwd=None, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    env["PYTHONPATH"] = pythonpath if pythonpath is not None else os.path.join(ROOT, "python")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd)


def test_import_has_no_side_effects():
    r = _child(PROBE, {"CUDA_DEVICE_MAX_CONNECTIONS": None, "CUDA_MODULE_LOADING": None})
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def test_search_order_without_override(monkeypatch):
    monkeypatch.delenv(_lib.LIBRARY_ENV, raising=False)
    where = _lib.library_candidates()
    assert where[0] == ("inside the package", os.path.join(PACKAGE, _lib.LIBRARY_NAME))
    assert where[-1] == ("the loader path", _lib.LIBRARY_NAME)
    assert ("the source tree's build/", os.path.join(ROOT, "build", _lib.LIBRARY_NAME)) in where


def test_override_is_the_only_candidate(monkeypatch, tmp_path):
    monkeypatch.setenv(_lib.LIBRARY_ENV, str(tmp_path))  # a folder: the library in it
    assert _lib.library_candidates() == [("%s=%s" % (_lib.LIBRARY_ENV, tmp_path),
                                          str(tmp_path / _lib.LIBRARY_NAME))]
    lib = tmp_path / "lib.so"
    monkeypatch.setenv(_lib.LIBRARY_ENV, str(lib))
    assert [p for _, p in _lib.library_candidates()] == [str(lib)]


def _built_library():
    path = os.environ.get(_lib.LIBRARY_ENV) or os.path.join(ROOT, "build", _lib.LIBRARY_NAME)
    if not os.path.isfile(path):
        pytest.skip("no built %s (run through meson test, or build build/)" % _lib.LIBRARY_NAME)
    return path


def test_installed_layout_finds_its_own_library(tmp_path):
    # What the wheel holds: the sources, the library, _build_version.py.
    site = tmp_path / "site-packages"
    shutil.copytree(PACKAGE, site / "nccl_moe", ignore=shutil.ignore_patterns("__pycache__", "*.in", "*.so"))
    shutil.copy(_built_library(), site / "nccl_moe" / _lib.LIBRARY_NAME)
    (site / "nccl_moe" / "_build_version.py").write_text('VERSION = "%s"\n' % nccl_moe.__version__)
    code = "import nccl_moe; print(nccl_moe.get_library().path); print(nccl_moe.__version__)"
    r = _child(code, {_lib.LIBRARY_ENV: None}, cwd=str(tmp_path), pythonpath=str(site))
    assert r.returncode == 0, r.stderr
    path, version = r.stdout.split()
    assert path == str(site / "nccl_moe" / _lib.LIBRARY_NAME)
    assert version == nccl_moe.__version__
    # An explicit override still wins, and fails loudly when wrong.
    r = _child(code, {_lib.LIBRARY_ENV: str(tmp_path / "missing.so")}, cwd=str(tmp_path), pythonpath=str(site))
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_one_version():
    lib = _lib.get_library()
    assert nccl_moe.__version__ == _version.source_version(os.path.join(ROOT, "meson.build"))
    assert lib.version == _version.VERSION_TUPLE == (_lib.NCCL_MOE_MAJOR, _lib.NCCL_MOE_MINOR, _lib.NCCL_MOE_PATCH)
