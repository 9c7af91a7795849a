"""Presets: a model and its training settings under one name, the first layer of a run's
configuration (then a config file, then command-line flags).

``model`` holds the keyword arguments of :func:`~iresnet.models.toy_flow` (2-D data) or
:func:`~iresnet.models.image_flow` (images); the rest are fields of
:class:`iresnet.train.TrainConfig`. The paper presets follow the density models of the papers
(docs/presets.md compares their parameter counts with the papers')."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["PRESETS", "steps_per_epoch"]

_TRAINING_IMAGES = {"cifar10": 50_000, "mnist": 60_000, "mnist3x32": 60_000}


def steps_per_epoch(data: str, batch_size: int) -> int:
    r"""Optimiser steps in one pass over a training set: :math:`\lceil N / B \rceil`, as a data
    loader that keeps the last, smaller batch gives (the papers' code does)."""
    return math.ceil(_TRAINING_IMAGES[data] / batch_size)


def _residual_flows(data: str, logit_alpha: float) -> dict[str, Any]:
    """The Residual Flows image density model and its training settings: 350 epochs at batch 64."""
    epoch = steps_per_epoch(data, 64)
    model = {
        "scales": 3,
        "blocks": 16,
        "hidden": 512,
        "coeff": 0.98,
        "activation": "lipswish",
        "logdet": {"name": "roulette", "distribution": "poisson", "rate": 2.0, "memory_efficient": True},
        "logit_alpha": logit_alpha,
        "factor_out": False,
        "fc_blocks": 4,
        "fc_hidden": 128,
    }
    training = {"batch_size": 64, "lr": 1e-3, "warmup_steps": 1000, "grad_clip": 1.0, "ema_decay": 0.999}
    schedule = {"steps": 350 * epoch, "eval_every": 10 * epoch, "checkpoint_every": epoch}
    # the paper's evaluation: 20 exact terms, then the training's Poisson(2) tail, one probe
    evaluation = {"name": "roulette", "n_exact_terms": 20, "distribution": "poisson", "rate": 2.0, "n_probes": 1}
    return {"data": data, "model": model, **training, **schedule, "eval_size": 10_000, "eval_logdet": evaluation}


_CIFAR10_EPOCH = steps_per_epoch("cifar10", 128)  # 391
_MNIST_EPOCH = steps_per_epoch("mnist", 128)  # 469


def _iresnet_evaluation(n_terms: int) -> dict[str, Any]:
    """The i-ResNet code's evaluation: the training's truncated series (biased), one probe."""
    return {"name": "series", "n_terms": n_terms, "n_probes": 1}


def _iresnet_mnist(data: str, squeeze_first: bool) -> dict[str, Any]:
    """The i-ResNet MNIST density model (appendix C: hidden 32, 10 series terms) and its training."""
    return {
        "data": data,
        "model": {
            "scales": 3,
            "blocks": 32,
            "hidden": 32,
            "coeff": 0.9,
            "activation": "elu",
            "logdet": {"name": "series", "n_terms": 10},
            "power_iterations": 5,
            "logit_alpha": None,
            "squeeze_first": squeeze_first,
            "learned_prior": True,
        },
        "steps": 200 * _MNIST_EPOCH,
        "batch_size": 128,
        "lr": 3e-3,
        "optimizer": "adamax",
        "warmup_steps": _MNIST_EPOCH,
        "eval_every": 10 * _MNIST_EPOCH,
        "checkpoint_every": _MNIST_EPOCH,
        "eval_size": 10_000,
        "eval_logdet": _iresnet_evaluation(10),
    }


_DIGITS_FLOW = {
    "scales": 2,
    "blocks": 4,
    "hidden": 64,
    "coeff": 0.9,
    "squeeze_first": True,
    "logit_alpha": 0.05,
    "fc_blocks": 2,
    "fc_hidden": 256,
}
_DIGITS_TRAINING = {
    "steps": 5000,
    "batch_size": 64,
    "lr": 2e-3,
    "warmup_steps": 100,
    "grad_clip": 1.0,
    "ema_decay": 0.999,
}

_PHOTOS_FLOW = {**_DIGITS_FLOW, "scales": 3}  # one more squeeze: 16 x 16 -> 2 x 2, 24 x 24 -> 3 x 3, 32 x 32 -> 4 x 4


def _photos(data: str, steps: int) -> dict[str, Any]:
    """The digits flow and training on a photo data set for ``steps`` steps, evaluated every fifth of them."""
    every = steps // 5
    return {
        "data": data,
        "model": _PHOTOS_FLOW,
        **_DIGITS_TRAINING,
        "steps": steps,
        "eval_every": every,
        "checkpoint_every": every,
    }


_DIGITS_VARIANT = {"data": "digits", **_DIGITS_TRAINING, "eval_every": 1000, "checkpoint_every": 1000}

PRESETS: dict[str, dict[str, Any]] = {
    # the main job: minutes on a CPU, within 0.1 nats of the true entropy
    "toy": {
        "data": "8gaussians",
        "model": {"blocks": 8, "hidden": 64, "depth": 3, "coeff": 0.97, "logdet": "exact"},
        "steps": 3000,
        "batch_size": 256,
        "lr": 5e-3,
        "warmup_steps": 50,
        "ema_decay": 0.99,
        "eval_every": 500,
        "checkpoint_every": 500,
    },
    # minutes on a CPU, beating an independent-pixel and a full-covariance Gaussian baseline
    "digits": {
        "data": "digits",
        "model": _DIGITS_FLOW,
        **_DIGITS_TRAINING,
        "eval_every": 1000,
        "checkpoint_every": 1000,
    },
    # real photographs on a CPU, no download (patches of eight photographs split by photograph, LFW faces). Sized
    # for at most about 15 minutes on 2 cores from the seconds per step on one thread (OMP_NUM_THREADS=1, batch 64,
    # steps 11-30 of a run), t1, taking 2 threads as 1.6 times faster: steps = 900 s * 1.6 / t1, rounded down to
    # hundreds. Measured t1: 0.51 s (patches16), 1.74 s (patches32), 0.64 s (faces), on a machine shared with other
    # jobs; evaluations (every fifth of the run) come on top. Two stop earlier because they overfit: the faces (150
    # training images: a 2,200-step run's test figure was best at step 880, 5.81 bits/dim, and 6.15 at the end) at
    # 900 steps, the 16 x 16 patches (a 2,800-step run's test figure was 4.96 at step 1,120, 4.99 at 1,680 and 5.33
    # at 2,240, its training figure still falling) at 1,400. Measured with --threads 1, two runs side by side on 2
    # cores: 10 min 39 s (patches16), 16 min 11 s (patches32), 7 min 40 s (faces)
    "patches16": _photos("patches16", 1400),
    "patches32": _photos("patches32", 800),
    "faces": _photos("faces", 900),
    # the family on the digits: the digits flow with each kind of block, its widths set for the parameter count
    # closest to the digits preset's (254,222; benchmarks/family_comparison.py), and the same training
    "digits-aol": {**_DIGITS_VARIANT, "model": {**_DIGITS_FLOW, "lipschitz": "aol"}},
    "digits-densenet": {
        **_DIGITS_VARIANT,
        "model": {**_DIGITS_FLOW, "block": "densenet", "hidden": 116, "fc_hidden": 464},
    },
    "digits-monotone": {**_DIGITS_VARIANT, "model": {**_DIGITS_FLOW, "block": "monotone"}},
    "digits-implicit": {
        **_DIGITS_VARIANT,
        "model": {**_DIGITS_FLOW, "block": "implicit", "hidden": 41, "fc_hidden": 164},
    },
    # the i-ResNet classifier on the digits, minutes on a CPU; model.coeff=null gives the ResNet baseline
    "digits-classifier": {
        "task": "classify",
        "data": "digits",
        "model": {"pad_channels": 3, "blocks": [4, 4], "hidden": [32, 64], "coeff": 0.9},
        "steps": 4000,
        "batch_size": 64,
        "lr": 1e-3,
        "warmup_steps": 100,
        "eval_every": 500,
        "checkpoint_every": 500,
    },
    # the hybrid model on the digits: the digits flow without factor-out, its prior a mixture of one Gaussian per
    # class, the classifier Bayes' rule on it (model.classifier=linear: a linear layer on the latent instead);
    # trained on log p(y|x) + lambda log p(x) / D; labelled_fraction=0.1 makes it semi-supervised
    "digits-hybrid": {
        "task": "hybrid",
        "data": "digits",
        "model": {**_DIGITS_FLOW, "factor_out": False, "classifier": "gaussians"},
        "hybrid_lambda": 1.0,
        **_DIGITS_TRAINING,
        "steps": 2000,
        "eval_every": 500,
        "checkpoint_every": 500,
    },
    # the i-ResNet classifier of Behrmann et al. (2019) on CIFAR-10: 13 zero channels padded, 3 stages of 13 blocks
    # (bottleneck widths of the released code's classify_cifar.sh), squeezes to 256 x 8 x 8; SGD 0.1, momentum 0.9,
    # weight decay 5e-4, batch 128, 200 epochs of 391 steps, a 10-epoch warm-up, the rate x 0.2 after epochs 60, 120
    # and 160; crops and flips
    "cifar10-classifier-paper": {
        "task": "classify",
        "data": "cifar10",
        "model": {
            "pad_channels": 13,
            "blocks": [13, 13, 13],
            "hidden": [32, 64, 128],
            "coeff": 0.9,
            "activation": "elu",
            "power_iterations": 1,
        },
        "augment": True,
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "batch_size": 128,
        "steps": 200 * _CIFAR10_EPOCH,
        "warmup_steps": 10 * _CIFAR10_EPOCH,
        "lr_milestones": [60 * _CIFAR10_EPOCH, 120 * _CIFAR10_EPOCH, 160 * _CIFAR10_EPOCH],
        "lr_gamma": 0.2,
        "eval_every": 10 * _CIFAR10_EPOCH,
        "checkpoint_every": _CIFAR10_EPOCH,
        "eval_size": 10_000,
    },
    # Residual Flows (Chen et al., 2019): README commands of rtqichen/residual-flows, train_img.py defaults;
    # 350 epochs at batch 64 (782 steps per CIFAR-10 epoch, 938 per MNIST epoch)
    "cifar10-paper": _residual_flows("cifar10", logit_alpha=0.05),
    "mnist-paper": _residual_flows("mnist", logit_alpha=1e-6),
    # i-ResNet (Behrmann et al., 2019), appendix C: 3 scales of 32 blocks, ELU, c = 0.9, power series,
    # learned prior, Adamax 0.003, 200 epochs (batch 128: 391 steps per CIFAR-10 epoch, 469 per MNIST epoch);
    # evaluated as the released code evaluates, with the training's truncated series (biased: eval_logdet=auto
    # gives the unbiased figure)
    "cifar10-iresnet-paper": {
        "data": "cifar10",
        "model": {
            "scales": 3,
            "blocks": 32,
            "hidden": 512,
            "coeff": 0.9,
            "activation": "elu",
            "logdet": {"name": "series", "n_terms": 5},
            "power_iterations": 5,
            "logit_alpha": None,
            "squeeze_first": True,
            "learned_prior": True,
        },
        "steps": 200 * _CIFAR10_EPOCH,
        "batch_size": 128,
        "lr": 3e-3,
        "optimizer": "adamax",
        "warmup_steps": _CIFAR10_EPOCH,
        "eval_every": 10 * _CIFAR10_EPOCH,
        "checkpoint_every": _CIFAR10_EPOCH,
        "eval_size": 10_000,
        "eval_logdet": _iresnet_evaluation(5),
    },
    "mnist-iresnet-paper": _iresnet_mnist("mnist", squeeze_first=False),
    # the same on MNIST as the released code lays it out (CIFAR_main.py): zero-padded to 32 x 32, the channel
    # three times (D = 3072), squeezed first (its default init_ds=2)
    "mnist3x32-iresnet-paper": _iresnet_mnist("mnist3x32", squeeze_first=True),
}
