"""`dry_run=true`: build the smallest and the largest model the space allows and push one
training batch through each, so a space that cannot work (a feature map shrunk to nothing, a
width that does not fit in memory) is reported before a single trial is spent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from search.config.errors import SearchError
from search.config.params import PARAMS, trainer_settings
from search.config.space import ParamSpec, walk
from search.training.images import DatasetSpec
from search.training.loop import Speed, autocast_context, build_optimizer
from search.training.models import build_model, count_parameters


def extreme_params(space: Sequence[ParamSpec], largest: bool) -> dict[str, Any]:
    """Each size-like parameter at its smallest or largest value; the rest at their first choice."""
    def choose(spec: ParamSpec, params: dict[str, Any]) -> Any:
        sized = PARAMS[spec.name].grows_model
        if spec.kind == "categorical":
            numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in spec.choices)
            if sized and numeric:
                return max(spec.choices) if largest else min(spec.choices)
            return spec.choices[0]
        low, high = spec.bounds(params)
        if sized:
            value = high if largest else low
        else:  # a middle value: the extremes of lr or dropout say nothing about size
            value = (low * high) ** 0.5 if spec.log else (low + high) / 2
        return round(value) if spec.kind == "int" else value
    return walk(space, choose)


def check_model(model_name: str, params: dict[str, Any], spec: DatasetSpec,
                device: torch.device) -> dict[str, Any]:
    """One forward/backward/step at the space's batch size; returns what it measured."""
    settings = trainer_settings(params)
    batch_size = settings["batch_size"]
    try:
        model = build_model(model_name, params, in_channels=spec.channels,
                            image_size=spec.image_size, num_classes=spec.num_classes).to(device)
        images = torch.randn(batch_size, spec.channels, spec.image_size, spec.image_size, device=device)
        labels = torch.randint(0, spec.num_classes, (batch_size,), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        optimizer = build_optimizer(model, params, settings=settings)
        # The precision trials will train in on this device (bf16, fp16 with loss scaling, or
        # fp32: `Speed.for_device`), so the memory measured is what a trial needs.
        precision = Speed.for_device(device).precision
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        with autocast_context(device, precision):
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    except SearchError:
        raise
    except RuntimeError as error:
        raise SearchError(f"dry run: the model with {params} cannot train on "
                          f"{spec.name} at batch size {batch_size}: {str(error).splitlines()[0]}") from None
    report = {"parameter_count": count_parameters(model), "loss": loss.item(),
              "precision": precision}
    if device.type == "cuda":
        report["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report


def dry_run(model_name: str, space: Sequence[ParamSpec], spec: DatasetSpec,
            device: torch.device) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Checks both extremes; raises SearchError naming the failing configuration."""
    results = []
    for label, largest in (("smallest", False), ("largest", True)):
        params = extreme_params(space, largest)
        results.append((label, params, check_model(model_name, params, spec, device)))
    return results
