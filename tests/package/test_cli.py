#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The tools' command lines, without a GPU: a mistyped option, a malformed
value or an impossible combination is an error that names the problem,
prints the usage and exits 2, before the tool touches CUDA (on a machine
without a GPU a tool that got further would exit 77); --help prints the usage
and exits 0.

    test_cli.py BUILD_ROOT SOURCE_ROOT"""

import os
import subprocess
import sys
import unittest

BUILD, ROOT = sys.argv[1:3] if len(sys.argv) == 3 else (None, None)
USAGE_EXIT = 2


def run(program, *args):
    path = program if os.sep in program else os.path.join(BUILD, program)
    cmd = [sys.executable, path] if path.endswith(".py") else [path]
    r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


class Cli(unittest.TestCase):
    def assert_rejected(self, program, args, message):
        rc, out, err = run(program, *args)
        with self.subTest(program=program, args=args):
            self.assertEqual(rc, USAGE_EXIT, "%s %s: exit %d\nstdout: %s\nstderr: %s" % (program, args, rc, out, err))
            self.assertIn(message, err)
            self.assertIn("usage:", err)
            self.assertEqual(out, "", "nothing on stdout for a usage error")

    def test_bench_rejects(self):
        for args, message in [
            (["--tokns", "4096"], "unknown option '--tokns' (did you mean --tokens?)"),
            (["--tok", "4096"], "unknown option '--tok' (did you mean --tokens?)"),  # no abbreviations
            (["--tokens", "abc"], "--tokens 'abc': expected an integer in [1, "),
            (["--tokens", "12abc"], "--tokens '12abc'"),
            (["--tokens", " 12"], "--tokens ' 12'"),
            (["--tokens", "0"], "--tokens '0'"),
            (["--tokens", "99999999999999999999"], "expected an integer"),
            (["--tokens"], "--tokens needs a value"),
            (["--dispatch", "fp16"], "--dispatch 'fp16': expected one of fp8, bf16, cast"),
            (["--mode", "fast"], "--mode 'fast': expected one of normal, ll"),
            (["--scales", "e8m0", "--mode", "ll"], "--scales 'e8m0'"),
            (["--mode", "ll", "--gpus", "8"], "--mode ll runs virtual ranks on one GPU"),
            (["--gpus", "2", "--nodes", "2"], "--nodes splits virtual ranks"),
            (["--gpus", "2", "--ranks", "4"], "one rank per GPU"),
            (["--nodes", "3"], "--nodes 3 does not divide the 8 ranks"),
            (["--experts", "100"], "--experts 100 is not a multiple of the 8 ranks"),
            (["--topk", "9", "--experts", "8"], "a token picks distinct experts"),
            (["--hidden", "100"], "multiple of 8"),
            (["--hidden", "1000"], "FP8 needs a multiple of 128"),
            (["--scales", "pow2"], "--scales is for --mode ll"),
            (["--mode", "ll", "--tokens", "5000"], "--mode ll takes at most"),
            (["--sweep", "--tokens", "64"], "--sweep runs its own token counts"),
            (["--procs", "8", "--sweep"], "--procs runs one token count"),
            (["--procs", "8", "--mode", "ll"], "--procs measures normal mode"),
            (["--procs", "4", "--ranks", "8"], "one rank per process"),
            (["--procs", "8", "--mps", "on"], "--mps 'on': expected one of auto, off"),
            (["--sweep", "1,2"], "an optional value attaches with '=': --sweep=1,2"),
            (["--sweep=1,,2"], "--sweep '1,,2'"),
            (["--json=yes"], "--json takes no value"),
            (["-t", "5"], "unknown option '-t'"),
            (["extra"], "unexpected argument 'extra'"),
            (["--seed", "-1"], "--seed '-1'"),
        ]:
            self.assert_rejected("nccl-moe-bench", args, message)

    def test_netbench_rejects(self):
        for args, message in [
            (["--window", "0"], "--window '0': expected an integer in [1, 32]"),
            (["--min", "1X"], "--min '1X': expected a byte count"),
            (["--min", "2K", "--max", "1K"], "--max 1024 is below --min 2048"),
            (["--max", "2G"], "--max '2G'"),
            (["--plugin"], "--plugin needs a value"),
            (["--windows", "4"], "did you mean --window?"),
        ]:
            self.assert_rejected("nccl-moe-netbench", args, message)

    def test_netcheck_rejects(self):
        for args, message in [(["--plugin"], "--plugin needs a value"), (["--jsn"], "did you mean --json?"),
                              (["libnccl-net-moe.so"], "unexpected argument")]:
            self.assert_rejected("nccl-moe-netcheck", args, message)

    def test_python_benchmark_rejects(self):
        # argparse: its own wording; the script imports torch only after.
        script = os.path.join(ROOT, "python", "benchmarks", "bench_vs_torch.py")
        for args, message in [(["--tokns", "4096"], "unrecognized arguments: --tokns"),
                              (["--tok", "4096"], "unrecognized arguments: --tok"),
                              (["--tokens", "abc"], "'abc' is not an integer"),
                              (["--virtual", "3"], "not a multiple of the 3 virtual ranks")]:
            self.assert_rejected(script, args, message)

    def test_help(self):
        for program in ("nccl-moe-bench", "nccl-moe-netbench", "nccl-moe-netcheck"):
            rc, out, err = run(program, "--help")
            self.assertEqual(rc, 0, err)
            self.assertTrue(out.startswith("usage: " + program), out)
        rc, out, _ = run("nccl-moe-bench", "--help")
        for option in ("--sweep", "--json", "--mode", "--gpus"):
            self.assertIn(option, out)


if __name__ == "__main__":
    if BUILD is None:
        sys.exit(__doc__)
    unittest.main(argv=sys.argv[:1], verbosity=2)
