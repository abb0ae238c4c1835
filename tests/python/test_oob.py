# SPDX-License-Identifier: Apache-2.0
"""Buffer over process groups without an NCCL communicator, on one GPU: a
gloo group of two and of four processes all on GPU 0 (the out-of-band
bootstrap, ncclMoeCommInitOob through all_gather_object on the group, and
CUDA IPC between the processes; without MPS their kernels take turns on the
GPU, so this is slow but must pass), and Buffer.from_nccl_comm over the raw
ncclComm_t of a one-process NCCL group. The worker checks every output
against the torch reference (tests/python/mp_worker.py)."""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

import launch  # noqa: E402


@pytest.mark.parametrize("nproc", [2, 4])
def test_gloo_group_processes_on_one_gpu(nproc, seed):
    out = launch.torchrun(nproc, launch.WORKER, "--seed", seed, "--backend", "gloo", "--same-gpu")
    assert out.count(": PASS") == nproc


def test_raw_nccl_comm(seed):
    out = launch.torchrun(1, launch.WORKER, "--seed", seed, "--raw-comm")
    assert "rank 0: PASS" in out
