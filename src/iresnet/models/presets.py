"""Presets: a model and its training settings under one name, the first layer of a run's
configuration (then a config file, then command-line flags).

``model`` holds the keyword arguments of :func:`~iresnet.models.toy_flow` (2-D data) or
:func:`~iresnet.models.image_flow` (images); the rest are fields of
:class:`iresnet.train.TrainConfig`. The paper presets follow the density models of the papers
(docs/presets.md compares their parameter counts with the papers')."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    # the main job: minutes on a CPU, within 0.1 nats of the true entropy
    "toy": {
        "data": "8gaussians",
        "model": {"blocks": 8, "hidden": 64, "depth": 3, "coeff": 0.9, "logdet": "exact"},
        "steps": 1500,
        "batch_size": 256,
        "lr": 3e-3,
        "warmup_steps": 50,
        "ema_decay": 0.99,
        "eval_every": 250,
        "checkpoint_every": 250,
    },
    "digits": {
        "data": "digits",
        "model": {"scales": 2, "blocks": 4, "hidden": 64, "coeff": 0.9, "squeeze_first": True, "logit_alpha": 0.05},
        "steps": 3000,
        "batch_size": 64,
        "lr": 2e-3,
        "warmup_steps": 100,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "eval_every": 500,
        "checkpoint_every": 500,
    },
}
