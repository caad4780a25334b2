"""Every knob of the quality benchmark in one place (the docs quote these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Settings:
    threads: int = 2
    seed: int = 0
    n_train: int = 256         # training examples per task
    n_val: int = 30            # validation examples per task (hyperparameter choice only)
    n_test: int = 100          # test examples per task (every reported number)
    max_length: int = 80       # prompt tokens (left-truncated: the options and 'Answer:' are kept)
    n_top: int = 4             # LoRA only in the top n_top of the 30 layers (the rest are frozen and cached)
    rank: int = 8
    alpha: float = 16.0
    steps: int = 160
    batch_size: int = 8
    lr: float = 5e-3
    random_seeds: tuple[int, ...] = (0, 1, 2)
    osrm_samples: int = 48     # unlabeled prompts per other task for each OSRM initialisation
    gate_steps: int = 100      # per-token gate training steps (X-LoRA / CoMoL gates; LoRAs frozen)
    gate_lr: float = 1e-2

    def as_dict(self) -> dict:
        return asdict(self)
