#!/usr/bin/env python
"""How much does REAT cost over PGD-AT? And how much faster is the vectorised TAIL than a loop?

Part 1 (epochs): PGD-AT (BSL outer loss, CE PGD-10) and REAT as released (RBL "reference" attack,
TAIL "reference", BSL) are timed in ONE process, interleaved A B A B ... so that slow drifts of a
noisy machine hit both alike. Both use the same architecture, the same initial weights, the same
data (order and augmentation included) and the same seed; every timed epoch starts again from the
initial weights with a fresh optimiser and a fresh trainer built by `art_reat.trainers.METHODS`.
A timed epoch is the trainer's own `train_epoch(0, loader)` on a `DeviceLoader` (attack, training
step, prediction counting) plus `on_epoch_end(0)` (REAT's RBL weight update); both are untimed
once first (warm-up, one batch).

Data: the first N batches' worth of a class-stratified subset (class proportions kept) of
CIFAR-10-LT (UR = 100) read from ``{data_dir}/cifar10/{train,test}.npz``; random uint8 images with
CIFAR-10-LT-distributed labels when the files are missing. N_c are the full CIFAR-10-LT counts.

Part 2 (TAIL): `art_reat.losses.tail_regularizer` (vectorised) against a per-sample Python loop
written here that follows SPEC section 5 literally (for each tail sample i, for each j, the KL),
at B = 128, K = 512, random features, CIFAR-10-LT counts, in both modes ("reference" and
"paper"). Values and gradients are checked to agree (float64) before timing (float32,
forward + backward, which is what a training step pays).

    python benchmarks/reat_overhead.py                      # small-cnn, 4 batches of 128, 3 repeats
    python benchmarks/reat_overhead.py --model resnet18 --batches 2 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from art_reat.config import TrainConfig
from art_reat.data import DeviceLoader, class_groups, load_dataset, long_tailed_counts, stratified_split
from art_reat.errors import ArtReatError if False else None  # noqa: F401  (placeholder, replaced below)
