#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""scripts/plot_perf.py on made-up nccl-moe-bench --json lines (both modes,
a repeated token count, a foreign line): it writes a PNG; it rejects input
without bench results (exit 2) and malformed JSON (exit 1, naming the line).
Skips (77) without matplotlib.

    test_plot_perf.py SOURCE_ROOT"""

import json
import os
import subprocess
import sys
import tempfile

SKIP = 77


def bench_line(mode, tokens, gbps):
    return json.dumps({"tool": "nccl-moe-bench", "version": "x", "mode": mode, "device": "test GPU", "gpus": 1,
                       "ranks": 8, "nodes": 1, "tokens": tokens, "hidden": 7168, "topk": 8, "experts": 256,
                       "dispatch": "fp8", "dispatch_us": 10.0 + tokens, "dispatch_GBps": gbps,
                       "combine_us": 12.0 + tokens, "combine_GBps": gbps * 0.8, "copy_GBps": 3000.0})


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("SKIP: no matplotlib for %s" % sys.executable)
        return SKIP
    script = os.path.join(sys.argv[1], "scripts", "plot_perf.py")
    with tempfile.TemporaryDirectory() as d:
        good = os.path.join(d, "sweep.jsonl")
        with open(good, "w") as f:
            for t in (128, 256, 512):
                f.write(bench_line("normal", t, t * 2.0) + "\n")
            f.write(bench_line("normal", 256, 999.0) + "\n")  # a later run of 256 tokens wins
            f.write(json.dumps({"tool": "nccl-moe-netbench", "bytes": 8}) + "\n\n")
            for t in (1, 2, 4):
                f.write(bench_line("ll", t, t * 10.0) + "\n")
        png = os.path.join(d, "perf.png")
        r = subprocess.run([sys.executable, script, good, "-o", png], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "normal: 3 points, ll: 3 points" in r.stdout, r.stdout
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", "not a PNG"

        empty = os.path.join(d, "empty.jsonl")
        with open(empty, "w") as f:
            f.write(json.dumps({"tool": "nccl-moe-netbench", "bytes": 8}) + "\n")
        r = subprocess.run([sys.executable, script, empty, "-o", png], capture_output=True, text=True)
        assert r.returncode == 2 and "no nccl-moe-bench --json results" in r.stderr, r.stderr

        broken = os.path.join(d, "broken.jsonl")
        with open(broken, "w") as f:
            f.write(bench_line("normal", 128, 1.0) + "\n{not json\n")
        r = subprocess.run([sys.executable, script, broken, "-o", png], capture_output=True, text=True)
        assert r.returncode == 1 and "broken.jsonl:2: not JSON" in r.stderr, r.stderr
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
