"""Trains one configuration epoch by epoch. Knows nothing of Optuna or MLflow: callers pass an
`on_epoch` callback that sees each epoch's metrics and may ask training to stop (that is how the
objective wires in pruning and logging, and how `search.train` and the report retrain models).

Fast paths, each switched on only where it pays: data stays on the training device (`BatchLoader`),
CUDA runs in bf16 autocast with channels_last tensors, and the loop never synchronises with the
host inside an epoch (losses and hits are summed on the device and read once per epoch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from search.augment import BatchLoader
from search.data import DatasetSpec, ImageSet
from search.errors import SearchError
from search.models import build_model, count_parameters

EVAL_BATCH_SIZE = 1024


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: this configuration cannot train, other trials can."""


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int                       # 1-based: the number of epochs trained so far
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    epoch_seconds: float
    images_per_second: float

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "epoch"}


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochMetrics] = field(default_factory=list)
    parameter_count: int = 0
    stopped_early: bool = False

    @property
    def best_epoch(self) -> int | None:
        scored = [m for m in self.history if m.val_accuracy is not None]
        return max(scored, key=lambda m: m.val_accuracy).epoch if scored else None

    @property
    def best_val_accuracy(self) -> float | None:
        scored = [m.val_accuracy for m in self.history if m.val_accuracy is not None]
        return max(scored) if scored else None


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when present; asking for CUDA where there is none is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SearchError(f"device={name}: CUDA is not available on this machine; use device=cpu or auto.")
    return torch.device(name)


def build_optimizer(model: nn.Module, params: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer named in `params`, with its own conditional parameters when sampled.

    Weight decay is applied to conv/linear weights only: decaying BN scales and biases
    only hurts, a standard trick in fast CIFAR training.
    """
    name = params.get("optimizer", "sgd")
    lr = float(params.get("lr", 0.01))
    weight_decay = float(params.get("weight_decay", 0.0))
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        momentum = float(params.get("momentum", 0.9))
        return torch.optim.SGD(groups, lr=lr, momentum=momentum,
                               nesterov=bool(params.get("nesterov", False)) and momentum > 0)
    if name in ("adam", "adamw"):
        betas = (float(params.get("beta1", 0.9)), float(params.get("beta2", 0.999)))
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(groups, lr=lr, betas=betas)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=float(params.get("alpha", 0.99)),
                                   momentum=float(params.get("momentum", 0.0)))
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    raise SearchError(f"optimizer={name!r}: unknown; allowed: sgd, adam, adamw, rmsprop, adagrad.")


def build_schedule(optimizer: torch.optim.Optimizer, params: Mapping[str, Any], epochs: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedules over the full epoch budget, so a pruned trial saw the same curve
    as the complete one would have up to that epoch."""
    name = params.get("schedule", "none")
    total = max(1, epochs * steps_per_epoch)
    if name == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif name == "step":
        gamma = float(params.get("gamma", 0.1))
        every = max(1, int(params.get("step_size", max(1, epochs // 3)))) * steps_per_epoch
        factor = lambda step: gamma ** (step // every)  # noqa: E731
    elif name == "none":
        factor = lambda step: 1.0  # noqa: E731
    else:
        raise SearchError(f"schedule={name!r}: unknown; allowed: none, cosine, step.")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy over a loader, with one host synchronisation at the end."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    with torch.inference_mode(), _autocast(device):
        for images, labels in loader:
            logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            hits += (logits.argmax(1) == labels).sum()
    count = loader.num_examples
    return loss_sum.item() / count, hits.item() / count


def predict(model: nn.Module, loader: BatchLoader, device: torch.device, *,
            features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels (or penultimate features) and true labels, for confusion matrices and t-SNE."""
    model.eval()
    outputs, targets = [], []
    with torch.inference_mode(), _autocast(device):
        for images, labels in loader:
            out = model.forward_features(images) if features else model(images).argmax(1)
            outputs.append(out.float().cpu())
            targets.append(labels.cpu())
    return torch.cat(outputs), torch.cat(targets)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); plain fp32 on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_loader(data: ImageSet, spec: DatasetSpec, device: torch.device, *, batch_size: int,
                train: bool, seed: int = 0, augment: bool = False) -> BatchLoader:
    return BatchLoader(
        data, batch_size=batch_size, device=device, mean=spec.mean, std=spec.std,
        augment=augment and train, shuffle=train, seed=seed,
        channels_last=device.type == "cuda",
        # A last batch of one image breaks BatchNorm in training; dropping it costs < 1 batch.
        drop_last=train and len(data) > batch_size)


def train(model_name: str, params: Mapping[str, Any], *, train_data: ImageSet,
          val_data: ImageSet | None, spec: DatasetSpec, epochs: int, seed: int,
          device: str | torch.device = "auto",
          on_epoch: Callable[[EpochMetrics], bool] | None = None) -> TrainResult:
    """Trains for up to `epochs`; `on_epoch` returning True stops training after that epoch.

    Raises:
        TrainingDiverged: the training loss became NaN or infinite.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    torch.manual_seed(seed)
    batch_size = int(params.get("batch_size", 128))
    model = build_model(model_name, params, in_channels=spec.channels,
                        image_size=spec.image_size, num_classes=spec.num_classes)
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    train_loader = make_loader(train_data, spec, device, batch_size=batch_size, train=True,
                               seed=seed, augment=bool(params.get("augment", False)))
    val_loader = (make_loader(val_data, spec, device, batch_size=EVAL_BATCH_SIZE, train=False)
                  if val_data is not None else None)
    optimizer = build_optimizer(model, params)
    schedule = build_schedule(optimizer, params, epochs, len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=float(params.get("label_smoothing", 0.0)))
    result = TrainResult(model=model, parameter_count=count_parameters(model))

    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        loss_sum = torch.zeros((), device=device)
        hits = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for images, labels in train_loader:
            with _autocast(device):
                logits = model(images)
                loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * labels.shape[0]
            hits += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
        train_loss = loss_sum.item() / max(seen, 1)  # the epoch's one host synchronisation
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch} (lr={lr:g})")
        train_seconds = time.perf_counter() - started
        val_loss, val_accuracy = (evaluate(model, val_loader, device) if val_loader else (None, None))
        metrics = EpochMetrics(
            epoch=epoch, train_loss=train_loss, train_accuracy=hits.item() / max(seen, 1),
            val_loss=val_loss, val_accuracy=val_accuracy, lr=lr,
            epoch_seconds=time.perf_counter() - started,
            images_per_second=seen / max(train_seconds, 1e-9))
        result.history.append(metrics)
        if on_epoch is not None and on_epoch(metrics):
            result.stopped_early = epoch < epochs
            break
    return result
