"""Training a student: a float32 copy of the base model trained on accelerate (DDP/FSDP/DeepSpeed as
configuration, LoRA optional) in one plain loop (:func:`train_student`), and the tensor memory of one
training step (:func:`training_step_memory`).
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass

import torch

from ..models import attention_implementation, pad_id
from ..probes import probe, tensor_memory
from ..progress import bar
from . import student_data
from .config import TRACKERS, DistillConfig
from .losses import distill_loss, gold_ce
from .student_data import collate


def params_digest(model) -> str:
    """Checksum of a model's parameters (to prove the teacher was not trained)."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def make_optimizer(params, cfg: DistillConfig):
    """AdamW; the fused kernel where this torch build has it for the parameters' device (on CPU it is
    ~10x faster than the per-tensor loop, which otherwise dominates small-batch steps)."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def student_autocast(device_type: str, mixed_precision: str):
    """The autocast context of the student's forward: bf16 when ``mixed_precision == "bf16"``, else a no-op."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def training_attention(model, choice: str, device_type: str):
    """Switch ``model``'s attention kernel for training, and back afterwards (evaluation always runs with
    the model's own kernel). ``auto`` is ``eager`` on CPU: for prompts of a few dozen tokens, torch's
    CPU flash-attention backward costs more than plain matmuls (~10% of a training step here)."""
    name = ("eager" if device_type == "cpu" else None) if choice == "auto" else choice
    return attention_implementation(model, name)


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of indices with similar lengths, so that little compute goes to padding.

    Each epoch: a seeded permutation (identity without ``shuffle``), cut into mega-batches of
    ``batch_size × mega`` examples, each sorted by length (longest first, stable) and cut into
    batches; the batch order is then shuffled. Every example appears exactly once per epoch."""
    def __init__(self, lengths, batch_size: int, seed: int = 0, shuffle: bool = True, mega: int = 16):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.mega = list(lengths), batch_size, seed, shuffle, mega
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        size = self.batch_size * self.mega
        out = []
        for m in range(0, n, size):
            chunk = sorted(order[m:m + size], key=lambda i: -self.lengths[i])
            out += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        return out

    def __iter__(self):
        batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def lr_lambda(schedule: str, total_steps: int, warmup_ratio: float):
    """Multiplier of the base learning rate at optimizer step ``t`` (0-based): 1 for ``constant``;
    for ``linear``, (t+1)/w during w = ceil(warmup_ratio · total) warm-up steps, then a linear decay
    that reaches 0 after the last step."""
    if schedule == "constant":
        return lambda t: 1.0
    w = math.ceil(warmup_ratio * total_steps)

    def f(t: int) -> float:
        if t < w:
            return (t + 1) / w
        return max(0.0, (total_steps - t) / max(1, total_steps - w))
    return f


def float32_copy(model):
    """A deep copy of ``model`` with float32 parameters and floating buffers: the student's master weights,
    whatever the base model's dtype. Cast tensor by tensor (``Module.float()`` refuses models that
    transformers flags as quantised, e.g. a de-quantised GGUF); a float32 model is copied unchanged."""
    out = copy.deepcopy(model)
    for t in [*out.parameters(), *out.buffers()]:
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()
    return out


def batch_loss(student, batch: dict, cfg: DistillConfig, verbalizer_ids, device_type: str) -> torch.Tensor:
    """The training loss of one batch: ``(1 − α)·distill_loss + α·gold_ce`` at the answer position."""
    with student_autocast(device_type, cfg.mixed_precision):
        logits = student_data.answer_position_logits(student, batch).float()
    loss = torch.zeros((), device=logits.device)
    if cfg.alpha < 1.0:
        loss = loss + (1 - cfg.alpha) * distill_loss(
            logits, batch["teacher_logp"], cfg.loss, cfg.temperature, cfg.target, verbalizer_ids,
            batch.get("topk_ids"), cfg.beta)
    if cfg.alpha > 0.0:
        loss = loss + cfg.alpha * gold_ce(logits, batch["labels"], verbalizer_ids)
    return loss


def training_step_memory(base_model, tokenizer, examples: list[dict], cfg: DistillConfig, verbalizer_ids,
                         checkpointing: bool = False, warm_step: str = "zero_grad"):
    """Tensor memory (:func:`probes.tensor_memory`) of one optimizer step of this training on its largest
    batch (the ``batch_size`` longest examples), measured on a throw-away float32 copy whose optimizer
    states already exist, as in every step after the first: weights, gradients, AdamW states, activations
    and temporaries at their joint peak, one process, no DDP buffers. The states are made by one optimizer
    step on zero gradients (no forward or backward: the same states' shapes and dtypes as after a real
    first step, at a tenth of its cost; tests/test_distill.py checks the two give the same bytes). The
    student that :func:`train_student` trains is not touched."""
    if warm_step not in ("zero_grad", "real"):
        raise ValueError(f"warm_step must be 'zero_grad' or 'real', got {warm_step!r}")
    device = next(base_model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))[:cfg.batch_size]
    batch = {k: v.to(device) for k, v in collate([examples[i] for i in order], pad_id(tokenizer)).items()}
    model = _new_student(base_model, cfg)
    if checkpointing:
        set_checkpointing(model, True)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trained, cfg)
    with training_attention(model, cfg.train_attention, device.type):
        if warm_step == "zero_grad":
            for p in trained:
                p.grad = torch.zeros_like(p)
        else:  # "real": one untracked step on the batch (the reference the zero-gradient step is tested against)
            batch_loss(model, batch, cfg, verbalizer_ids, device.type).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with tensor_memory(model, optimizer=opt) as m:
            batch_loss(model, batch, cfg, verbalizer_ids, device.type).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    del model, opt
    return m


def set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing of every decoder layer on or off (non-reentrant), through transformers'
    ``activation_checkpointing_*`` (5.x) or the older ``gradient_checkpointing_*`` names."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def checkpointing_on(model) -> bool:
    """Whether activation checkpointing is on (either of transformers' property names)."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def _new_student(base_model, cfg: DistillConfig):
    """The float32 copy of ``base_model`` that is trained (with LoRA adapters when ``cfg.lora_r``)."""
    student = float32_copy(base_model)
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
    return student


def _plain_student(acc, student, base_model, cfg: DistillConfig):
    """The trained student as a plain module with whole float32 weights on every process, ready for the
    sharded evaluation (in which processes run different numbers of forwards, so no forward may need a
    collective) and for saving. DDP: the unwrapped module. FSDP (1 or 2): the full state dict, gathered on
    every process, loaded into a fresh copy. DeepSpeed ZeRO-3: the partitioned parameters gathered
    (``deepspeed.zero.GatheredParameters``) and copied likewise. Only the first two run in this kit's tests
    (FSDP through torch on CPU, see tests/test_distill.py); ZeRO-3 needs CUDA and DeepSpeed."""
    from accelerate.utils import DistributedType

    model = acc.unwrap_model(student)
    kind = acc.distributed_type
    zero3 = (kind == DistributedType.DEEPSPEED
             and getattr(getattr(acc.state, "deepspeed_plugin", None), "zero_stage", 0) == 3)
    if kind != DistributedType.FSDP and not zero3 and not _is_sharded(model):
        return model
    fresh = _new_student(base_model, cfg)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    fresh.load_state_dict({k: v.to(acc.device) for k, v in state.items()}, strict=False)
    missing = [k for k, _ in fresh.named_parameters() if k not in state]
    if missing:
        raise RuntimeError(f"gathering the sharded student lost {len(missing)} parameters, e.g. {missing[:3]}")
    return fresh.to(acc.device)


def _is_sharded(model) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2's shards)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def check_tracker(log_with) -> None:
    """Raise a clear error, before any training, when the experiment tracker ``log_with`` (one of
    :data:`TRACKERS`, or an accelerate ``GeneralTracker`` instance) is unknown or not installed."""
    if not log_with or not isinstance(log_with, str):
        return
    if log_with not in TRACKERS:
        raise ValueError(f"unknown tracker {log_with!r}; use one of {', '.join(t for t in TRACKERS if t)} or ''")
    import importlib.util

    import accelerate.utils as au

    probe = getattr(au, f"is_{log_with}_available", None)
    available = probe() if probe else importlib.util.find_spec(log_with) is not None
    if log_with == "tensorboard" and not available:
        available = importlib.util.find_spec("tensorboardX") is not None
    if not available:
        raise ValueError(f"the tracker {log_with!r} is not installed: pip install {log_with.replace('_', '-')} "
                         "(or leave log_with empty)")


CHECK_EVERY_ACCELERATOR = 32  # optimizer steps between the host's finiteness checks off CPU (train_student)


@dataclass(frozen=True)
class Tracking:
    """An experiment tracker for :func:`train_student`: ``log_with`` (e.g. ``"tensorboard"``, or an
    accelerate ``GeneralTracker``) gets the loss, lr and gradient norm of every optimizer step under
    ``run_name`` (files under ``logging_dir``). It does not change training."""
    log_with: object
    run_name: str = "student"
    logging_dir: object = None


def _accelerator(cfg: DistillConfig, accelerator, tracking: Tracking | None):
    """The caller's accelerator, or a new one for ``cfg`` (pinned batches copied without waiting for the
    device on CUDA) with ``tracking``'s tracker started."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cuda = torch.cuda.is_available()
    acc = accelerator or Accelerator(cpu=not cuda, gradient_accumulation_steps=cfg.grad_accum,
                                     log_with=[tracking.log_with] if tracking else None,
                                     project_dir=str(tracking.logging_dir) if tracking and tracking.logging_dir
                                     else None, dataloader_config=DataLoaderConfiguration(non_blocking=cuda))
    if tracking:
        acc.init_trackers(tracking.run_name.replace("|", "_").replace("/", "_"), config=asdict(cfg))
    return acc


def _loader(examples: list[dict], cfg: DistillConfig, pad: int):
    """Training batches of ``examples`` padded with ``pad``: length-grouped (:class:`LengthGroupedBatches`) or
    plain, seeded."""
    cuda = torch.cuda.is_available()
    collate_fn = lambda b: collate(b, pad)  # noqa: E731
    if cfg.group_by_length:
        sampler = LengthGroupedBatches([len(e["input_ids"]) for e in examples], cfg.batch_size, cfg.seed, cfg.shuffle)
        return torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collate_fn, pin_memory=cuda)
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.utils.data.DataLoader(examples, batch_size=cfg.batch_size, shuffle=cfg.shuffle, generator=gen,
                                       collate_fn=collate_fn, pin_memory=cuda)


def _device_norm(acc, params, cfg: DistillConfig, like: torch.Tensor):
    """The total gradient norm before clipping, on the device (max_norm = inf: the norm without clipping,
    the gradients multiplied by 1); None where DeepSpeed clips inside its engine and reports none."""
    norm = acc.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    if norm is None:
        return None
    return norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm), device=like.device)


class _StepChecks:
    """The steps not yet checked, on the device, and what the checked ones recorded. :meth:`check` makes one
    copy to the host of the pending steps: their losses and gradient norms are recorded (and logged), and
    the first non-finite one stops every process (they all check at the same steps, on the same gathered
    values)."""
    def __init__(self, acc, every: int, tracking: Tracking | None, pbar):
        self.acc, self.every, self.tracking, self.pbar = acc, every, tracking, pbar
        self.pending = []  # (epoch, step, per-process losses, gradient norm or None, lr or None)
        self.losses, self.grad_norms = [], []

    def add(self, epoch, step, rank_losses, norm, lr, synced: bool):
        """One step's values, still on the device; checked once ``every`` synced steps are pending (before
        this step's update: with every = 1, no non-finite gradient is applied)."""
        self.pending.append((epoch, step, rank_losses, norm, lr))
        if synced and len(self.pending) >= self.every:
            self.check()

    def check(self):
        if not self.pending:
            return
        values = torch.stack([torch.cat([rl.float(), (n if n is not None else rl.new_zeros(())).float().reshape(1)])
                              for _, _, rl, n, _ in self.pending]).tolist()  # per step: the ranks' losses, the norm
        for (ep, st, _, n, lr), (*rank_losses, norm) in zip(self.pending, values):
            self._record(ep, st, rank_losses, norm if n is not None else None, lr)
        self.pending.clear()
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{self.losses[-1]:.4f}")

    def _record(self, ep, st, rank_losses, norm, lr):
        bad = [r for r, v in enumerate(rank_losses) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"loss is {rank_losses[bad[0]]} at epoch {ep}, step {st} on rank(s) {bad} of "
                f"{len(rank_losses)} (losses {rank_losses}): every process stops. Lower the learning "
                "rate, use float32 (mixed_precision='no'), or check the teacher targets (recompute them "
                "with force=True).")
        self.losses.append(sum(rank_losses) / len(rank_losses))
        if norm is not None:
            if not math.isfinite(norm):
                raise FloatingPointError(
                    f"gradient norm is {norm} at epoch {ep}, step {st} with a finite loss ({self.losses[-1]:.6g}): "
                    "every process stops" + (" before the optimizer step" if self.every == 1 else "") +
                    ". Lower the learning rate, use float32 (mixed_precision='no'), or check the model for "
                    "overflowing activations.")
            self.grad_norms.append(norm)
        if self.tracking:
            self.acc.log({"loss": self.losses[-1], **({"lr": lr} if lr is not None else {}),
                          **({"grad_norm": norm} if norm is not None else {})}, step=st)


def _finished_student(acc, student, base_model, cfg: DistillConfig, checkpointing: bool):
    """The trained student as a plain float32 model in eval mode (unwrapped, LoRA merged, checkpointing off)."""
    student = _plain_student(acc, student, base_model, cfg)
    if cfg.lora_r:
        student = student.merge_and_unload()
    if checkpointing:
        set_checkpointing(student, False)
        student.config.use_cache = getattr(base_model.config, "use_cache", True)
    return student.eval()


def train_student(base_model, tokenizer, examples: list[dict], cfg: DistillConfig, verbalizer_ids,
                  accelerator=None, progress: bool = False, tracking: Tracking | None = None,
                  checkpointing: bool = False, check_every: int | None = None) -> tuple:
    """Train a *copy* of ``base_model`` on ``examples`` (from :func:`student_examples`).

    Returns ``(student, stats)`` with per-batch ``losses`` (mean over processes), per-optimizer-step
    ``grad_norms`` (total L2 norm before clipping) and ``lrs``, wall time and peak memory. The base model
    is never modified (LoRA adapters are injected into the copy). The copy has float32 weights whatever
    the base model's dtype: a bf16 copy would round away every AdamW update below half a bf16 step
    (``mixed_precision="bf16"`` autocasts the forward only). Nothing is written to disk, except by a tracker
    (:class:`Tracking`).

    Every process stops together, and the loop never waits for the device between checks: every
    ``check_every`` optimizer steps (default: 1 on a CPU; ``CHECK_EVERY_ACCELERATOR`` on a GPU, where a host
    copy per step would stall the queue of kernels) one copy to the host checks the gathered losses and the
    all-reduced gradient norms, *before* that step's update; a non-finite one raises
    :class:`FloatingPointError` on all, naming the first such step (with ``check_every > 1`` up to
    ``check_every - 1`` later steps may have run, on a student then discarded). The recorded values do not
    depend on ``check_every``. ``checkpointing``: activation checkpointing (each layer's activations
    recomputed in the backward; memory for about one more forward of compute; the same gradients)."""
    from accelerate.utils import set_seed

    if cfg.alpha < 1.0 and "teacher_logp" not in examples[0]:
        raise ValueError("alpha < 1 needs teacher targets; pass teacher= to student_examples (or alpha=1 for PBFT)")
    check_tracker(tracking.log_with if tracking else None)
    acc = _accelerator(cfg, accelerator, tracking)
    set_seed(cfg.seed)
    student = _new_student(base_model, cfg)
    if checkpointing:
        set_checkpointing(student, True)
        student.config.use_cache = False
    student.train()
    opt = make_optimizer([p for p in student.parameters() if p.requires_grad], cfg)
    loader = _loader(examples, cfg, pad_id(tokenizer))
    student, opt, loader = acc.prepare(student, opt, loader)
    params = [p for p in student.parameters() if p.requires_grad]  # FSDP2 replaces them with DTensors
    total_steps = cfg.epochs * math.ceil(len(loader) / cfg.grad_accum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer,  # the optimizer inside accelerate's wrapper
                                              lr_lambda(cfg.lr_schedule, total_steps, cfg.warmup_ratio))
    pbar = bar(cfg.epochs * len(loader), "train", "batch") if progress and acc.is_main_process else None
    checks = _StepChecks(acc, check_every or (1 if acc.device.type == "cpu" else CHECK_EVERY_ACCELERATOR),
                         tracking, pbar)
    lrs, step = [], 0
    with probe(str(acc.device)) as pr, training_attention(acc.unwrap_model(student), cfg.train_attention, acc.device.type):
        for epoch in range(cfg.epochs):
            for batch in loader:
                with acc.accumulate(student):
                    loss = batch_loss(student, batch, cfg, verbalizer_ids, acc.device.type)
                    rank_losses = acc.gather(loss.detach()[None])  # one value per process, left on the device
                    acc.backward(loss)
                    norm = lr = None
                    if acc.sync_gradients:
                        norm = _device_norm(acc, params, cfg, rank_losses)
                        lrs.append(lr := sched.get_last_lr()[0])
                    checks.add(epoch, step, rank_losses, norm, lr, acc.sync_gradients)
                    opt.step()
                    opt.zero_grad()
                    if acc.sync_gradients:
                        sched.step()
                step += 1
                if pbar is not None:
                    pbar.update(1)
        checks.check()
    if pbar is not None:
        pbar.close()
    if tracking:
        acc.end_training()
    return _finished_student(acc, student, base_model, cfg, checkpointing), {
        "losses": checks.losses, "grad_norms": checks.grad_norms, "lrs": lrs, "train_s": pr.wall_s,
        "train_peak_mem_mb": pr.peak_mem_mb, "train_mem_delta_mb": pr.mem_delta_mb, "mem_kind": pr.mem_kind,
        "steps": step, "config": asdict(cfg), "checkpointing": checkpointing}


def training_log(student_key: str, stats: dict, grad_accum: int = 1) -> list[dict]:
    """Tidy per-batch rows of a training run: ``loss`` (mean over processes), and at each optimizer step
    (every ``grad_accum`` batches) its ``lr`` and pre-clipping ``grad_norm`` (NaN where none was taken or
    reported). ``run_key`` = ``<student_key>|b<batch>`` (rows of a forced rerun replace the old ones)."""
    rows = []
    for b, loss in enumerate(stats["losses"]):
        opt_step = (b + 1) // grad_accum - 1 if (b + 1) % grad_accum == 0 else None
        at = lambda xs: float(xs[opt_step]) if opt_step is not None and opt_step < len(xs) else float("nan")
        rows.append({"run_key": f"{student_key}|b{b:05d}", "student": student_key, "batch": b, "loss": float(loss),
                     "lr": at(stats.get("lrs", [])), "grad_norm": at(stats.get("grad_norms", []))})
    return rows
