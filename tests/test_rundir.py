"""RunDir and the staged-write rules every command that writes follows (src/codetune/rundir.py)."""

from __future__ import annotations

import json
import os

import pytest

from codetune.data import write_jsonl
from codetune.errors import CodetuneError, OutputError
from codetune.rundir import MARKER, RunDir, atomic_write, check_target, read_marker, staged_dir, staged_file


def test_staged_dir_appears_whole_with_its_marker_and_nothing_left_beside_it(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target, "eval") as staging:
        assert staging.parent == tmp_path and staging != target and not target.exists()
        assert oct(staging.stat().st_mode & 0o777) == "0o700"  # nobody else can plant anything in it
        (staging / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a"
    assert read_marker(target)["kind"] == "eval"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target, "eval") as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with staged_dir(target, "eval", overwrite=True) as staging:
            (staging / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_targets_need_overwrite_and_the_same_kind(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target, "merged") as staging:
        (staging / "v").write_text("1")
    with pytest.raises(OutputError, match="already exists: pass --overwrite"):
        check_target(target, "merged")
    with pytest.raises(OutputError, match="not a codetune eval output"):
        check_target(target, "eval", overwrite=True)
    with staged_dir(target, "merged", overwrite=True) as staging:
        (staging / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is gone


def test_foreign_folders_links_and_folders_holding_the_source_are_refused(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (mine / MARKER).symlink_to(tmp_path / "elsewhere.json")  # a marker must be a real file
    (tmp_path / "elsewhere.json").write_text('{"kind": "eval"}')
    with pytest.raises(OutputError, match="not a codetune eval output"):
        check_target(mine, "eval", overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link"):
        check_target(link, "eval", overwrite=True)
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    with pytest.raises(OutputError, match="contains"):
        check_target(run, "merged", overwrite=True, protect=[run / "sub"])
    monkeypatch.chdir(run / "sub")
    with pytest.raises(OutputError, match="contains the current directory"):
        check_target(tmp_path, "merged", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_atomic_write_replaces_a_planted_link_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("summary.json", "rows.jsonl", "rows.jsonl.tmp", ".rows.jsonl.tmp"):
        (folder / name).symlink_to(victim)
    atomic_write(folder / "summary.json", "{}")
    write_jsonl(folder / "rows.jsonl", [{"a": "\ud800"}])  # a lone surrogate is written as a JSON escape
    assert victim.read_text() == "precious"
    assert not (folder / "summary.json").is_symlink() and (folder / "summary.json").read_text() == "{}"
    assert json.loads((folder / "rows.jsonl").read_text()) == {"a": "\ud800"}


def test_staged_file_replaces_only_what_ours_accepts(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_text("not gguf")
    with pytest.raises(OutputError, match="not a codetune gguf output"):
        with staged_file(target, "gguf", overwrite=True, ours=lambda p: p.read_bytes()[:4] == b"GGUF"):
            pass
    target.write_bytes(b"GGUF old")
    with staged_file(target, "gguf", overwrite=True, ours=lambda p: p.read_bytes()[:4] == b"GGUF") as tmp:
        tmp.write_bytes(b"GGUF new")
    assert target.read_bytes() == b"GGUF new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_run_dir_layout_and_rules(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert (rd.recipe_file.name, rd.data.name, rd.adapter.name, rd.eval.name, rd.merged.name) == (
        "recipe.yaml",
        "data",
        "adapter",
        "eval",
        "merged",
    )
    rd.ensure()
    assert read_marker(rd.path)["kind"] == "run" and rd.is_run and not rd.is_trained()
    with pytest.raises(CodetuneError, match="not a run directory"):
        rd.require_adapter()
    rd.recipe_file.write_text("name: x\n")
    with pytest.raises(CodetuneError, match="no trained adapter"):
        rd.require_adapter()
    rd.adapter.mkdir()
    (rd.adapter / "adapter_config.json").write_text("{}")
    assert rd.is_trained()
    with pytest.raises(CodetuneError, match="adapter_config.json, field 'peft_type'"):
        rd.require_adapter()  # checked: not a LoRA adapter's config
    (rd.adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 16}')
    with pytest.raises(CodetuneError, match="adapter_model.safetensors is missing"):
        rd.require_adapter()
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, dtype=np.float32)}, rd.adapter / "adapter_model.safetensors")
    assert rd.require_adapter() == rd.adapter
    with pytest.raises(OutputError, match="holds a trained run"):
        rd.check_mutable(False, "preparing")
    assert rd.check_mutable(True, "preparing") is True
    rd.clear_training()
    assert not rd.adapter.exists() and rd.recipe_file.is_file()


def test_run_dir_never_writes_into_a_foreign_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").mkdir()
    with pytest.raises(OutputError, match="did not create"):
        RunDir(home).ensure()
    assert sorted(p.name for p in home.iterdir()) == ["data"]
    empty = tmp_path / "empty"
    empty.mkdir()
    RunDir(empty).ensure()  # an empty folder is fine
    assert (empty / MARKER).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        RunDir(tmp_path / "file").ensure()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_an_output_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            with staged_dir(locked / "out", "eval"):
                pass
    finally:
        locked.chmod(0o755)


def test_outputs_from_before_markers_count_as_ours_only_inside_a_run(tmp_path):
    from codetune.rundir import ours_or_legacy

    ours = ours_or_legacy("eval", "summary.json")
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: x\n")
    (run / "data" / "stats.json").write_text("{}")
    (run / MARKER).write_text('{"kind": "run", "version": 1}\n')  # a run (only its marker says so)
    for folder in (run / "eval", tmp_path / "eval"):
        folder.mkdir()
        (folder / "summary.json").write_text("{}")
    assert ours(run / "eval")  # an earlier run's results
    assert not ours(tmp_path / "eval")  # the same files anywhere else could be anyone's
    (run / "eval" / "summary.json").unlink()
    (run / "eval" / "summary.json").symlink_to(tmp_path / "eval" / "summary.json")
    assert not ours(run / "eval")
