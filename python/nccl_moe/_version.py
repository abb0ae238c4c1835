# SPDX-License-Identifier: Apache-2.0
"""The package's version. It is written in one place, project(version:) in
the repository's meson.build: an installed package (pip install .) carries it
in _build_version.py, which Meson generates; a source checkout
(PYTHONPATH=python) reads it from meson.build itself. The C header
(NCCL_MOE_VERSION_STRING), the library (ncclMoeGetVersion) and the wheel's
metadata come from the same line."""

import os
import re

_PROJECT_VERSION = re.compile(r"project\s*\([^)]*?\bversion\s*:\s*'([^']+)'", re.S)


def source_version(meson_build: str) -> str:
    """The version in project() of the meson.build at this path."""
    with open(meson_build) as f:
        m = _PROJECT_VERSION.search(f.read())
    if m is None:
        raise RuntimeError("no project(version: '...') in %s" % meson_build)
    return m.group(1)


def _find_version() -> str:
    try:
        from ._build_version import VERSION
        return VERSION
    except ImportError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    meson_build = os.path.join(root, "meson.build")
    if not os.path.isfile(meson_build):
        raise ImportError("nccl_moe has neither _build_version.py (an installed package) nor a meson.build two "
                          "folders up (a source checkout): install it with pip install . from the repository")
    return source_version(meson_build)


VERSION = _find_version()
VERSION_TUPLE = tuple(int(p) for p in VERSION.split(".")[:3])

# The PyTorch releases Buffer works with: ProcessGroupNCCL exposes its
# communicator (_comm_ptr()) from 2.8 on. Tested: 2.11. pyproject.toml's
# "torch" extra states the same lower bound (a test compares them).
TORCH_MIN_VERSION = "2.8"
TORCH_TESTED_VERSIONS = "2.11"
