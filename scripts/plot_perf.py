#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Draws nccl-moe-bench --json results against tokens per rank: bandwidth
(dispatch and combine, with the device copy of the same runs as the line to
compare with) and latency, one row of plots per mode (normal, ll).

    build/nccl-moe-bench --sweep --json > normal.jsonl
    build/nccl-moe-bench --mode ll --sweep --json > ll.jsonl
    scripts/plot_perf.py normal.jsonl ll.jsonl -o docs/perf.png

Reads JSON Lines (one object per result; '-' is stdin) and writes a PNG.
Needs matplotlib (Debian: apt install python3-matplotlib). Exit status: 0 ok,
1 unreadable input, 2 bad arguments or nothing to plot.
"""

import argparse
import json
import sys

BENCH = "nccl-moe-bench"
MODES = ("normal", "ll")
MODE_TITLES = {"normal": "normal mode", "ll": "low-latency mode"}


def read_results(paths):
    """The nccl-moe-bench objects of the files, in order; other lines (e.g.
    a netbench object) are skipped. Raises ValueError naming a bad line."""
    results = []
    for path in paths:
        f = sys.stdin if path == "-" else open(path)
        with f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError("%s:%d: not JSON (%s)" % (path, number, e)) from None
                if isinstance(obj, dict) and obj.get("tool") == BENCH:
                    results.append(obj)
    return results


def series(results, mode):
    """The mode's results sorted by tokens; a later result for the same token
    count replaces an earlier one."""
    by_tokens = {r["tokens"]: r for r in results if r.get("mode") == mode}
    return [by_tokens[t] for t in sorted(by_tokens)]


def describe(points):
    r = points[-1]
    where = "%s, %d %s ranks" % (r.get("device", "?"), r.get("ranks", 0),
                                 "process" if r.get("gpus", 1) > 1 else "virtual")
    if r.get("nodes", 1) > 1:
        where += " in %d nodes" % r["nodes"]
    shape = "hidden %s, top-%s of %s experts, %s dispatch" % (r.get("hidden"), r.get("topk"), r.get("experts"),
                                                              r.get("dispatch"))
    return where + "; " + shape


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if series(results, m)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 4.5 * len(modes)), squeeze=False)
    for row, mode in zip(axes, modes):
        points = series(results, mode)
        tokens = [p["tokens"] for p in points]
        bw, lat = row
        for op, style in (("dispatch", "o-"), ("combine", "s-")):
            bw.plot(tokens, [p.get(op + "_GBps") for p in points], style, label=op)
            lat.plot(tokens, [p.get(op + "_us") for p in points], style, label=op)
        bw.plot(tokens, [p.get("copy_GBps") for p in points], "k--", label="device copy (bytes once)")
        per = "GB/s per GPU" if points[-1].get("gpus", 1) > 1 else "GB/s (all ranks on the GPU)"
        for ax, ylabel in ((bw, per), (lat, "time per call (us)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(tokens)
            ax.set_xticklabels([str(t) for t in tokens])
            ax.minorticks_off()
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        lat.set_yscale("log")
        bw.set_ylim(bottom=0)
        bw.set_title("%s: bandwidth" % MODE_TITLES[mode])
        lat.set_title("%s: latency" % MODE_TITLES[mode])
        row[0].annotate(describe(points), (0, 1.12), xycoords="axes fraction", fontsize=8)
    version = results[-1].get("version", "?")
    fig.suptitle("nccl-moe %s: nccl-moe-bench --sweep" % version)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("inputs", nargs="+", metavar="FILE", help="nccl-moe-bench --json output ('-': stdin)")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="the picture to write")
    a = p.parse_args()
    try:
        results = read_results(a.inputs)
    except (OSError, ValueError) as e:
        print("plot_perf.py: %s" % e, file=sys.stderr)
        return 1
    if not any(series(results, m) for m in MODES):
        p.error("no %s --json results in %s" % (BENCH, ", ".join(a.inputs)))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_perf.py: needs matplotlib (Debian: apt install python3-matplotlib; pip install matplotlib)",
              file=sys.stderr)
        return 1
    plot(results, a.output)
    print("plot_perf.py: wrote %s (%s)" % (a.output, ", ".join("%s: %d points" % (m, len(series(results, m)))
                                                              for m in MODES if series(results, m))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
