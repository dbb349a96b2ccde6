"""The cost of the sandbox's isolation: HumanEval's 164 canonical solutions scored with the process-level
sandbox as it was before bubblewrap (one process per program, candidate and tests together, an end-of-tests
marker; the module as of commit OLD_COMMIT, read from git) and with today's sandbox (bwrap, or the fallback
where bwrap is missing; a trusted harness process plus a candidate process), in one run, alternating.

    python benchmarks/sandbox_speed.py                 # 164 HumanEval solutions, both paths, 2 rounds
    python benchmarks/sandbox_speed.py --mechanisms    # also count how each suite's tasks are scored
    python benchmarks/sandbox_speed.py --ballast-gb 2  # the scoring process holds 2 GB, as eval holds a model

``--mechanisms`` runs each suite's reference solutions in this process (no sandbox: they are the
benchmarks' own code) with the candidate's top-level names wrapped, and counts which tasks need what of the
two-process scoring: plain calls only, a standard-library dict/tuple flavour converted to plain data,
opaque handles (objects that stay in the candidate process), setup code, the prompt's helpers, or a module
the candidate imported. MBPP is read from ../shared/data/mbpp/mbpp.jsonl (skipped when absent).

Prints a table and writes JSON (default benchmarks/results/sandbox_speed.json).
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "2d79a42"  # the last commit with the process-level-only sandbox
MBPP = ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def load_old_sandbox():
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:src/codetune/sandbox.py"],
        capture_output=True,
        text=True,
        check=False,
    )
    if source.returncode != 0:
        sys.exit(f"cannot read the old sandbox from git ({OLD_COMMIT}): {source.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="codetune-old-sandbox-")) / "old_sandbox.py"
    path.write_text(source.stdout)
    try:
        spec = importlib.util.spec_from_file_location("old_sandbox", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_sandbox"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    return module


# ---------------------------------------------------------------------------------------------- mechanisms

PLAIN = (type(None), bool, int, float, complex, str, bytes)
CONVERTED = (collections.Counter, collections.OrderedDict, collections.defaultdict)


def classify(value) -> str:
    """How a value crosses from the candidate process: "plain", "converted" or "handle"."""
    t = type(value)
    if t in PLAIN:
        return "plain"
    if t in (list, tuple, set, frozenset):
        kinds = {classify(v) for v in value}
    elif t is dict:
        kinds = {classify(v) for kv in value.items() for v in kv}
    elif t in CONVERTED or (isinstance(value, tuple) and hasattr(t, "_fields")):
        kinds = {"converted"} | {classify(v) for v in (value.values() if isinstance(value, dict) else value)}
    else:
        return "handle"
    return "handle" if "handle" in kinds else "converted" if "converted" in kinds else "plain"


def names_loaded(code: str) -> set[str]:
    tree = ast.parse(code)
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    bound |= {a.asname or a.name.split(".")[0] for n in imports for a in n.names}
    bound |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    return loaded - bound


def mechanisms(suite: str, tasks) -> dict:
    from codetune.suites import scored_program

    counts = collections.Counter()
    for task in tasks:
        program = scored_program(task, task.reference)
        ns: dict = {"__name__": "__main__"}
        exec(compile(program.code, "<candidate>", "exec"), ns)  # noqa: S102 - the benchmark's own reference
        if program.setup:
            exec(compile(program.setup, "<setup>", "exec"), ns)  # noqa: S102
        seen: set[str] = set()

        def wrap(fn, seen=seen):
            def proxy(*args, **kwargs):
                for a in (*args, *kwargs.values()):
                    if classify(a) == "handle":
                        seen.add("handle")
                result = fn(*args, **kwargs)
                seen.add(classify(result))
                return result

            return proxy

        tests_ns = {k: wrap(v) if callable(v) and not isinstance(v, types.ModuleType) else v for k, v in ns.items()}
        used = names_loaded(program.tests)
        prelude_names: set[str] = set()
        if program.prelude:
            defined: dict = {}
            exec(compile(program.prelude, "<prelude>", "exec"), defined)  # noqa: S102
            prelude_names = {k for k in defined if not k.startswith("__") and k != program.entry_point}
            tests_ns.update({k: defined[k] for k in prelude_names})
        exec(compile(program.tests, "<tests>", "exec"), tests_ns)  # noqa: S102
        kinds = {
            "calls with plain data only": seen <= {"plain"},
            "a dict/tuple flavour converted to plain data": "converted" in seen,
            "opaque handles (objects that stay in the candidate process)": "handle" in seen,
            "setup code (run in the candidate process)": bool(program.setup),
            "the prompt's helpers (run in the harness)": bool(used & prelude_names),
            "a module the candidate imported": any(isinstance(ns.get(n), types.ModuleType) for n in used),
        }
        counts.update(k for k, v in kinds.items() if v)
        counts["tasks"] += 1
    return dict(counts)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="old/new pairs, alternating (best of each is kept)")
    ap.add_argument("--workers", type=int, default=None, help="parallel programs (default: the sandbox's own)")
    ap.add_argument("--mechanisms", action="store_true", help="count how each suite's tasks are scored")
    ap.add_argument(
        "--ballast-gb",
        type=float,
        default=0.0,
        help="GB this process holds while it scores, as `codetune eval` holds a model (a fork copies page tables)",
    )
    ap.add_argument("--mbpp", default=str(MBPP), help="a local mbpp.jsonl for --mechanisms")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sandbox_speed.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))

    from codetune import sandbox
    from codetune.suites import build_program, scored_program
    from codetune.suites.humaneval import humaneval_tasks
    from codetune.suites.mbpp import mbpp_tasks
    from codetune.suites.starter import starter_tasks

    ballast = bytearray(int(args.ballast_gb * (1 << 30)))
    for i in range(0, len(ballast), 4096):  # touched, so the pages are really mapped
        ballast[i] = 1
    old = load_old_sandbox()
    tasks = humaneval_tasks()
    old_programs = [build_program(t, t.reference) for t in tasks]
    new_programs = [scored_program(t, t.reference) for t in tasks]
    report, old_report = sandbox.isolation_report(), old.isolation_report()  # probes are not timed
    times: dict[str, list[float]] = {"old": [], "new": []}
    passed: dict[str, int] = {}
    for _ in range(args.rounds):
        for label, module, programs in (("old", old, old_programs), ("new", sandbox, new_programs)):
            start = time.perf_counter()
            verdicts = module.run_programs(programs, module.Limits(), workers=args.workers)
            times[label].append(time.perf_counter() - start)
            passed[label] = sum(v.passed for v in verdicts)
    old_s, new_s = min(times["old"]), min(times["new"])
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "programs": len(tasks),
        "workers": args.workers or min(4, os.cpu_count() or 1),
        "ballast_gb": args.ballast_gb,
        "old": {
            "what": f"process-level sandbox as of {OLD_COMMIT}: one process per program, marker after the tests",
            "interpreter": old_report["interpreter"],
            "seconds": [round(t, 2) for t in times["old"]],
            "passed": passed["old"],
        },
        "new": {
            "what": f"level {report['level']}: trusted harness + candidate process"
            + (", bwrap namespaces" if report["level"] == "bwrap" else ""),
            "interpreter": report["interpreter"],
            "seconds": [round(t, 2) for t in times["new"]],
            "passed": passed["new"],
        },
        "old_s": round(old_s, 2),
        "new_s": round(new_s, 2),
        "ratio": round(new_s / old_s, 2),
        "per_program_ms": {"old": round(1000 * old_s / len(tasks), 1), "new": round(1000 * new_s / len(tasks), 1)},
    }
    print(f"| path | seconds (best of {args.rounds}) | each round | passed |")
    print("|---|---:|---|---:|")
    for label in ("old", "new"):
        r = result[label]
        rounds = ", ".join(map(str, r["seconds"]))
        print(f"| {label}: {r['what']} | {min(times[label]):.2f} | {rounds} | {r['passed']}/{len(tasks)} |")
    print(f"| **new / old** | **{result['ratio']:.2f}x** | | |")

    if args.mechanisms:
        suites = {"humaneval": tasks, "starter": starter_tasks()}
        if Path(args.mbpp).is_file():
            suites["mbpp"] = mbpp_tasks(args.mbpp)
        else:
            print(f"(mbpp skipped: {args.mbpp} is absent)")
        result["mechanisms"] = {name: mechanisms(name, ts) for name, ts in suites.items()}
        kinds = sorted({k for m in result["mechanisms"].values() for k in m if k != "tasks"})
        print("\n| tasks that use | " + " | ".join(result["mechanisms"]) + " |")
        print("|---|" + "---:|" * len(result["mechanisms"]))
        print("| (tasks) | " + " | ".join(str(m["tasks"]) for m in result["mechanisms"].values()) + " |")
        for k in kinds:
            print(f"| {k} | " + " | ".join(str(m.get(k, 0)) for m in result["mechanisms"].values()) + " |")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
