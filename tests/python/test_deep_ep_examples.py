# SPDX-License-Identifier: Apache-2.0
"""The nccl_moe.deep_ep examples run and pass their own checks on one GPU:
the low-latency decode step captured in a CUDA graph (virtual ranks, and a
one-process torchrun group), and the DeepEP-style script (unchanged DeepEP
code but for the import) through a one-process torchrun group, which also
covers Buffer's lazy communicator and its rebuild for low latency."""

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import launch  # noqa: E402

DECODE = os.path.join(launch.ROOT, "examples", "deep_ep_decode.py")
STYLE = os.path.join(launch.ROOT, "examples", "deepep_style.py")


@pytest.mark.parametrize("ranks", [2, 4])
def test_decode_graph_virtual(ranks, seed):
    out = launch.python(DECODE, "--virtual", ranks, "--seed", seed)
    assert "decode step graph matches the dense reference on every rank" in out


def test_decode_graph_one_process_group(seed):
    out = launch.torchrun(1, DECODE, "--seed", seed)
    assert "decode step graph matches the dense reference on every rank" in out


def test_deepep_style_script_one_process_group():
    out = launch.torchrun(1, STYLE)
    assert "rank 0: DeepEP-style normal and low-latency steps OK on nccl-moe" in out
