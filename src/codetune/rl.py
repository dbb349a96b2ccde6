"""``codetune rl``: GRPO after SFT, rewarded by the sandbox's verdict on the code the model writes.

The steps: check (a trained run, tasks with tests, the stop tokens), then TRL's ``GRPOTrainer`` on the run's
SFT adapter (trainable, on the recipe's 4-bit base) with ``codetune.reward.reward_function`` as its only
reward, then save ``rl/adapter`` and ``rl/rl_summary.json``. Every logging step appends one line to
``rl/metrics.jsonl``: TRL's own metrics (reward mean and std, the share of groups whose rewards do not
differ, completion lengths, KL when ``beta`` > 0) and the reward's (verdict counts, masked completions,
the held-back tests' pass rate beside the rewarded one, the harness's ways in that completions touched).

The tasks (``rl.tasks``): the run's trained starter tasks, MBPP's train split, or a JSONL file of tasks.
Rollouts (``rl.rollouts``): codetune's batched generation through the trainer's ``rollout_func``, or TRL's own.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .data import trained_task_ids
from .errors import RecipeError
from .model import load_base_model, load_tokenizer, stop_token_ids
from .recipe import Recipe, RLConfig
from .reward import Reward, RewardTask, load_task_file, mbpp_train_tasks, reward_function
from .rundir import RunDir, append_line, atomic_write
from .suites import Task
from .suites.starter import prompt as starter_prompt


@dataclass
class RLResult:
    run_dir: Path
    adapter: Path
    steps: int
    tasks: int
    wall_s: float
    summary: dict


def rl_tasks(recipe: Recipe, run_dir: Path) -> list[RewardTask]:
    """The tasks ``rl.tasks`` names, each with its tests split into rewarded and held-back ones: the run's
    trained starter tasks, fresh members of its taught families, MBPP's train split, or a task file (a bad
    line: RecipeError naming it)."""
    cfg = recipe.rl or RLConfig()
    every = cfg.hold_back_every
    if cfg.tasks == "trained":
        from .starter import load_starter

        trained = trained_task_ids(run_dir)
        tasks = _row_tasks(recipe, sorted((r for r in load_starter() if r["task_id"] in trained), key=_id), every)
    elif cfg.tasks == "fresh":
        tasks = _row_tasks(recipe, _fresh_rows(run_dir, cfg.max_tasks), every)
    elif cfg.tasks == "mbpp-train":
        tasks = mbpp_train_tasks(recipe.evaluation.mbpp_source, hold_back_every=every)
    else:
        path = Path(cfg.tasks).expanduser()  # as data.source: relative to where codetune runs
        if not path.is_file():
            raise RecipeError(f"rl.tasks: file not found: {path}")
        try:
            tasks = load_task_file(path, hold_back_every=every)
        except ValueError as exc:
            raise RecipeError(f"rl.tasks: {exc}") from None
    return tasks[: cfg.max_tasks] if cfg.max_tasks is not None else tasks


def _id(row: dict) -> str:
    return row["task_id"]


FRESH_PER_FAMILY = 20  # rl.tasks: fresh without rl.max_tasks


def _fresh_rows(run_dir: Path, max_tasks: int | None) -> list[dict]:
    """Fresh members of the families the run was taught (family_tasks.fresh_rl_rows), one family after another
    in turn, so that the first ``max_tasks`` hold every family."""
    from .family_tasks import fresh_rl_rows
    from .starter import load_starter

    trained = trained_task_ids(run_dir)
    taught = sorted({r["family"] for r in load_starter() if r["task_id"] in trained and r.get("family")})
    if not taught:
        return []
    per_family = -(-max_tasks // len(taught)) if max_tasks is not None else FRESH_PER_FAMILY
    by_family: dict[str, list[dict]] = {}
    for row in fresh_rl_rows(per_family, families=taught):
        by_family.setdefault(row["family"], []).append(row)
    return [rows[i] for i in range(per_family) for rows in by_family.values()]


def _row_tasks(recipe: Recipe, rows: list[dict], every: int) -> list[RewardTask]:
    """Starter-schema rows as reward tasks, prompted as training formats an instruction."""
    tasks = []
    for r in rows:
        task = Task(
            suite="rl",
            task_id=r["task_id"],
            prompt=[{"role": "user", "content": starter_prompt(r, recipe.data.formatting)}],
            reference=r["output"],
            entry_point=r["entry_point"],
        )
        tasks.append(RewardTask.split(task, r["test_list"], hold_back_every=every))
    return tasks


@dataclass
class Checked:
    """What ``check`` found, for ``rl`` to use rather than work out again."""

    tasks: list[RewardTask]
    tokenizer: object
    stops: list[int]


def check(recipe: Recipe, run_dir: Path) -> Checked:
    """Everything that can fail cheaply, before a model loads: a trained run, tasks with tests, the batch,
    the tokenizer and its stop tokens."""
    rd = RunDir(run_dir)
    rd.require_adapter()
    cfg = recipe.rl or RLConfig()
    tasks = rl_tasks(recipe, run_dir)
    if not tasks:
        raise RecipeError(
            f"rl.tasks {cfg.tasks}: {run_dir} trained on no task with tests (starter rows); RL needs prompts with tests"
            if cfg.tasks != "fresh"
            else f"rl.tasks fresh: {run_dir} was taught no starter task family; fresh members exist only for those"
        )
    check_rollouts(cfg)
    if len(tasks) < cfg.prompts_per_step:
        raise RecipeError(f"rl.prompts_per_step {cfg.prompts_per_step} is more than the {len(tasks)} tasks there are")
    tokenizer = load_tokenizer(recipe)
    return Checked(tasks, tokenizer, stop_token_ids(tokenizer, recipe.generation.stop_tokens))


def check_rollouts(cfg: RLConfig) -> None:
    """Rollouts that cannot run in this environment are refused, with the reason (needs no trained run, so
    ``codetune run`` calls it before SFT too)."""
    if cfg.rollouts == "vllm" and (why := vllm_blocker()):
        raise RecipeError(why)


def vllm_blocker() -> str | None:
    """Why TRL's vLLM server mode cannot run in this environment, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return None
    # Measured against vLLM 0.33.0's metadata (2026-12-03): transformers>=5.16.1,<5.21.0 and torch==2.14.0
    return (
        "rl.rollouts vllm: TRL's vLLM server mode imports vLLM in the training process (its client pushes the new "
        "weights to the server over NCCL), and vLLM cannot be installed in codetune's environment: vLLM 0.33.0 needs "
        "transformers<5.21 and torch 2.14.0, codetune pins transformers 5.24.0 and torch 2.13.0. Use rl.rollouts "
        "codetune (codetune's batched generation, on a GPU as well); docs/rl.md, 'The GPU path'"
    )


@dataclass
class Filtered:
    """What the difficulty filter kept: the tasks the starting policy passes sometimes but not always."""

    kept: list[RewardTask]
    rates: dict[str, float]  # task id -> pass rate over the samples
    samples: int
    wall_s: float

    def counts(self) -> dict[str, int]:
        rates = list(self.rates.values())
        return {
            "candidates": len(rates),
            "kept": len(self.kept),
            "always_passed": sum(r == 1.0 for r in rates),
            "never_passed": sum(r == 0.0 for r in rates),
        }


def difficulty_filter(model, tokenizer, recipe: Recipe, tasks: list[RewardTask], *, console=None) -> Filtered:
    """Sample every task ``rl.filter_samples`` times with the starting policy (codetune's batched generation, at
    the rollouts' temperature and length), score the samples with the reward, and keep the tasks whose pass
    rate is strictly between 0 and 1: a group whose completions all pass or all fail has no reward spread,
    so GRPO's advantage is zero for all of it and the step learns nothing from it."""
    from .generate import InferenceSession
    from .reward import score

    cfg = recipe.rl or RLConfig()
    k = cfg.filter_samples
    session = InferenceSession(model, tokenizer, recipe.generation, batch_size=recipe.evaluation.batch_size * 4)
    sampling = session.config(
        do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        max_new_tokens=cfg.max_completion_length, seed=cfg.seed,
    )
    t0 = time.perf_counter()
    if console is not None:
        console.print(
            f"difficulty filter: {len(tasks)} tasks x {k} samples at temperature {cfg.temperature}, then their tests",
            highlight=False,
            markup=False,
        )
    was_training = model.training
    model.eval()
    texts = session.generate([t.task.prompt for t in tasks for _ in range(k)], sampling)
    model.train(was_training)
    rewards = score([t for t in tasks for _ in range(k)], texts, kind=cfg.reward)
    rates = {}
    for i, t in enumerate(tasks):
        values = [r.value for r in rewards[i * k : (i + 1) * k] if r.value is not None]
        rates[t.task.task_id] = sum(values) / len(values) if values else 0.0
    kept = [t for t in tasks if 0.0 < rates[t.task.task_id] < 1.0]
    found = Filtered(kept, rates, k, time.perf_counter() - t0)
    if console is not None:
        c = found.counts()
        console.print(
            f"difficulty filter: kept {c['kept']} of {c['candidates']} tasks (passed sometimes over {k} samples at "
            f"temperature {cfg.temperature}); {c['always_passed']} always passed, {c['never_passed']} never "
            f"({found.wall_s:.0f}s)",
            highlight=False,
            markup=False,
        )
    return found


class _Log:
    """Collects the reward's view of each batch, and writes one metrics line per TRL log."""

    def __init__(self, path: Path, console):
        self.path, self.console, self.pending = path, console, []

    def scored(self, rewards: list[Reward]) -> None:
        self.pending.extend(rewards)

    def line(self, logs: dict, step: int) -> dict:
        rewards, self.pending = self.pending, []
        scored = [r for r in rewards if r.value is not None]
        measured = [r for r in scored if r.heldback is not None]
        row = {"step": step, **{k: v for k, v in logs.items() if isinstance(v, int | float)}}
        row.update(
            completions=len(rewards),
            masked=len(rewards) - len(scored),
            verdicts=dict(Counter(r.verdict for r in rewards)),
            rewarded_pass_rate=sum(r.value == 1.0 for r in measured) / len(measured) if measured else None,
            heldback_pass_rate=sum(bool(r.heldback) for r in measured) / len(measured) if measured else None,
            formed_rate=sum(r.formed for r in rewards) / len(rewards) if rewards else None,
            signals=dict(Counter(s for r in rewards for s in r.signals)),
        )
        append_line(self.path, json.dumps(row) + "\n")
        if self.console is not None:
            mean = logs.get("reward")
            shown = f"reward {mean:.3f}" if isinstance(mean, int | float) else "reward -"
            self.console.print(
                f"rl step {step} | {shown} | verdicts {row['verdicts']} | masked {row['masked']}",
                highlight=False,
                markup=False,
            )
        return row


def _config(cfg: RLConfig, rd: RunDir, stops: list[int], cuda: bool):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(rd.rl_checkpoints),
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon,
        scale_rewards=cfg.scale_rewards,
        mask_truncated_completions=cfg.mask_truncated_completions,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        seed=cfg.seed,
        report_to=[],
        use_cpu=not cuda,
        bf16=False,
        disable_tqdm=True,
        generation_kwargs={"eos_token_id": stops},
        **(
            {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": cfg.vllm_server}
            if cfg.rollouts == "vllm"
            else {}
        ),
    )


def codetune_rollouts(model, tokenizer, recipe: Recipe):
    """GRPOTrainer's ``rollout_func``: each prompt's completion from codetune's batched generation (what
    eval and the filter use), sampled at the rollouts' settings with a seed that moves with the step. The
    ids end with the stop token when one ended them, so TRL tells finished completions from truncated ones."""
    from .generate import InferenceSession

    cfg = recipe.rl or RLConfig()
    session = InferenceSession(model, tokenizer, recipe.generation, batch_size=recipe.evaluation.batch_size * 4)
    sampling = session.config(
        do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_completion_length
    )

    def rollout(prompts: list, trainer) -> dict:
        ids = [session.prompt_ids(p) for p in prompts]
        step = sampling.model_copy(update={"seed": (cfg.seed + 7919 * trainer.state.global_step) % 2**32})
        return {"prompt_ids": ids, "completion_ids": session.completion_ids(ids, step), "logprobs": None}

    return rollout


def _filter(model, tokenizer, recipe: Recipe, tasks: list[RewardTask], rd: RunDir, console) -> Filtered:
    """The difficulty filter, its rates written to rl/filter.json; too few tasks left is an error."""
    cfg = recipe.rl or RLConfig()
    filtered = difficulty_filter(model, tokenizer, recipe, tasks, console=console)
    atomic_write(rd.rl_filter, json.dumps({"samples": filtered.samples, "rates": filtered.rates}, indent=1))
    if len(filtered.kept) < cfg.prompts_per_step:
        raise RecipeError(
            f"rl.filter_samples: the starting policy passed {len(filtered.kept)} task(s) sometimes but not always "
            f"(rl.prompts_per_step is {cfg.prompts_per_step}); lower rl.temperature, or give more tasks"
        )
    return filtered


def _trainer(model, tokenizer, recipe: Recipe, rd: RunDir, tasks: list[RewardTask], stops: list[int], log: _Log):
    """TRL's GRPOTrainer on ``model`` with the sandbox reward, codetune's rollouts (unless ``rl.rollouts: trl``),
    our metrics line per step instead of TRL's printed dict, and the LoRA weights in the recipe's dtype."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    cfg = recipe.rl or RLConfig()

    class _Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                log.line(logs, state.global_step)

    dataset = Dataset.from_list([{"prompt": t.task.prompt, "task_id": t.task.task_id} for t in tasks])
    reward = reward_function(
        {t.task.task_id: t for t in tasks}, kind=cfg.reward, format_weight=cfg.format_reward, on_scored=log.scored
    )
    # TRL tells a finished completion from a truncated one by the model's eos ids: the recipe's stop tokens
    model.generation_config.eos_token_id = stops
    rollout = codetune_rollouts(model, tokenizer, recipe) if cfg.rollouts == "codetune" else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using 'rollout_func'")  # TRL's "experimental" notice
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=_config(cfg, rd, stops, torch.cuda.is_available()),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[_Metrics()],
            rollout_func=rollout,
        )
    trainer.remove_callback(PrinterCallback)  # our line per step instead of the dict TRL prints
    if recipe.lora.dtype == "float32":
        # TRL casts a quantized model's LoRA weights to bf16 (QLoRA's paper); the recipe's lora.dtype decides
        # here, as in SFT: on a CPU without fast bf16 (tiny-cpu) fp32 is faster and keeps the SFT weights exact
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


def _resume_point(rd: RunDir, resume: bool, console) -> Path | None:
    """The last complete GRPO checkpoint to continue from (``--resume``); its metrics lines past it go, as
    those steps are done again. None: start from the SFT adapter."""
    done = RunDir(rd.path, stage="rl").complete_checkpoints() if resume else []
    if not done:
        if resume and console is not None:
            console.print("no complete GRPO checkpoint to resume from: starting from the SFT adapter", markup=False)
        rd.rl_metrics.unlink(missing_ok=True)
        return None
    step = int(done[-1].name.split("-")[-1])
    if rd.rl_metrics.is_file():
        kept = [line for line in rd.rl_metrics.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        atomic_write(rd.rl_metrics, "".join(line + "\n" for line in kept))
    if console is not None:
        console.print(f"resuming GRPO from {done[-1]} (step {step})", highlight=False, markup=False)
    return done[-1]


def filter_kept(tasks: list[RewardTask], rd: RunDir) -> list[RewardTask] | None:
    """The tasks the run's difficulty filter kept (rl/filter.json): a resumed run trains on the same ones, and
    benchmarks/rl_gain.py's control on their reference answers; None when it wrote none."""
    if not rd.rl_filter.is_file():
        return None
    rates = json.loads(rd.rl_filter.read_text())["rates"]
    return [t for t in tasks if 0.0 < rates.get(t.task.task_id, 0.0) < 1.0]


def rl(recipe: Recipe, run_dir: Path, *, console=None, resume: bool = False) -> RLResult:
    """GRPO on ``run_dir``'s SFT adapter (see the module's docstring); writes ``rl/`` in the run directory.
    ``resume``: continue from the last complete checkpoint in rl/checkpoints (``rl.save_steps``)."""
    from peft import PeftModel

    rd, cfg = RunDir(run_dir), recipe.rl or RLConfig()
    checked = check(recipe, run_dir)
    tasks, tokenizer, stops = checked.tasks, checked.tokenizer, checked.stops
    tokenizer.padding_side = "left"  # generation pads on the left
    model = PeftModel.from_pretrained(load_base_model(recipe), str(rd.adapter), is_trainable=True)
    rd.rl.mkdir(exist_ok=True)
    resume_from = _resume_point(rd, resume, console)
    log = _Log(rd.rl_metrics, console)
    kept = filter_kept(tasks, rd) if resume_from is not None and cfg.filter_samples else None
    filtered = _filter(model, tokenizer, recipe, tasks, rd, console) if cfg.filter_samples and kept is None else None
    tasks = kept if kept is not None else filtered.kept if filtered is not None else tasks
    trainer = _trainer(model, tokenizer, recipe, rd, tasks, stops, log)
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    wall = time.perf_counter() - t0
    trainer.model.save_pretrained(str(rd.rl_adapter))
    tokenizer.save_pretrained(str(rd.rl_adapter))
    summary = {
        "steps": int(output.global_step),
        "tasks": len(tasks),
        "wall_s": round(wall, 1),
        "reward": cfg.reward,
        "rl": cfg.model_dump(mode="json"),
        "started_from": str(RunDir.ADAPTER),
        "filter": filtered.counts() if filtered is not None else None,
        "resumed_from": str(resume_from.relative_to(rd.path)) if resume_from is not None else None,
    }
    atomic_write(rd.rl_summary, json.dumps(summary, indent=2))
    return RLResult(Path(run_dir), rd.rl_adapter, summary["steps"], len(tasks), wall, summary)


__all__ = [
    "Checked",
    "Filtered",
    "RLResult",
    "check",
    "check_rollouts",
    "codetune_rollouts",
    "difficulty_filter",
    "filter_kept",
    "rl",
    "rl_tasks",
    "vllm_blocker",
]
