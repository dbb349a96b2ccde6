import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from codetune.starter import load_starter


def run_program(source: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-c", source], capture_output=True, text=True, timeout=30)


def program(solution: str, tests: list[str]) -> str:
    return solution + "\n\n" + "\n".join(tests) + "\nprint('ALL-TESTS-RAN')\n"


def test_starter_set_schema():
    rows = load_starter()
    assert len(rows) >= 100
    assert len({r["task_id"] for r in rows}) == len(rows)
    assert len({r["instruction"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) - {"family"} == {"task_id", "instruction", "input", "output", "entry_point", "test_list"}
        assert r["instruction"].strip() and r["output"].strip() and isinstance(r["input"], str)
        assert f"def {r['entry_point']}(" in r["output"]
        assert r["test_list"] and all(t.startswith("assert ") for t in r["test_list"])


def test_every_reference_solution_passes_its_tests():
    rows = load_starter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda r: run_program(program(r["output"], r["test_list"])), rows))
    failures = [
        (r["task_id"], res.stderr[-300:])
        for r, res in zip(rows, results, strict=True)
        if res.returncode != 0 or "ALL-TESTS-RAN" not in res.stdout
    ]
    assert failures == []


def test_the_tests_catch_a_wrong_solution():
    # Every task's tests must reject a solution that returns a constant: a test that cannot fail proves nothing.
    rows = load_starter()

    def stubbed(r):
        stub = f"def {r['entry_point']}(*args, **kwargs):\n    return None\n"
        return run_program(program(stub, r["test_list"]))

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(stubbed, rows))
    passing = [r["task_id"] for r, res in zip(rows, results, strict=True) if res.returncode == 0]
    assert passing == []


def test_families_are_many_members_of_one_kind_with_other_names_and_constants():
    rows = load_starter()
    families: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("family"):
            families.setdefault(r["family"], []).append(r)
    assert len(families) >= 8 and len(rows) - sum(map(len, families.values())) == 184
    for name, members in families.items():
        assert len(members) >= 10, name
        # members differ in name and in what they are asked, not only in wording
        assert len({m["entry_point"] for m in members}) == len(members), name
        assert len({m["output"] for m in members}) == len(members), name


def test_held_out_family_members_survive_decontamination(tmp_path, tiny_dir):
    """Family members must differ from each other by more than a 13-word n-gram, or `prepare` would drop the
    taught members as copies of the held-out ones and the family row would measure nothing."""
    from codetune.prepare import prepare
    from codetune.recipe import load_recipe

    stats = prepare(load_recipe("tiny-cpu"), tmp_path / "run", log=lambda _: None).stats
    rows = {r["task_id"]: r for r in load_starter()}
    dropped = [
        json.loads(line)
        for line in (tmp_path / "run" / "data" / "decontaminated.jsonl").read_text().splitlines()
        if line.strip()
    ] if (tmp_path / "run" / "data" / "decontaminated.jsonl").is_file() else []
    order = list(rows.values())
    dropped_families = [order[d["row"] - 1].get("family") for d in dropped if order[d["row"] - 1].get("family")]
    assert stats["rows"]["test_split"] >= 30
    assert dropped_families == []
