"""The CD/PBFT recipe (:class:`DistillConfig`) and every choice it validates. No torch import: the
parameter checks of the notebooks and the CLI read the choices without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass

TARGET_KINDS = ("verbalizer", "topk", "full")

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd")

LR_SCHEDULES = ("constant", "linear")

MIXED_PRECISION = ("no", "bf16")

TRAIN_ATTENTION = ("auto", "eager", "sdpa")


@dataclass
class DistillConfig:
    """The CD recipe. Its defaults are the study's recipe (the target chosen on the development split by ``make
    select-recipe``; the rest set earlier, docs/method.md says how): the one place they are written; the profiles
    (and so the notebooks, the CLI and ``llmft-study distill``) take them from here and state only what they
    change."""
    target: str = "topk"  # verbalizer | topk | full
    topk: int = 20  # support size for target="topk"
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # JSD mixture weight
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the gold-label CE; 1.0 = PBFT
    epochs: int = 4
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float = 3e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_schedule: str = "linear"  # constant | linear (warm-up, then linear decay to 0)
    warmup_ratio: float = 0.1  # share of optimizer steps spent warming up (linear schedule)
    mixed_precision: str = "no"  # no | bf16: autocast of the student's forward (weights stay float32)
    train_attention: str = "auto"  # attention kernel while training: auto (eager on CPU, else the model's) | eager | sdpa
    group_by_length: bool = True  # batches of similar length (less padding); random order of batches
    lora_r: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 16
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.target not in TARGET_KINDS:
            raise ValueError(f"unknown target {self.target!r}; use one of {TARGET_KINDS}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"unknown loss {self.loss!r}; use one of {LOSS_KINDS}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; use one of {LR_SCHEDULES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}; use one of {MIXED_PRECISION}")
        if self.train_attention not in TRAIN_ATTENTION:
            raise ValueError(f"unknown train_attention {self.train_attention!r}; use one of {TRAIN_ATTENTION}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


ENSEMBLE_COMBINE = ("prob", "logprob")  # a teacher ensemble's mean: of probabilities, or of log-probabilities

TRACKERS = ("", "tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "trackio", "swanlab")
