# SPDX-License-Identifier: Apache-2.0
"""Runs the package's scripts (examples, benchmark, torchrun workers) in
child processes for the tests, with the package and library of this tree."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EXAMPLE = os.path.join(ROOT, "examples", "moe_layer.py")
BENCH = os.path.join(ROOT, "python", "benchmarks", "bench_vs_torch.py")
WORKER = os.path.join(HERE, "mp_worker.py")


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run(args, timeout=900):
    """Runs a command; returns its output, failing the test (with the output)
    when it exits non-zero."""
    r = subprocess.run(args, capture_output=True, text=True, env=child_env(), timeout=timeout)
    out = r.stdout + r.stderr
    print(out)
    assert r.returncode == 0, "%s exited %d:\n%s" % (" ".join(args), r.returncode, out[-6000:])
    return out


def python(script, *args, timeout=900):
    return run([sys.executable, script] + [str(a) for a in args], timeout)


def torchrun(nproc, script, *args, timeout=900):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=%d" % nproc,
                script] + [str(a) for a in args], timeout)
