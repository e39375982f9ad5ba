"""The Rust runtime of two builds, timed against each other on one bundle (issue #12: "speed unchanged").

``python benches/bench_before_after.py BEFORE/python AFTER/python [--rounds 7] [--out DIR]``: each
folder is a ``python/`` source tree holding its own built extension (``bayeslora/_core.abi3.so``).
The MiniLM-L6-shape bundle of ``bench_runtime.py`` (random weights, gate adapters of rank 8 on
query/value) is exported once with the AFTER tree; then only the runtime is timed (``Scorer.score``
on token ids, sequence 64, one thread; batch 1 and 8, S = 0 and 16), each build in a subprocess of
its own that imports nothing but its tree's ``bayeslora.runtime`` and numpy. The builds alternate,
ABBA by round, so that both see the same load on a shared machine. Each subprocess reports, per
case, the best-of-N wall and process-CPU time of a call; the script prints, per build and case, the
median over rounds of inputs/s and the ratio AFTER / BEFORE, and checks that both builds give the
same mean-mode probabilities. ``--out DIR`` keeps the raw per-round JSON lines and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCHES = Path(__file__).resolve().parent
SEQ, VOCAB = 64, 30522
CASES = [(batch, samples) for batch in (1, 8) for samples in (0, 16)]

# Runs in a child with PYTHONPATH=<tree>: the runtime only (no torch), one thread.
_TIMER = """
import json, sys, time
import numpy as np
import bayeslora
from bayeslora.runtime import Scorer

bundle, ids_file, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
min_time, min_reps = float(sys.argv[4]), int(sys.argv[5])
ids = np.load(ids_file)
scorer = Scorer(bundle, num_threads=1)
out = {"module": bayeslora.__file__, "cases": []}
for batch, samples in cases:
    x = (ids[:batch], np.ones_like(ids[:batch]))
    first = scorer.score(x, samples=samples, seed=0)  # warm-up
    walls, cpus = [], []
    start = time.perf_counter()
    while len(walls) < min_reps or time.perf_counter() - start < min_time:
        t0, c0 = time.perf_counter(), time.process_time()
        scorer.score(x, samples=samples, seed=0)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    out["cases"].append({"batch": batch, "samples": samples, "reps": len(walls), "wall": min(walls),
                         "cpu": min(cpus), "probs": first["probs"].tolist()})
print(json.dumps(out))
"""

# Runs in a child with PYTHONPATH=<after tree>:benches: the bundle bench_runtime.py times.
_EXPORT = """
import sys
import bayeslora as bl
from bench_runtime import build_model
bl.export(build_model(), None, sys.argv[1])
"""


def _env(tree: Path, *extra: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (tree, *extra)))
    env.update(OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    return env


def _child(code: str, args: list[str], env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"child failed ({res.returncode}):\n{res.stderr}")
    return res.stdout


def token_ids(batch: int = 8, seed: int = 0) -> np.ndarray:
    """``[batch, SEQ]`` int64 token ids: random word pieces between [CLS] and [SEP]."""
    ids = np.random.default_rng(seed).integers(1000, VOCAB, (batch, SEQ), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="python/ folder of the build before")
    parser.add_argument("after", type=Path, help="python/ folder of the build after")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; each times both builds once")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per case and subprocess")
    parser.add_argument("--min-reps", type=int, default=3, help="calls per case and subprocess, at least")
    parser.add_argument("--out", type=Path, default=None, help="folder for raw.jsonl and table.md")
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for tree in trees.values():
        if not (tree / "bayeslora" / "_core.abi3.so").is_file():
            raise SystemExit(f"{tree}: no bayeslora/_core.abi3.so (build the extension first)")
    load_before = os.getloadavg()[0]
    raw: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle, ids_file = Path(tmp) / "minilm-shape", Path(tmp) / "ids.npy"
        _child(_EXPORT, [str(bundle)], _env(trees["after"], BENCHES))
        np.save(ids_file, token_ids())
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for name in order:
                cmd = [str(bundle), str(ids_file), json.dumps(CASES), str(args.min_time), str(args.min_reps)]
                record = json.loads(_child(_TIMER, cmd, _env(trees[name])))
                if not record["module"].startswith(str(trees[name])):
                    raise SystemExit(f"{name}: imported {record['module']}, not from {trees[name]}")
                record.update(round=r, build=name, tree=str(trees[name]), load=os.getloadavg()[0])
                raw.append(record)
                print(
                    f"round {r} {name:6s}: "
                    + ", ".join(
                        f"b{c['batch']} S{c['samples']} {c['batch'] / c['wall']:.2f}/s"
                        for c in record["cases"]
                    ),
                    flush=True,
                )
    load_after = os.getloadavg()[0]
    for i, case in enumerate(CASES):
        if case[1] == 0:  # mean mode: the same numbers from both builds, up to float summation order
            a, b = (np.asarray(next(x for x in raw if x["build"] == n)["cases"][i]["probs"]) for n in trees)
            if not np.allclose(a, b, atol=1e-5):
                raise SystemExit(
                    f"the builds disagree on batch {case[0]}: max |Δp| {np.abs(a - b).max():.2e}"
                )

    def median_rate(name: str, i: int, key: str) -> float:
        return statistics.median(
            x["cases"][i]["batch"] / x["cases"][i][key] for x in raw if x["build"] == name
        )

    lines = [
        "| batch | S | before inputs/s | after inputs/s | after / before "
        "| before, CPU time | after, CPU time | after / before, CPU time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (batch, samples) in enumerate(CASES):
        wall = {n: median_rate(n, i, "wall") for n in trees}
        cpu = {n: median_rate(n, i, "cpu") for n in trees}
        lines.append(
            f"| {batch} | {samples} | {wall['before']:.2f} | {wall['after']:.2f} | "
            f"**{wall['after'] / wall['before']:.3f}** | {cpu['before']:.2f} | {cpu['after']:.2f} | "
            f"**{cpu['after'] / cpu['before']:.3f}** |"
        )
    text = "\n".join(
        [
            "# Runtime before and after the restructure (issue #12)",
            "",
            f"`python benches/bench_before_after.py {trees['before']} {trees['after']} "
            f"--rounds {args.rounds}` on {platform.processor() or platform.machine()} ({os.cpu_count()} "
            f"logical CPUs), Python {sys.version.split()[0]}; 1-minute load average {load_before:.1f} "
            f"before and {load_after:.1f} after.",
            "MiniLM-L6 shape (bench_runtime.py's bundle), sequence 64, one runtime thread. Per build and "
            f"case: the median over {args.rounds} rounds (builds alternating ABBA) of inputs/s from the "
            "best-of-N call time in each round's subprocess; the CPU-time columns divide by the "
            "process CPU time of the call instead of its wall time (least disturbed by other load: "
            "with one thread it leaves out the time the process waited for a core).",
            "",
            *lines,
        ]
    )
    print()
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "raw.jsonl", "w") as f:
            for record in raw:
                record = {
                    **record,
                    "cases": [{k: v for k, v in c.items() if k != "probs"} for c in record["cases"]],
                }
                f.write(json.dumps(record) + "\n")
        (args.out / "table.md").write_text(text + "\n")
    return 0


def test_bench_before_after_runs(tmp_path):
    """One short round of this tree against itself (timings are never pass/fail): the script runs,
    both sides import their own tree, and it writes its raw lines and table."""
    tree = BENCHES.parent / "python"
    args = [str(tree), str(tree), "--rounds", "1", "--min-time", "0", "--min-reps", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    raw = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert [r["build"] for r in raw] == ["before", "after"]
    assert all(len(r["cases"]) == len(CASES) for r in raw)
    assert "after / before" in (tmp_path / "table.md").read_text()


if __name__ == "__main__":
    sys.exit(main())
