#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""One version everywhere. meson.build's project(version:) is the only place
it is written; this checks that the generated header, the built library
(ncclMoeGetVersion), the Python package of the checkout, pyproject.toml (which
takes it from Meson) and the wheel's module list agree with it, and that no
source file writes the version out again.

    test_version.py MESON_VERSION BUILD_ROOT SOURCE_ROOT [--no-library]

--no-library skips loading the library (a sanitizer build cannot be loaded
into an uninstrumented Python; test_env_log checks ncclMoeGetVersion there).
Needs only the Python standard library (no torch, no GPU)."""

import ctypes
import importlib.util
import os
import re
import sys
import unittest

VERSION, BUILD, ROOT = sys.argv[1:4] if len(sys.argv) in (4, 5) else (None, None, None)
LOAD_LIBRARY = sys.argv[4:] != ["--no-library"]


def read(*path):
    with open(os.path.join(*path), errors="replace") as f:
        return f.read()


def load_version_module():
    """python/nccl_moe/_version.py on its own (importing the package would
    import torch where it is installed)."""
    path = os.path.join(ROOT, "python", "nccl_moe", "_version.py")
    spec = importlib.util.spec_from_file_location("nccl_moe_version_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code(version):
    major, minor, patch = (int(p) for p in version.split(".")[:3])
    return major * 10000 + minor * 100 + patch


class Version(unittest.TestCase):
    def test_generated_header(self):
        text = read(BUILD, "include", "nccl_moe_version.h")
        defines = dict(re.findall(r"#define (NCCL_MOE_\w+) (\S+)", text))
        major, minor, patch = VERSION.split(".")[:3]
        self.assertEqual((defines["NCCL_MOE_MAJOR"], defines["NCCL_MOE_MINOR"], defines["NCCL_MOE_PATCH"]),
                         (major, minor, patch))
        self.assertEqual(defines["NCCL_MOE_VERSION_STRING"], '"%s"' % VERSION)

    def test_public_header_takes_the_generated_one(self):
        text = read(ROOT, "include", "nccl_moe.h")
        self.assertIn('#include "nccl_moe_version.h"', text)
        self.assertNotRegex(text, r"#define NCCL_MOE_(MAJOR|MINOR|PATCH) ")

    @unittest.skipUnless(LOAD_LIBRARY, "sanitizer build")
    def test_library_reports_it(self):
        lib = ctypes.CDLL(os.path.join(BUILD, "libnccl-net-moe.so"))
        v = ctypes.c_int(0)
        self.assertEqual(lib.ncclMoeGetVersion(ctypes.byref(v)), 0)
        self.assertEqual(v.value, code(VERSION))

    def test_python_package_of_the_checkout(self):
        mod = load_version_module()
        self.assertEqual(mod.source_version(os.path.join(ROOT, "meson.build")), VERSION)
        self.assertEqual(mod.VERSION, VERSION)  # no _build_version.py in the source tree
        self.assertEqual(mod.VERSION_TUPLE, tuple(int(p) for p in VERSION.split(".")[:3]))

    def test_pyproject_takes_it_from_meson(self):
        text = read(ROOT, "pyproject.toml")
        self.assertRegex(text, r'(?m)^dynamic = \["version"\]')
        self.assertNotRegex(text, r"(?m)^version\s*=")
        self.assertRegex(text, r'build-backend = "mesonpy"')

    def test_torch_bound_agrees(self):
        text = read(ROOT, "pyproject.toml")
        bound = re.search(r'torch = \["torch>=([0-9.]+)"\]', text)
        self.assertIsNotNone(bound, "pyproject.toml has no torch extra")
        self.assertEqual(bound.group(1), load_version_module().TORCH_MIN_VERSION)

    def test_wheel_lists_every_module(self):
        # python/meson.build names the modules the wheel installs: a module
        # missing there would be missing from pip install . alone.
        listed = set(re.findall(r"'nccl_moe/(\w+\.py)'", read(ROOT, "python", "meson.build")))
        present = {f for f in os.listdir(os.path.join(ROOT, "python", "nccl_moe")) if f.endswith(".py")}
        self.assertEqual(present - listed, set(), "modules python/meson.build does not install")
        self.assertEqual(listed - present, set(), "python/meson.build names modules that do not exist")

    def test_written_nowhere_else(self):
        # Source files only: the changelog and docs may name versions.
        literal = re.compile(r"""["']%s["']|\b%s\b""" % (re.escape(VERSION), re.escape(VERSION.replace(".", ", "))))
        offenders = []
        for top in ("include", "common", "core", "plugin", "transport", "net_socket", "net_ib", "kernels", "python",
                    "tools", "scripts", "examples"):
            for folder, _, files in os.walk(os.path.join(ROOT, top)):
                for f in files:
                    if f.endswith((".c", ".h", ".cu", ".cuh", ".py", ".in", ".toml", ".build")):
                        path = os.path.join(folder, f)
                        if literal.search(read(path)):
                            offenders.append(os.path.relpath(path, ROOT))
        if literal.search(read(ROOT, "pyproject.toml")):
            offenders.append("pyproject.toml")
        self.assertEqual(offenders, [], "the version is written here too; take it from meson.build instead")


if __name__ == "__main__":
    if VERSION is None:
        sys.exit(__doc__)
    unittest.main(argv=sys.argv[:1], verbosity=2)
