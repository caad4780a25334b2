"""Every knob of the quality benchmark in one place (the docs quote these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Settings:
    threads: int = 2
    seed: int = 0
    n_train: int = 512         # training examples per task (fewer where the task has fewer)
    n_val: int = 100           # validation examples per task (hyperparameter choice only)
    n_test: int = 300          # test examples per task (every reported number)
    max_length: int = 64       # prompt tokens (left-truncated: the question and answer cue are kept)
    rank: int = 8              # LoRA on all 30 layers x 7 projections
    alpha: float = 16.0
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    random_seeds: tuple[int, ...] = (0, 1, 2)
    osrm_samples: int = 32     # unlabeled prompts per other task for each OSRM initialisation
    gate_steps: int = 100      # per-token gate training steps (X-LoRA / CoMoL gates; LoRAs frozen)
    gate_lr: float = 1e-2
    router_train: int = 128    # training prompts per task that fit the request-level routers
    router_layer: int = 20     # the base model's hidden state (after this many layers) the routers read
    calib_unlabeled: int = 128  # unlabeled training prompts per task for calibration (RegMean, Fisher, ...)
    ada_steps: int = 100       # AdaMerging coefficient-training steps (its own stage and inside tune)
    tune_minutes: float = 15.0  # `loramerge tune` budget
    tune_val: int = 100        # labeled validation examples per task the tuner sees (never the test split)
    lora_layers: tuple[int, ...] = ()  # layers with LoRA (empty: all 30; the smoke uses 2 to stay fast)
    lambda_grid: tuple[float, ...] = (0.3, 0.6)  # validation grid of lambda (evaluate.py: per family)
    tasks: tuple[str, ...] = ()  # task keys (empty: tasks.TASKS)

    def as_dict(self) -> dict:
        return asdict(self)

    def training_key(self) -> dict:
        """What an adapter depends on (besides the data and the model): part of its cache key."""
        return {k: getattr(self, k) for k in ("seed", "max_length", "rank", "alpha", "steps", "batch_size", "lr", "lora_layers")}


SMOKE = dict(n_train=16, n_val=4, n_test=4, steps=2, lambda_grid=(0.6,), lora_layers=(28, 29), tasks=("intent", "sentiment", "color"), gate_steps=2, osrm_samples=4, random_seeds=(0, 1),
             router_train=8, calib_unlabeled=8, ada_steps=2, tune_minutes=0.5, tune_val=6)
"""``--smoke``: tiny splits and budgets that check every stage runs (numbers mean nothing)."""


def smoke(settings: Settings) -> Settings:
    return replace(settings, **SMOKE)
