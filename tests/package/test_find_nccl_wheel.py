#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""scripts/find_nccl_wheel.py, which Meson runs to find NCCL's headers in
PyTorch's NCCL wheel: it prints site-packages/nvidia/nccl when that holds
include/nccl.h, and nothing (exit 0) without an nvidia package, with an
nvidia package lacking nccl, or with nccl lacking its header.

    test_find_nccl_wheel.py SOURCE_ROOT"""

import os
import subprocess
import sys
import tempfile


def run(script, path):
    env = dict(os.environ, PYTHONPATH=path, PYTHONNOUSERSITE="1")
    r = subprocess.run([sys.executable, "-S", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    script = os.path.join(sys.argv[1], "scripts", "find_nccl_wheel.py")
    with tempfile.TemporaryDirectory() as d:
        empty, bare, headerless, wheel = (os.path.join(d, n) for n in ("empty", "bare", "headerless", "wheel"))
        os.makedirs(empty)
        os.makedirs(os.path.join(bare, "nvidia", "cublas"))        # nvidia namespace, no nccl
        os.makedirs(os.path.join(headerless, "nvidia", "nccl", "lib"))
        os.makedirs(os.path.join(wheel, "nvidia", "nccl", "include"))
        open(os.path.join(wheel, "nvidia", "nccl", "include", "nccl.h"), "w").close()
        assert run(script, empty) == ""
        assert run(script, bare) == ""
        assert run(script, headerless) == ""
        assert run(script, wheel) == os.path.join(wheel, "nvidia", "nccl")
    print("PASS")


if __name__ == "__main__":
    main()
