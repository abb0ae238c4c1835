# SPDX-License-Identifier: Apache-2.0
"""Several GPUs, one process each (torchrun): the Buffer over a real
ProcessGroupNCCL communicator against the torch reference, the example MoE
layer, and the benchmark against all_to_all_single. Skips with fewer than 2
GPUs."""

import pytest

torch = pytest.importorskip("torch")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
if GPUS < 2:
    pytest.skip("needs 2 GPUs, found %d" % GPUS, allow_module_level=True)

import launch  # noqa: E402

SIZES = sorted({2, min(GPUS, 8)})


@pytest.mark.parametrize("nproc", SIZES)
def test_worker(nproc, seed):
    out = launch.torchrun(nproc, launch.WORKER, "--seed", seed)
    assert out.count(": PASS") == nproc


@pytest.mark.parametrize("mode", ["bf16", "fp8", "capacity"])
def test_example(mode, seed):
    n = min(GPUS, 8)
    extra = {"bf16": [], "fp8": ["--fp8"], "capacity": ["--capacity", 128 * n]}[mode]  # 128 tokens per rank
    out = launch.torchrun(n, launch.EXAMPLE, "--seed", seed, *extra)
    assert out.count("match the dense reference") == n


def test_benchmark_smoke():
    out = launch.torchrun(min(GPUS, 8), launch.BENCH, "--quick")
    assert "RESULT dispatch_ratio=" in out
