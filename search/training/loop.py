"""Trains one configuration epoch by epoch. Knows nothing of Optuna or MLflow: callers pass an
`on_epoch` callback that sees each epoch's metrics and may ask training to stop (that is how the
objective wires in pruning and logging, and how `search.train` and the report retrain models).

Fast paths, each switched on only where it was measured to pay (`Speed`, docs/speed.md): data
stays on the training device (`BatchLoader`); activations are channels_last (oneDNN on CPUs and
tensor cores on GPUs both prefer NHWC); autocast runs on CUDA (bf16 or fp16, below) and on
CPUs with native bf16 (AVX512-BF16/AMX); optimizers use their fused kernels; and the loop
never synchronises with the host inside an epoch (losses and hits are summed on the device and
read once per epoch).
`torch.compile` (and CUDA graphs through its "reduce-overhead" mode) is off unless asked for.

Precision is chosen per device (`best_precision`): bf16 autocast on GPUs of compute capability
8.0 and later and on CPUs with native bf16, fp16 autocast with a `GradScaler` on capability 7.x
(T4, V100: tensor cores for fp16, but no bf16 convolutions in cuDNN), fp32 elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search.config.devices import place
from search.config.errors import SearchError
from search.config.params import optimizer_settings, trainer_settings
from search.training.augment import BatchLoader
from search.training.images import DatasetSpec, ImageSet
from search.training.models import build_model, count_parameters
from search.training.results import EpochMetrics, TrainResult

EVAL_BATCH_SIZE = 1024
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: this configuration cannot train, other trials can."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16).

    Only then is CPU autocast a win (about 2x on cnn3 and resnet20 on a Zen 4 core); elsewhere
    oneDNN emulates bf16 and fp32 is faster. Read from /proc/cpuinfo, so False off Linux.
    """
    try:
        flags = set(open("/proc/cpuinfo").read().split())  # noqa: SIM115 - read once, cached
    except OSError:
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def best_precision(device: torch.device) -> str:
    """The fastest arithmetic that trains these models as well as fp32 on `device`.

    - CUDA, compute capability >= 8.0 (A100, H100, RTX 30xx/40xx): bf16, fp32's range with no
      loss scaling; cuDNN has bf16 convolutions there.
    - CUDA 7.x (V100, T4, RTX 20xx: the free and common cards): fp16 with loss scaling. cuDNN
      has no bf16 convolutions below 8.0 (PyTorch falls back to a slow generic convolution,
      silently), while fp16 runs on the tensor cores (T4: 65 TFLOPS fp16 against 8 fp32).
    - CUDA below 7.0 (Pascal and older): fp32. No tensor cores; consumer Pascal cards (6.1)
      compute fp16 at 1/64 of their fp32 rate.
    - CPU: bf16 where it is native (`cpu_has_native_bf16`), else fp32 (emulated bf16 is slower).
    """
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def _precision(device: torch.device) -> str:
    """`SEARCH_AUTOCAST`: auto (the device's best), on (low precision even where it is not the
    best: bf16, or fp16 on a CUDA card below 8.0), off (fp32), or bf16 | fp16 | fp32 named."""
    value = os.environ.get("SEARCH_AUTOCAST", "auto").strip().lower()
    if value in PRECISIONS:
        return value
    if value in ("auto", ""):
        return best_precision(device)
    if value in ("1", "true", "on", "yes"):
        return low_precision(device)
    if value in ("0", "false", "off", "no"):
        return "fp32"
    raise SearchError(f"SEARCH_AUTOCAST={value!r}: allowed: auto, on, off, bf16, fp16, fp32.")


def low_precision(device: torch.device) -> str:
    """The 16-bit format for `device` when one is asked for: fp16 on CUDA cards below 8.0 (no
    bf16 convolutions there), bf16 everywhere else."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return "fp16"
    return "bf16"


def _switch(name: str, default: bool) -> bool:
    """An on/off environment switch: unset or `auto` keeps the measured default."""
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("auto", ""):
        return default
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise SearchError(f"{name}={value!r}: allowed: auto, on, off.")


@dataclass(frozen=True)
class Speed:
    """The trainer's optional fast paths; `Speed.for_device` picks the measured defaults.

    Each can be forced with an environment variable, so a study, `search.train` and the
    benchmark all see the same setting without a config key:
    `SEARCH_CHANNELS_LAST`, `SEARCH_AUTOCAST` (auto | on | off | bf16 | fp16 | fp32) and
    `SEARCH_COMPILE` (off | default | reduce-overhead | max-autotune; reduce-overhead adds CUDA
    graphs).

    Attributes:
        channels_last: NHWC model and batches; faster convolutions, BN and pooling with
            oneDNN on CPUs (1.3-1.5x measured) and with tensor cores on GPUs.
        precision: "bf16" or "fp16" autocast for forward and loss, or "fp32" (`best_precision`
            says which per device). fp16 trains with a `torch.amp.GradScaler` (its narrow range
            underflows small gradients without loss scaling); bf16 needs none.
        compile: `torch.compile` mode or "off". Off by default: compiling costs tens of
            seconds per trial (every trial builds a new model), which short trials never win back.
        eval_batch_size: Batch of the validation pass. Large on GPUs; small on CPUs, where a
            1024-image batch's activations spill out of the caches (128 measured 2x faster).

    Example (an A100; a T4 gets precision='fp16'):
        >>> Speed.for_device(torch.device("cuda"))  # doctest: +SKIP
        Speed(channels_last=True, precision='bf16', compile='off', eval_batch_size=1024)
    """

    channels_last: bool = False
    precision: str = "fp32"
    compile: str = "off"
    eval_batch_size: int = EVAL_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise SearchError(f"SEARCH_COMPILE={self.compile!r}: allowed: {', '.join(COMPILE_MODES)}.")
        if self.precision not in PRECISIONS:
            raise SearchError(f"precision {self.precision!r}: allowed: {', '.join(PRECISIONS)}.")

    @classmethod
    def for_device(cls, device: torch.device | str) -> Speed:
        device = torch.device(device)
        return cls(
            channels_last=_switch("SEARCH_CHANNELS_LAST", device.type in ("cuda", "cpu")),
            precision=_precision(device),
            compile=os.environ.get("SEARCH_COMPILE", "off").strip().lower() or "off",
            eval_batch_size=128 if device.type == "cpu" else EVAL_BATCH_SIZE,
        )

    @property
    def autocast(self) -> bool:
        """Whether forward and loss run under autocast (bf16 or fp16)."""
        return self.precision != "fp32"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def resolve_device(name: Any, key: str = "device") -> torch.device:
    """A device word (`search.config.devices`, the one owner of the allowed forms) placed on
    this machine: `auto` means CUDA when present; a malformed word, CUDA where there is none and
    `cuda:N` beyond the devices this process sees are a `SearchError` naming `key`."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(place(key, name, cuda_count))


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA generator state of `device` alone, for a checkpoint (None off CUDA).

    One device's state, not `get_rng_state_all()`: a checkpoint of the main process (which sees
    every GPU) may be resumed by a worker that sees one, and the other way round; the trial's
    own device is the only state it drew from.
    """
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_cuda_rng(state: Any, device: torch.device) -> None:
    """Puts a checkpoint's CUDA generator state back onto the trial's own `device` (whatever
    index it had where it was saved). A state that is not one tensor (an older checkpoint's
    per-GPU list) is left alone: its layout may not match this process's GPUs."""
    if device.type == "cuda" and isinstance(state, torch.Tensor):
        torch.cuda.set_rng_state(state, device)


def build_optimizer(model: nn.Module, params: Mapping[str, Any], *,
                    settings: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer named in `params`, with its own parameters (`search.config.params.OPTIMIZERS`).

    Weight decay is applied to conv/linear weights only: decaying BN scales and biases
    only hurts, a standard trick in fast CIFAR training. `settings` are `trainer_settings(params)`
    when the caller has already checked them (`train` does, once).
    """
    settings = settings or trainer_settings(params)
    name, args = optimizer_settings(params)
    lr, weight_decay = settings["lr"], settings["weight_decay"]
    if settings["decoupled"]:
        # airbench94: lr per 1024 examples, so a larger batch takes a larger step; the decay per
        # step, lr * weight_decay in torch, becomes weight_decay per 1024 examples, whatever lr is.
        lr = lr * settings["batch_size"] / 1024
        weight_decay = weight_decay * settings["batch_size"] / 1024 / lr
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step instead of a loop over tensors: 3-10x faster steps on CPU,
    # and far fewer kernel launches on GPU. Same update rule, rounding may differ.
    fused = {"fused": True} if _fused_supported(model) else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args["momentum"],
                               nesterov=args["nesterov"] and args["momentum"] > 0, **fused)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(groups, lr=lr, betas=(args["beta1"], args["beta2"]), **fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=args["alpha"], momentum=args["momentum"])
    # Adagrad's fused kernel exists on CPU only.
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return torch.optim.Adagrad(groups, lr=lr, **(fused if on_cpu else {}))


def _fused_supported(model: nn.Module) -> bool:
    """Fused optimizer kernels exist for float parameters on CPU and CUDA."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())


def build_schedule(optimizer: torch.optim.Optimizer, params: Mapping[str, Any], epochs: int,
                   steps_per_epoch: int, *, settings: Mapping[str, Any] | None = None
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedules over the full epoch budget, so a pruned trial saw the same curve
    as the complete one would have up to that epoch (`settings` as in `build_optimizer`)."""
    settings = settings or trainer_settings(params)
    total = max(1, epochs * steps_per_epoch)
    if settings["schedule"] == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif settings["schedule"] == "step":
        gamma = settings["gamma"]
        every = (settings["step_size"] or max(1, epochs // 3)) * steps_per_epoch
        factor = lambda step: gamma ** (step // every)  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device, *,
             autocast: str | bool | None = None) -> tuple[float, float]:
    """Mean loss and accuracy over a loader, with one host synchronisation at the end.

    `autocast` is a precision ("bf16", "fp16", "fp32") or None, the device's default
    (`Speed.for_device`), as in training (see `autocast_context`).
    """
    model.eval()
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    with torch.inference_mode(), autocast_context(device, autocast):
        for images, labels in loader:
            logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            hits += (logits.argmax(1) == labels).sum()
    count = loader.num_examples
    return loss_sum.item() / count, hits.item() / count


def predict(model: nn.Module, loader: BatchLoader, device: torch.device, *,
            features: bool = False, autocast: str | bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels (or penultimate features) and true labels, for confusion matrices and t-SNE."""
    model.eval()
    outputs, targets = [], []
    with torch.inference_mode(), autocast_context(device, autocast):
        for images, labels in loader:
            out = model.forward_features(images) if features else model(images).argmax(1)
            outputs.append(out.float().cpu())
            targets.append(labels.cpu())
    return torch.cat(outputs), torch.cat(targets)


def autocast_context(device: torch.device, precision: str | bool | None = None):
    """Autocast in `precision` ("bf16", "fp16"; "fp32" is none). None means the device's default
    (`Speed.for_device`); True its 16-bit format (`low_precision`), False fp32."""
    if precision is None:
        precision = Speed.for_device(device).precision
    elif precision is True:
        precision = low_precision(device)
    elif precision is False:
        precision = "fp32"
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision],
                          enabled=precision != "fp32")


def make_loader(data: ImageSet, spec: DatasetSpec, device: torch.device, *, batch_size: int,
                train: bool, seed: int = 0, augment: bool = False,
                channels_last: bool | None = None) -> BatchLoader:
    """The loader trials use; `channels_last` None means the device's default (`Speed`)."""
    if channels_last is None:
        channels_last = Speed.for_device(device).channels_last
    return BatchLoader(
        data, batch_size=batch_size, device=device, mean=spec.mean, std=spec.std,
        augment=augment and train, shuffle=train, seed=seed,
        channels_last=channels_last,
        # A last batch of one image breaks BatchNorm in training; dropping it costs < 1 batch.
        drop_last=train and len(data) > batch_size)


def train(model_name: str, params: Mapping[str, Any], *, train_data: ImageSet,
          val_data: ImageSet | None, spec: DatasetSpec, epochs: int, seed: int,
          device: str | torch.device = "auto",
          on_epoch: Callable[[EpochMetrics], bool] | None = None,
          speed: Speed | None = None, resume_from: dict[str, Any] | None = None,
          checkpoint: Callable[[Callable[[], dict[str, Any]]], None] | None = None) -> TrainResult:
    """Trains for up to `epochs`; `on_epoch` returning True stops training after that epoch.

    `speed` None means `Speed.for_device(device)`, the measured defaults. After every epoch
    that training goes on from, `checkpoint` (if given) receives a function that returns the
    whole training state (model, optimizer, schedule, random generators, history); training
    started with `resume_from=` that state continues from the next epoch as if never stopped.

    Raises:
        TrainingDiverged: the training loss became NaN or infinite.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    speed = speed or Speed.for_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    if speed.compile != "off":
        # Each trial is a new model: without a reset, dynamo's cache of earlier trials' graphs
        # reaches its recompile limit after a few trials and every later trial runs eager,
        # silently. Resetting also frees the CUDA-graph memory pools of the last trial.
        torch._dynamo.reset()
    torch.manual_seed(seed)
    settings = trainer_settings(params)
    batch_size = settings["batch_size"]
    model = build_model(model_name, params, in_channels=spec.channels,
                        image_size=spec.image_size, num_classes=spec.num_classes)
    model = model.to(device, memory_format=speed.memory_format)
    train_loader = make_loader(train_data, spec, device, batch_size=batch_size, train=True,
                               seed=seed, augment=settings["augment"],
                               channels_last=speed.channels_last)
    val_loader = (make_loader(val_data, spec, device, batch_size=speed.eval_batch_size, train=False,
                              channels_last=speed.channels_last)
                  if val_data is not None else None)
    # The compiled wrapper shares the parameters; `result.model` stays the plain module.
    forward = model if speed.compile == "off" else torch.compile(
        model, mode=None if speed.compile == "default" else speed.compile)
    optimizer = build_optimizer(model, params, settings=settings)
    schedule = build_schedule(optimizer, params, epochs, len(train_loader), settings=settings)
    # fp16's range is narrow: the loss is scaled up so small gradients do not underflow, and a
    # step with inf/NaN gradients is skipped. A disabled scaler is a plain backward and step.
    scaler = torch.amp.GradScaler(device.type, enabled=speed.precision == "fp16")
    if scaler.is_enabled():
        # While the scaler finds its scale it skips steps with inf gradients; the schedule still
        # steps (it counts batches), which PyTorch would warn about once per process.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` "
                                r"before `optimizer\.step\(\)`")
    criterion = nn.CrossEntropyLoss(label_smoothing=settings["label_smoothing"])
    result = TrainResult(model=model, parameter_count=count_parameters(model))
    first = 1
    if resume_from is not None:
        first = _restore(resume_from, model, optimizer, schedule, scaler, train_loader, result,
                         device) + 1

    def state() -> dict[str, Any]:
        # Tensors, plain containers, numbers and strings only: a checkpoint is read back with
        # torch.load(weights_only=True), which refuses anything else (search.storage.checkpoints).
        return {"epoch": result.history[-1].epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": cuda_rng_state(device),
                "history": [dataclasses.asdict(m) for m in result.history]}

    for epoch in range(first, epochs + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        loss_sum = torch.zeros((), device=device)
        hits = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for images, labels in train_loader:
            with autocast_context(device, speed.precision):
                logits = forward(images)
                loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            loss_sum += loss.detach() * labels.shape[0]
            hits += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
        train_loss = loss_sum.item() / max(seen, 1)  # the epoch's one host synchronisation
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch} (lr={lr:g})")
        train_seconds = time.perf_counter() - started
        val_loss, val_accuracy = (evaluate(forward, val_loader, device, autocast=speed.precision)
                                  if val_loader else (None, None))
        metrics = EpochMetrics(
            epoch=epoch, train_loss=train_loss, train_accuracy=hits.item() / max(seen, 1),
            val_loss=val_loss, val_accuracy=val_accuracy, lr=lr,
            epoch_seconds=time.perf_counter() - started,
            images_per_second=seen / max(train_seconds, 1e-9))
        result.history.append(metrics)
        if on_epoch is not None and on_epoch(metrics):
            result.stopped_early = epoch < epochs
            break
        if checkpoint is not None and epoch < epochs:
            checkpoint(state)
    return result


def _restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
             loader: BatchLoader, result: TrainResult, device: torch.device) -> int:
    """Puts a checkpoint's state back; returns the last epoch it had trained."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    restore_cuda_rng(state.get("cuda_rng"), device)
    loader.epoch = state["epoch"]  # the loader draws each epoch's order from (seed, epoch)
    result.history.extend(EpochMetrics(**m) for m in state["history"])
    return state["epoch"]
