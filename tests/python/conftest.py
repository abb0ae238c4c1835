# SPDX-License-Identifier: Apache-2.0
"""pytest set-up for the nccl_moe package tests: the package importable from
the source tree (or, with NCCL_MOE_TEST_INSTALLED=1, the installed one: what
pip install . put in the running Python), a seed per run (MOE_TEST_SEED, else
random; printed), skip markers for torch and GPUs, and, for hunting a hang,
MOE_TEST_STACKS_AFTER_S=N: a test still running after N seconds prints every
thread's Python stack to stderr (again every N seconds; the test goes on)."""

import faulthandler
import os
import random
import sys
import zlib

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
INSTALLED = os.environ.get("NCCL_MOE_TEST_INSTALLED", "") == "1"
if not INSTALLED and os.path.join(ROOT, "python") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "python"))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# Virtual ranks need these before anything starts CUDA (VirtualBuffer checks,
# and says so); the package itself never sets them. The tests' children
# (examples, benchmark) inherit them.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

import nccl_moe  # noqa: E402

if INSTALLED and os.path.abspath(nccl_moe.__file__).startswith(os.path.join(ROOT, "python") + os.sep):
    raise pytest.UsageError("NCCL_MOE_TEST_INSTALLED=1, but nccl_moe comes from the source tree (%s): run from "
                            "outside the checkout, without PYTHONPATH" % nccl_moe.__file__)

SEED = int(os.environ.get("MOE_TEST_SEED") or random.SystemRandom().randrange(1, 2**31))
STACKS_AFTER_S = float(os.environ.get("MOE_TEST_STACKS_AFTER_S") or 0)


@pytest.fixture(autouse=True)
def _stacks_when_slow(request):
    """MOE_TEST_STACKS_AFTER_S: where each thread of a slow test is."""
    if STACKS_AFTER_S <= 0:
        yield
        return
    sys.stderr.write("\n[%s: thread stacks every %g s while it runs]\n" % (request.node.nodeid, STACKS_AFTER_S))
    faulthandler.dump_traceback_later(STACKS_AFTER_S, repeat=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_report_header(config):
    try:
        lib = nccl_moe.library_path()
    except Exception as e:  # noqa: BLE001 - reported by test_bindings
        lib = "not loadable (%s)" % str(e).splitlines()[0]
    return ["nccl_moe tests: MOE_TEST_SEED=%d (set it to repeat this run)" % SEED,
            "package: %s%s" % (os.path.dirname(nccl_moe.__file__), " (installed)" if INSTALLED else ""),
            "library: %s" % lib]


@pytest.fixture
def seed(request):
    """This test's seed: the run's seed mixed with the test's name, printed
    (pytest shows it when the test fails)."""
    s = (SEED ^ zlib.crc32(request.node.nodeid.encode())) & 0x7FFFFFFF
    print("seed %d (MOE_TEST_SEED=%d)" % (s, SEED))
    return s
