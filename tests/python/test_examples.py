# SPDX-License-Identifier: Apache-2.0
"""The example MoE layer and the benchmark run and agree with their own
references, on one GPU: with virtual ranks, and through a one-process
torchrun group (the process-group path of Buffer on a single-GPU machine)."""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import launch  # noqa: E402


@pytest.mark.parametrize("args", [
    ["--virtual", 4],
    ["--virtual", 8, "--fp8"],
    ["--virtual", 3, "--experts", 24, "--capacity", 384],
], ids=["virtual4", "virtual8_fp8", "virtual3_capacity"])
def test_example_virtual(args, seed):
    out = launch.python(launch.EXAMPLE, *args, "--seed", seed)
    assert "match the dense reference" in out


def test_example_one_process_group(seed):
    out = launch.torchrun(1, launch.EXAMPLE, "--seed", seed)
    assert "rank 0: MoE layer output and gradients match the dense reference" in out


def test_worker_one_process_group(seed):
    out = launch.torchrun(1, launch.WORKER, "--seed", seed)
    assert "rank 0: PASS" in out


@pytest.mark.parametrize("args", [["--virtual", 4, "--quick"], ["--virtual", 2, "--quick", "--fp8"]],
                         ids=["bf16", "fp8"])
def test_benchmark_virtual_smoke(args):
    out = launch.python(launch.BENCH, *args)
    assert "RESULT dispatch_ratio=" in out and "ratio torch/ours" in out
