#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Prints the prefix of PyTorch's NCCL wheel (nvidia-nccl-cu12 / -cu13:
site-packages/nvidia/nccl, holding include/nccl.h) for this Python, or
nothing. Meson runs it to find NCCL's headers when no other NCCL is
installed."""

import importlib.util
import os

try:
    spec = importlib.util.find_spec("nvidia.nccl")
except (ImportError, ValueError):  # no "nvidia" namespace package at all
    spec = None
for path in (spec.submodule_search_locations or []) if spec is not None else []:
    if os.path.isfile(os.path.join(path, "include", "nccl.h")):
        print(path)
        break
