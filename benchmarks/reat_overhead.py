#!/usr/bin/env python
"""How much does REAT cost over PGD-AT? And how much faster is the vectorised TAIL than a loop?

Part 1 (epochs): PGD-AT (BSL outer loss, CE PGD-10) and REAT as released (RBL "reference" attack,
TAIL "reference", BSL) are timed in ONE process, interleaved A B A B ... so that slow drifts of a
noisy machine hit both alike. Both use the same architecture, the same initial weights, the same
data (order and augmentation included) and the same seed; every timed epoch starts again from the
initial weights with a fresh optimiser and a fresh trainer built by `art_reat.trainers.METHODS`
(exactly as `art-reat train` builds them). A timed epoch is the trainer's own
`train_epoch(0, loader)` on a `DeviceLoader` (attack, training step, prediction counting) plus
`on_epoch_end(0)` (REAT's RBL weight update). Each method first runs one untimed one-batch epoch
(warm-up).

Data: the first N batches' worth of a class-stratified subset (class proportions kept) of
CIFAR-10-LT (UR = 100), read from ``{data_dir}/cifar10/{train,test}.npz``; random uint8 images
with CIFAR-10-LT-distributed labels when those files are missing. N_c (RBL and TAIL weights, BSL)
are the counts of the full CIFAR-10-LT training set.

Part 2 (TAIL): `art_reat.losses.tail_regularizer_core` (vectorised, the training path) against a per-sample Python loop
written here that follows SPEC section 5 literally (for each tail sample i, for each j, the KL),
at B = 128, K = 512, random features, CIFAR-10-LT counts, in both modes ("reference" and "paper").
Values and gradients are checked to agree (float64) before timing; the timing is float32,
forward + backward (what a training step pays). Labels are drawn from the CIFAR-10-LT class
distribution (few tail samples, as in training) and, as a second case, uniformly (many tail
samples); the target is checked on the first (the smaller ratio: the loop's cost grows with S).

    python benchmarks/reat_overhead.py                      # small-cnn, 4 batches of 128, 3 repeats
    python benchmarks/reat_overhead.py --model resnet18 --batches 2 --repeats 2
"""

from __future__ import annotations

import argparse
from pathlib import Path
import datetime as _dt
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

from machine_info import cpu_model  # benchmarks/machine_info.py (the script's folder is on sys.path)

import numpy as np
import torch
import torch.nn.functional as F

from art_reat.config import TrainConfig
from art_reat.data import DeviceLoader, class_groups, load_dataset, long_tailed_counts, stratified_split
from art_reat.errors import DataError
from art_reat.losses import build_loss, tail_class_weights, tail_regularizer_core
from art_reat.models import build_model
from art_reat.trainers import METHODS, MethodParts

EPOCH_TARGET = 1.03  # REAT / PGD-AT seconds per epoch, at most
TAIL_TARGET = 50.0  # loop / vectorised TAIL time, at least
NUM_CLASSES = 10
INPUT_SHAPE = (3, 32, 32)

METHOD_CONFIGS = {
    # name shown -> TrainConfig overrides (everything else: the defaults of `art-reat train`)
    "pgd-at": dict(method="pgd-at", loss="bsl"),
    "reat": dict(method="reat", loss="bsl", rbl="reference", tail="reference", tail_weight=1.0),
}


# ----------------------------------------------------------------------------- environment


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def machine_lines(device: torch.device) -> List[str]:
    lines = [
        f"date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}",
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, {platform.platform()}",
        f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]
    return lines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- data


def benchmark_data(data_dir: str, n: int, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(x uint8 NHWC [n], y [n], full CIFAR-10-LT train counts, description)."""
    rng = np.random.RandomState(seed)
    try:
        splits = load_dataset("cifar10lt", data_dir, ur=100, seed=seed)
    except DataError as exc:
        counts = np.asarray(long_tailed_counts(5000, NUM_CLASSES, 100), dtype=np.int64)
        y = rng.choice(NUM_CLASSES, size=n, p=counts / counts.sum()).astype(np.int64)
        x = rng.randint(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        return x, y, counts, f"random uint8 images, CIFAR-10-LT-distributed labels ({exc})"
    y_all = splits.y_train
    if n > len(y_all):
        raise SystemExit(f"--batches x --batch-size = {n} is more than the {len(y_all)} CIFAR-10-LT images")
    # a stratified subset that keeps the long-tailed class proportions (every class at least once)
    _, held = stratified_split(y_all, min(n / len(y_all), 0.999), seed=seed)
    if len(held) < n:  # rounding: top up with random other images
        rest = np.setdiff1d(np.arange(len(y_all)), held)
        held = np.concatenate([held, rng.choice(rest, n - len(held), replace=False)])
    pick = rng.permutation(held)[:n]
    desc = (f"CIFAR-10-LT UR=100 from {os.path.join(data_dir, 'cifar10')}: stratified subset of {n} "
            f"of {len(y_all)} images")
    return splits.x_train[pick], splits.y_train[pick], splits.train_counts, desc


# ----------------------------------------------------------------------------- part 1: epochs


def make_trainer(method: str, model_name: str, init_state: dict, counts: np.ndarray, batch_size: int,
                 device: torch.device):
    config = TrainConfig(model=model_name, batch_size=batch_size, eps=8 / 255, step_size=2 / 255,
                         attack_steps=10, device=str(device), **METHOD_CONFIGS[method]).validate()
    model = build_model(model_name, num_classes=NUM_CLASSES, in_channels=INPUT_SHAPE[0]).to(device)
    model.load_state_dict(init_state)
    loss = build_loss(config.loss, counts)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    parts = MethodParts(model, loss, optimizer, NUM_CLASSES, counts, INPUT_SHAPE, device)
    return METHODS.get(config.method)(config, parts, scheduler=None, checkpoint_dir=None)


def timed_epoch(method: str, args, init_state: dict, counts: np.ndarray, loader: DeviceLoader,
                device: torch.device) -> Tuple[float, float, Dict[str, float]]:
    """(wall seconds, process CPU seconds, metrics) of one epoch from the initial weights."""
    trainer = make_trainer(method, args.model, init_state, counts, args.batch_size, device)
    torch.manual_seed(args.seed)  # the attack's random start draws from the global generator
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = trainer.train_epoch(0, loader)
    metrics.update(trainer.on_epoch_end(0))
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, metrics


def bench_epochs(args, device: torch.device) -> Dict[str, object]:
    n = args.batches * args.batch_size
    x, y, counts, desc = benchmark_data(args.data_dir, n, args.seed)
    print(f"data: {desc}")
    print(f"      labels per class in the benchmark subset: {np.bincount(y, minlength=NUM_CLASSES).tolist()}")
    print(f"      N_c (full training set): {counts.tolist()}")
    torch.manual_seed(args.seed)
    init_state = {k: v.clone() for k, v in build_model(args.model, num_classes=NUM_CLASSES).state_dict().items()}
    loader = DeviceLoader(x, y, args.batch_size, device, augment=True, shuffle=True, seed=args.seed)
    warm = DeviceLoader(x[: args.batch_size], y[: args.batch_size], args.batch_size, device,
                        augment=True, shuffle=True, seed=args.seed)
    methods = list(METHOD_CONFIGS)
    for method in methods:
        seconds, _, _ = timed_epoch(method, args, init_state, counts, warm, device)
        print(f"warm-up {method}: {seconds:.2f} s (1 batch)")
    times: Dict[str, List[float]] = {m: [] for m in methods}
    cpu_times: Dict[str, List[float]] = {m: [] for m in methods}
    last_metrics: Dict[str, Dict[str, float]] = {}
    for r in range(args.repeats):
        for method in methods:  # A B A B ...
            seconds, cpu_seconds, metrics = timed_epoch(method, args, init_state, counts, loader, device)
            times[method].append(seconds)
            cpu_times[method].append(cpu_seconds)
            last_metrics[method] = metrics
            print(f"repeat {r + 1}/{args.repeats} {method}: {seconds:.3f} s/epoch "
                  f"({seconds / args.batches:.3f} s/batch; process CPU {cpu_seconds:.3f} s), "
                  f"train loss {metrics['train/loss']:.4f}, load average {os.getloadavg()[0]:.2f}")
    a, b = times["pgd-at"], times["reat"]
    ratio_of_medians = statistics.median(b) / statistics.median(a)
    paired = [tb / ta for ta, tb in zip(a, b)]
    return {"times": times, "cpu_times": cpu_times, "ratio": ratio_of_medians,
            "ratio_min": min(b) / min(a),
            "cpu_ratio": statistics.median(cpu_times["reat"]) / statistics.median(cpu_times["pgd-at"]),
            "paired_ratio": statistics.median(paired),
            "paired": paired, "tail_term": last_metrics["reat"].get("train/loss_tail"),
            "adv_pred": [last_metrics["reat"].get(f"adv_pred/class_{c}") for c in range(NUM_CLASSES)]}


# ----------------------------------------------------------------------------- part 2: TAIL


def tail_loop(features: torch.Tensor, labels: Sequence[int], counts: Sequence[float], mode: str,
              tail_classes: Sequence[int]) -> torch.Tensor:
    """SPEC section 5 written out sample by sample (the slow, literal reading)."""
    batch, k_dim = features.shape
    total = float(sum(counts))
    omega = [math.sqrt(total / float(n)) for n in counts]
    tail_set = set(int(c) for c in tail_classes)
    labels = [int(v) for v in labels]
    log_p = [F.log_softmax(features[j], dim=0) for j in range(batch)]  # one sample at a time
    p = [lp.exp() for lp in log_p]
    tail = [i for i in range(batch) if labels[i] in tail_set]
    if not tail:
        return (features * 0.0).sum()
    r = features.new_zeros(())
    for i in tail:
        if mode == "paper":
            # R = R - (1/B) sum_j s_ij W_ij KL(p_j || p_i), KL(p_j||p_i) = sum_k p_jk log(p_jk / p_ik)
            for j in range(batch):
                s_ij = -1.0 if labels[i] == labels[j] else 1.0
                w_ij = omega[labels[i]] + omega[labels[j]]
                kl = (p[j] * (log_p[j] - log_p[i])).sum()
                r = r - (s_ij * w_ij / batch) * kl
        else:
            # released code: KLbar_i = (1/(B K)) sum_j sum_k p_ik (log p_ik - log q_jk), p_i detached,
            # c_i = (1/B) sum_j s_ij W_ij, TAIL += KLbar_i * c_i
            log_anchor = log_p[i].detach()
            anchor = log_anchor.exp()
            kl_sum = features.new_zeros(())
            c_i = 0.0
            for j in range(batch):
                kl_sum = kl_sum + (anchor * (log_anchor - log_p[j])).sum()
                c_i += (-1.0 if labels[i] == labels[j] else 1.0) * (omega[labels[i]] + omega[labels[j]])
            r = r + (kl_sum / (batch * k_dim)) * (c_i / batch)
    return r / len(tail)


def _draw_labels(gen: torch.Generator, batch: int, probs: torch.Tensor, tail: Sequence[int]) -> torch.Tensor:
    while True:  # "labels with tail samples": redraw a batch with none (rare at B = 128)
        labels = torch.multinomial(probs, batch, replacement=True, generator=gen)
        if bool(torch.isin(labels, torch.tensor(list(tail))).any()):
            return labels


def _time_fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        f = feats.detach().requires_grad_(True)
        fn(f).backward()
    return (time.perf_counter() - start) / number


def _time_fwd(fn: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor, number: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(number):
            fn(feats)
        return (time.perf_counter() - start) / number


def bench_tail(args, counts: np.ndarray) -> List[Dict[str, object]]:
    batch, k_dim = 128, 512
    tail = class_groups(NUM_CLASSES, "reference")["tail"]
    gen = torch.Generator().manual_seed(args.seed)
    counts_list = [float(c) for c in counts]
    rows = []
    label_cases = {"lt": torch.tensor(counts_list) / sum(counts_list), "uniform": torch.full((NUM_CLASSES,), 0.1)}
    for case, probs in label_cases.items():
        labels = _draw_labels(gen, batch, probs, tail)
        num_tail = int(torch.isin(labels, torch.tensor(tail)).sum())
        feats = torch.randn(batch, k_dim, generator=gen)
        for mode in ("reference", "paper"):
            # the training path: constants precomputed once, as TAILPyTorchClassifier does
            omega_c = tail_class_weights(counts)
            tail_mask = torch.zeros(NUM_CLASSES, dtype=torch.bool)
            tail_mask[tail] = True

            def vec(f, mode=mode, labels=labels, omega_c=omega_c, tail_mask=tail_mask):
                return tail_regularizer_core(f, labels, omega_c, tail_mask, mode=mode)

            def loop(f, mode=mode, labels=labels):
                return tail_loop(f, labels.tolist(), counts_list, mode, tail)

            # same value and same gradient (float64, so the comparison is tight)
            f64a = feats.double().requires_grad_(True)
            f64b = feats.double().requires_grad_(True)
            v_vec, v_loop = vec(f64a), loop(f64b)
            v_vec.backward()
            v_loop.backward()
            assert torch.allclose(v_vec, v_loop, rtol=1e-9, atol=1e-12), (case, mode, v_vec.item(), v_loop.item())
            assert torch.allclose(f64a.grad, f64b.grad, rtol=1e-7, atol=1e-12), (case, mode, "gradient")
            # float32 timing, interleaved vec / loop. Samples are kept short (the vectorised form runs
            # 10 times per sample, a few ms) so that some of them fall between other processes' slices
            # on a shared machine: the minima then estimate the undisturbed cost.
            _time_fwd_bwd(vec, feats, 20)
            _time_fwd_bwd(loop, feats, 1)
            number = 10
            t_vec, t_loop, f_vec, f_loop = [], [], [], []
            for _ in range(args.tail_repeats):
                t_vec.append(_time_fwd_bwd(vec, feats, number))
                t_loop.append(_time_fwd_bwd(loop, feats, 1))
                f_vec.append(_time_fwd(vec, feats, number))
                f_loop.append(_time_fwd(loop, feats, 1))
            fwd_vec, fwd_loop = statistics.median(f_vec), statistics.median(f_loop)
            row = {"labels": case, "S": num_tail, "mode": mode, "value": v_vec.item(),
                   "vec": statistics.median(t_vec), "loop": statistics.median(t_loop),
                   "fwd_vec": fwd_vec, "fwd_loop": fwd_loop}
            row["ratio"] = row["loop"] / row["vec"]
            row["paired_ratio"] = statistics.median(tl / tv for tv, tl in zip(t_vec, t_loop))
            row["ratio_min"] = min(t_loop) / min(t_vec)
            rows.append(row)
            print(f"TAIL {mode:9s} labels={case:7s} S={num_tail:3d}: vectorised {row['vec'] * 1e3:8.3f} ms, "
                  f"loop {row['loop'] * 1e3:9.1f} ms, loop/vectorised {row['ratio']:7.1f}x "
                  f"(median of pairs {row['paired_ratio']:.1f}x, ratio of minima {row['ratio_min']:.1f}x) "
                  f"(forward only: {fwd_vec * 1e3:.3f} ms vs {fwd_loop * 1e3:.1f} ms); value {row['value']:.6g}")
    return rows


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small-cnn", choices=["small-cnn", "resnet18"])
    parser.add_argument("--batches", type=int, default=4, help="batches per timed epoch (default 4)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per method (default 3)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                        help="holds cifar10/{train,test}.npz; random data when missing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tail-repeats", type=int, default=15, help="timed samples of the TAIL micro-benchmark")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads(N) first; 0 (default) keeps torch's default")
    parser.add_argument("--skip-epochs", action="store_true", help="only the TAIL micro-benchmark")
    parser.add_argument("--skip-tail", action="store_true", help="only the epoch benchmark")
    args = parser.parse_args(argv)
    for name in ("batches", "batch_size", "repeats", "tail_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    print("# REAT overhead benchmark")
    for line in machine_lines(device):
        print(line)
    print(f"load average at start (1/5/15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())} "
          "(other processes share these cores; compare ratios, not absolute seconds)")
    print(f"command: python benchmarks/reat_overhead.py --model {args.model} --batches {args.batches} "
          f"--batch-size {args.batch_size} --repeats {args.repeats} --device {args.device} --seed {args.seed}"
          + (f" --threads {args.threads}" if args.threads else "") + (" --skip-epochs" if args.skip_epochs else "")
          + (" --skip-tail" if args.skip_tail else ""))
    print()

    counts = None
    if not args.skip_epochs:
        res = bench_epochs(args, device)
        a, b = res["times"]["pgd-at"], res["times"]["reat"]
        print()
        print("| method | median s/epoch | min s/epoch | all repeats (s, in run order) | median s/batch "
              "| median process CPU s/epoch |")
        print("|---|---|---|---|---|---|")
        for key, name in (("pgd-at", "PGD-AT (BSL, PGD-10)"), ("reat", "REAT (RBL ref, TAIL ref, BSL)")):
            t, c = res["times"][key], res["cpu_times"][key]
            print(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f} | "
                  f"{', '.join(f'{v:.3f}' for v in t)} | {statistics.median(t) / args.batches:.3f} "
                  f"| {statistics.median(c):.3f} |")
        print()
        verdict = "met" if res["ratio"] <= EPOCH_TARGET else "NOT met"
        print(f"REAT / PGD-AT (ratio of medians): {res['ratio']:.4f}  (target <= {EPOCH_TARGET}: {verdict})")
        print(f"REAT / PGD-AT (median of the {len(res['paired'])} interleaved pairs): {res['paired_ratio']:.4f}  "
              f"[{', '.join(f'{v:.4f}' for v in res['paired'])}]")
        print(f"REAT / PGD-AT (ratio of minima): {res['ratio_min']:.4f}; "
              f"(ratio of median process CPU seconds): {res['cpu_ratio']:.4f}")
        print(f"REAT last epoch: mean TAIL term {res['tail_term']}, adversarial predictions per class "
              f"{[int(v) for v in res['adv_pred']]}")
        print()
    if not args.skip_tail:
        if counts is None:
            counts = np.asarray(long_tailed_counts(5000, NUM_CLASSES, 100), dtype=np.int64)
        print(f"TAIL micro-benchmark: B=128, K=512, float32 forward+backward, N_c={counts.tolist()}, "
              f"tail classes {class_groups(NUM_CLASSES, 'reference')['tail']}, median of {args.tail_repeats}")
        rows = bench_tail(args, counts)
        print()
        print("| mode | labels | tail samples S | vectorised ms | loop ms | loop / vectorised (medians) "
              "| ratio of minima | fwd only: vectorised ms | fwd only: loop ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['mode']} | {row['labels']} | {row['S']} | {row['vec'] * 1e3:.3f} | "
                  f"{row['loop'] * 1e3:.1f} | {row['ratio']:.0f}x | {row['ratio_min']:.0f}x | {row['fwd_vec'] * 1e3:.3f} | {row['fwd_loop'] * 1e3:.1f} |")
        worst = min(r["ratio"] for r in rows if r["labels"] == "lt")
        verdict = "met" if worst >= TAIL_TARGET else "NOT met"
        print(f"smallest loop/vectorised ratio with CIFAR-10-LT labels: {worst:.0f}x "
              f"(target >= {TAIL_TARGET:.0f}x: {verdict}); values and gradients agree (float64)")
    print(f"load average at end (1/5/15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
