"""The settings of a training run (TrainConfig) and GPT-2's preset sizes."""
from __future__ import annotations

from dataclasses import dataclass, field
from ..errors import InvalidInputError

PRESETS = {  # the sizes of OpenAI's four GPT-2 models
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024),
}
SIZE_FIELDS = ("n_layer", "n_embd", "n_head", "n_positions")
PRETRAIN_LR = 6e-4  # GPT-2 small's peak (GPT-3 paper, table 2.1)
FINETUNE_LR = 1e-4  # a trained model moves far less: 6e-4 undoes much of what it knew


@dataclass
class TrainConfig:
    files: list
    out_dir: str
    model: str | None = None  # a checkpoint to fine-tune (directory or Hub name)
    preset: str | None = None  # or a size to train from scratch
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    n_positions: int | None = None
    dropout: float | None = None
    val_files: list = field(default_factory=list)
    val_fraction: float = 0.1
    seq_len: int | None = None
    batch_size: int = 8  # windows per process per micro-step
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float | None = None  # default: PRETRAIN_LR from scratch, FINETUNE_LR with `model`
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 5% of max_steps
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 1337
    dtype: str = "auto"  # autocast precision: auto | float32 | bfloat16 | float16
    compile: bool = False
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False  # replace a run already in out_dir
    save_dtype: str = "float32"  # precision of the final model's weights
    cache_dir: str | None = None
    log_every: int = 10
    stop_after: int | None = None  # end abruptly after this step, as a crash would (tests)
    progress: bool = True

    # settings that decide the trajectory: a resumed run must repeat them
    TRAJECTORY = ("files", "model", "preset", *SIZE_FIELDS, "dropout", "val_files", "val_fraction", "seq_len",
                  "batch_size", "grad_accum", "max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                  "betas", "grad_clip", "seed", "dtype")

    def __post_init__(self):
        if self.lr is None:
            self.lr = FINETUNE_LR if self.model is not None else PRETRAIN_LR

    def validate(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise InvalidInputError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}.")

        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "log_every", "seq_len", *SIZE_FIELDS):
            positive(name)
        for name in ("eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}.")
        if not self.files:
            raise InvalidInputError("No training text: pass one or more text files.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InvalidInputError(f"val-fraction must lie in [0, 1), got {self.val_fraction}.")
        if not self.lr > 0:
            raise InvalidInputError(f"lr must be positive, got {self.lr}.")
        if self.warmup_steps is not None and self.warmup_steps > self.max_steps:
            raise InvalidInputError(f"--warmup-steps ({self.warmup_steps}) exceeds --max-steps ({self.max_steps}): the "
                                    f"learning rate would never reach its peak. Use --warmup-steps {self.max_steps} or fewer.")
        if self.resume and self.overwrite:
            raise InvalidInputError("--resume continues the run in --out and --overwrite replaces it: pass one of them.")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise InvalidInputError(f"dropout must lie in [0, 1), got {self.dropout}.")
        if self.model is not None and (self.preset or any(getattr(self, k) is not None for k in ("n_layer", "n_embd", "n_head"))):
            raise InvalidInputError("Pass either --model (fine-tune a checkpoint) or --preset / sizes (train from scratch), not both.")
        if self.preset is not None and self.preset not in PRESETS:
            raise InvalidInputError(f"Unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidInputError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidInputError(f"save-dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}.")
