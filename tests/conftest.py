import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Everything runs offline: nothing in the test suite may reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the repo; CODETUNE_SHARED points elsewhere (a git worktree sits one level deeper).
SHARED = Path(os.environ.get("CODETUNE_SHARED") or ROOT.parent / "shared")
PHI3_TOKENIZER = SHARED / "tokenizers" / "phi3-mini-4k-instruct"
PHI3_TOKENIZER_2024_05 = PHI3_TOKENIZER / "revision-2024-05"
MBPP_JSONL = SHARED / "data" / "mbpp" / "mbpp.jsonl"


def _needs(path: Path):
    return pytest.mark.skipif(
        not path.exists(), reason=f"{path} is absent: ../shared exists beside the repo in CI only, not in a clone"
    )


needs_phi3_tokenizer = _needs(PHI3_TOKENIZER / "tokenizer.json")
needs_mbpp = _needs(MBPP_JSONL)


# The longest files start first: under `make test`'s two xdist workers (`--dist loadfile
# --no-loadscope-reorder`) a long file that starts last keeps one worker busy alone at the end.
SLOW_FIRST = ("test_demo.py", "test_readme.py", "test_cli_sweep.py", "test_train.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def codetune_home(tmp_path_factory):
    """One cache per test session, so the tiny model is built once and never read from a user's cache.

    CODETUNE_TEST_HOME=DIR reuses a cache across sessions (a developer's shortcut; CI never sets it).
    """
    home = os.environ.get("CODETUNE_TEST_HOME")
    if not home and os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest -n (pytest-xdist, if installed): the workers' temp folders share a parent, and the tiny
        # builds lock (tiny.py), so each tiny model is built once
        home = tmp_path_factory.getbasetemp().parent / "codetune-home"
        home.mkdir(exist_ok=True)
    home = home or tmp_path_factory.mktemp("codetune-home")
    os.environ["CODETUNE_HOME"] = str(home)
    return home


# Pre-training steps of the other families' tiny builtins in this session (theirs are 600).
QUICK_PRETRAIN_STEPS = 60


@pytest.fixture(scope="session", autouse=True)
def quick_family_builtins(codetune_home):
    """Builds every tiny builtin but Phi-3's with QUICK_PRETRAIN_STEPS pre-training steps; yields the real builder.

    The demo's tests need what the tiny Phi-3 learns, so it is built as users get it. The other families'
    tests check how the pipeline treats each family (templates, masks, stop tokens, resume, merge, serve),
    which a briefly pre-trained base shows as well, at a tenth of the build (about 2 minutes each on
    2 cores). What every family learns is tests/test_family_parity.py's claim: it builds them in full,
    in a cache of its own."""
    import codetune.tiny as tiny

    real = tiny.build_tiny_model

    def quick(out_dir, family=None, *, pretrain_steps=None, **kwargs):
        if family is not None and family.name != "phi3" and pretrain_steps is None:
            pretrain_steps = QUICK_PRETRAIN_STEPS
        return real(out_dir, family, pretrain_steps=pretrain_steps, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "build_tiny_model", quick)
        yield real


@pytest.fixture(scope="session")
def tiny_dir(codetune_home):
    from codetune.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dir):
    """A tiny run trained 40 steps, shared by the inference and serving tests (they read it; eval adds eval/)."""
    from codetune.pipeline import train
    from codetune.recipe import load_recipe

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    settings = ["training.max_steps=40", "training.eval_steps=null", "training.save_strategy=no"]
    train(load_recipe("tiny-cpu", settings), run)
    return run


# ---------------------------------------------------------------------------------------
# One tiny run per model family, for the pipeline tests that run on every family

FAMILY_STEPS = 20  # long enough for packed batches and checkpoints on the way, short enough for CI
FAMILY_BATCH = 2


def tiny_families() -> list[str]:
    """Every family that has a builtin tiny model: a new family file joins the pipeline tests by itself."""
    from codetune.families import families

    return [name for name, fam in families().items() if fam.tiny]


def family_recipe(family, *overrides: str):
    """tiny-cpu on ``builtin:tiny-<family>``: one flag, the family fills in its template, pad and stop tokens
    and LoRA targets."""
    from codetune.recipe import load_recipe

    return load_recipe(
        "tiny-cpu",
        [
            f"model.name_or_path={family.builtin}",
            f"training.max_steps={FAMILY_STEPS}",
            f"training.batch_size={FAMILY_BATCH}",
            "training.eval_steps=null",
            "training.logging_steps=5",  # the resumed run's last window (steps 16-20) is then the whole run's
            "lora.r=16",
            "lora.alpha=32",
            f"training.save_steps={FAMILY_STEPS // 4}",
            "training.save_total_limit=null",
            "generation.max_new_tokens=24",
            "evaluation.batch_size=64",  # the held-out starter tasks in one batch
            "evaluation.compare_base=false",
            *overrides,
        ],
    )


@dataclass
class FamilyRun:
    family: object  # codetune.families.Family
    run: Path
    recipe: object
    result: object  # codetune.train.TrainResult


@pytest.fixture(scope="session", params=tiny_families())
def family_run(request, tmp_path_factory, codetune_home) -> FamilyRun:
    """A run of each family's tiny builtin, trained FAMILY_STEPS steps with packing, a checkpoint every quarter.

    Shared by tests/test_family_pipeline.py: the tests read it and write their outputs elsewhere (eval adds
    eval/). Parametrized on the session scope, so pytest runs one family's tests together, then the next."""
    from codetune.families import family_named
    from codetune.pipeline import train

    family = family_named(request.param)
    recipe = family_recipe(family)
    run = tmp_path_factory.mktemp(f"family-{family.name}") / "run"
    return FamilyRun(family, run, recipe, train(recipe, run))


def save_random_model(out: Path, model, tokenizer_source) -> Path:
    """``model`` (random, seeded by the caller) with its 2-D weights widened, so that greedy choices are not
    near-ties, saved to ``out`` with the tokenizer of ``tokenizer_source``: a full-vocabulary model to export."""
    import torch
    from transformers import AutoTokenizer

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------
# The CLI sweeps (tests/test_cli_sweep.py, tests/test_hostile.py): a scratch folder, a run as train leaves it


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A scratch folder that is also the current directory (runs/ lands here)."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def trained_run(work, codetune_home) -> Path:
    """A run directory as `codetune train` leaves it, with an adapter whose files are sound but whose weights
    fit no model: every case that uses it must stop before a model loads."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from codetune.recipe import load_recipe

    run = work / "run"
    for sub in ("data", "adapter", "checkpoints/checkpoint-4"):
        (run / sub).mkdir(parents=True)
    (run / "recipe.yaml").write_text(load_recipe("tiny-cpu").to_yaml())
    (run / "data" / "stats.json").write_text('{"rows": {}}\n')
    (run / "data" / "train.parquet").write_bytes(b"not really parquet")
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["qkv_proj"]}
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config) + "\n")
    save_file({"weight": np.zeros(4, dtype=np.float32)}, run / "adapter" / "adapter_model.safetensors")
    (run / "checkpoints/checkpoint-4/trainer_state.json").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    (run / ".codetune.json").write_text('{"kind": "run", "version": 1}\n')
    return run
