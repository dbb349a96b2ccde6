import os
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


@pytest.fixture(scope="session", autouse=True)
def codetune_home(tmp_path_factory):
    """One cache per test session, so the tiny model is built once and never read from a user's cache.

    CODETUNE_TEST_HOME=DIR reuses a cache across sessions (a developer's shortcut; CI never sets it).
    """
    home = os.environ.get("CODETUNE_TEST_HOME") or tmp_path_factory.mktemp("codetune-home")
    os.environ["CODETUNE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_dir(codetune_home):
    from codetune.model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dir):
    """A tiny run trained 40 steps, shared by the inference and serving tests (they read it; eval adds eval/)."""
    from codetune.recipe import load_recipe
    from codetune.train import train

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    settings = ["training.max_steps=40", "training.eval_steps=null", "training.save_strategy=no"]
    train(load_recipe("tiny-cpu", settings), run)
    return run
