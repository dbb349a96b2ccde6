"""The benchmark scripts' own arithmetic: what BENCHMARKS.md's held-out and speed columns are made of."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
train_speed = pytest.importorskip("train_speed")


def test_heldout_loss_is_scored_on_the_targets_both_formats_share():
    # per row: (target id, loss); the formats agree on a prefix of each row's code tokens
    ref_base = [[(5, 1.0), (6, 1.0), (13, 9.0)], [(7, 2.0)]]
    ct_base = [[(5, 3.0), (6, 3.0), (32007, 9.0)], [(7, 4.0), (8, 9.0)]]
    results = [
        {
            "variant": "reference",
            "heldout_base": {"reference": ref_base, "codetune": ct_base},
            "heldout": {"reference": [[(5, 0.5), (6, 0.5), (13, 0.0)], [(7, 0.5)]], "codetune": ct_base},
        },
        {
            "variant": "codetune",
            "heldout_base": {"reference": ref_base, "codetune": ct_base},
            "heldout": {"reference": ref_base, "codetune": [[(5, 1.0), (6, 2.0), (32007, 0.0)], [(7, 3.0), (8, 0.0)]]},
        },
    ]
    assert train_speed.score_heldout(results) == 3  # 2 shared targets in row 1, 1 in row 2
    ref, ct = results
    assert ref["heldout_base_reference"] == pytest.approx((1 + 1 + 2) / 3)
    assert ref["heldout_reference"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    assert ct["heldout_codetune"] == pytest.approx((1 + 2 + 3) / 3)  # the unshared tail (0.0s) is left out
    assert "heldout" not in ref and "heldout_base" not in ct  # the token lists stay out of the JSON


def test_speedups_compare_each_point_with_the_reference_at_the_same_point():
    rows = [
        {"variant": "reference", "rows": 10, "max_length": 512, "real_tokens_per_s": 100.0},
        {"variant": "codetune", "rows": 10, "max_length": 512, "real_tokens_per_s": 450.0},
        {"variant": "reference", "rows": 10, "max_length": 256, "real_tokens_per_s": 200.0},
        {"variant": "codetune", "rows": 10, "max_length": 256, "real_tokens_per_s": 500.0},
        {"variant": "codetune", "rows": 20, "max_length": 256, "real_tokens_per_s": 500.0},
    ]
    train_speed.add_speedups(rows)
    assert [r["speedup"] for r in rows] == [1.0, 4.5, 1.0, 2.5, None]


def test_step_clock_leaves_the_first_step_out(monkeypatch):
    import types

    ticks = iter([10.0, 11.0, 12.0, 13.0])
    monkeypatch.setattr(train_speed, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    stats = {"real_tokens": 0}
    clock = train_speed.StepClock(stats)
    clock.on_train_begin(None, None, None)  # any other event is a no-op
    for tokens in (1000, 1500, 2000, 2500):  # the first step also paid for warm-up
        stats["real_tokens"] = tokens
        clock.on_step_end(None, None, None)
    assert clock.steady() == (500.0, 1.0)


def test_rl_gain_interval_is_paired_over_tasks_and_averaged_over_seeds():
    import rl_gain

    def row(seed, rl, sft):
        return {"seed": seed, "arms": {"rl": {"per_task": {"starter-fresh": rl}}, "sft": {"per_task": {"starter-fresh": sft}}}}

    tasks = [f"t{i}" for i in range(40)]
    same = {t: float(i % 2) for i, t in enumerate(tasks)}
    assert rl_gain.bootstrap([row(1, same, same)], "rl", "sft", "starter-fresh") == {
        "mean": 0.0, "interval_95": [0.0, 0.0], "tasks": 40, "seeds": 1
    }  # fmt: skip
    # seed 1 passes every task where SFT passes half, seed 2 changes nothing: a quarter on average, paired per task
    better = {t: 1.0 for t in tasks}
    out = rl_gain.bootstrap([row(1, better, same), row(2, same, same)], "rl", "sft", "starter-fresh")
    assert out["mean"] == 25.0 and out["seeds"] == 2 and 0 < out["interval_95"][0] <= 25.0 <= out["interval_95"][1]
    # tasks one arm lacks are left out, not counted as failures
    fewer = {t: v for t, v in better.items() if t != "t0"}
    assert rl_gain.bootstrap([row(1, fewer, same)], "rl", "sft", "starter-fresh")["tasks"] == 39


def test_rl_variant_changes_grpo_only(tmp_path, capsys):
    import rl_variant

    for settings in ([], ["--set", "training.max_steps=5"], ["--set", "rl.temperature=0.3", "--set", "lora.r=4"]):
        with pytest.raises(SystemExit) as exc:
            rl_variant.main(["--root", str(tmp_path), "--seed", "1", "--name", "x", *settings])
        assert exc.value.code == 2 and "rl.* only" in capsys.readouterr().err
