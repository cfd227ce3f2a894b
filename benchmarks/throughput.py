"""Adversarial-training and evaluation throughput: art-reat against ART's stock path and bare PyTorch.

Times, in one run and interleaved (a, b, c, d, e, f, a, b, ...) so that machine noise hits every
variant alike, on the same model, data and PGD settings:

  (a) ART's stock AdversarialTrainerMadryPGD.fit, configured as a user would (PGD-10)
  (b) art-reat's PGDATTrainer.train_epoch (PGD-10)
  (c) art-reat's REATTrainer.train_epoch (released behaviour: reference RBL + reference TAIL, BSL)
  (d) a bare PyTorch loop with input-only gradients (the practical limit)
  (e) ART ProjectedGradientDescent.generate, PGD-20
  (f) art-reat TensorPGD.generate, PGD-20

and prints seconds per batch (median over repeats), the ratios b/a, b/d, c/b, f/e, and peak memory.

    python benchmarks/throughput.py --model resnet18 --batches 3
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small-cnn", help="resnet18, small-cnn, ... (the art-reat registry)")
    p.add_argument("--batches", type=int, default=3, help="batches per measurement")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up round (slow models)")
    return p.parse_args()


def main() -> None:
    from art.attacks.evasion import ProjectedGradientDescent
    from art.defences.trainer import AdversarialTrainerMadryPGD

    from art_reat.attacks import TensorPGD
    from art_reat.data import DeviceLoader, class_groups
    from art_reat.estimators import LongTailClassifier, TAILPyTorchClassifier
    from art_reat.losses import build_loss
    from art_reat.models import build_model
    from art_reat.trainers import PGDATTrainer, REATTrainer

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    n = args.batches * args.batch_size
    num_classes = 10
    counts = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])  # CIFAR-10-LT UR=100
    x_uint8 = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, num_classes, size=n).astype(np.int64)
    x_float = np.ascontiguousarray(x_uint8.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    eps, step = 8 / 255, 2 / 255
    base_model = build_model(args.model, num_classes)
    initial = copy.deepcopy(base_model.state_dict())

    def fresh(cls=LongTailClassifier, **kwargs):
        model = build_model(args.model, num_classes)
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return cls(model.to(device), build_loss("bsl", counts), num_classes, input_shape=(3, 32, 32),
                   optimizer=optimizer, device=device, **kwargs)

    def loader():
        return DeviceLoader(x_uint8, y, args.batch_size, device, augment=False, shuffle=True, seed=args.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def art_trainer():
        clf = fresh()
        trainer = AdversarialTrainerMadryPGD(clf, nb_epochs=1, batch_size=args.batch_size, eps=eps, eps_step=step,
                                             max_iter=10)
        trainer.attack.set_params(verbose=False)
        trainer.trainer._attacks[0].set_params(verbose=False) if hasattr(trainer.trainer, "_attacks") else None
        return lambda: trainer.fit(x_float, y, nb_epochs=1, batch_size=args.batch_size)

    def our_trainer():
        trainer = PGDATTrainer(fresh(), nb_epochs=1, batch_size=args.batch_size, eps=eps, eps_step=step, max_iter=10)
        data = loader()
        return lambda: trainer.train_epoch(0, data)

    def reat_trainer():
        clf = fresh(TAILPyTorchClassifier, train_counts=counts, tail_mode="reference",
                    tail_classes=class_groups(num_classes, "reference")["tail"])
        trainer = REATTrainer(clf, train_counts=counts, rebalance="reference", nb_epochs=1,
                              batch_size=args.batch_size, eps=eps, eps_step=step, max_iter=10)
        data = loader()

        def run():
            trainer.train_epoch(0, data)
            trainer.on_epoch_end(0)  # the per-epoch weight update is part of REAT's cost
        return run

    def bare_loop():
        clf = fresh()
        model, optimizer, loss_fn = clf.model, clf.optimizer, clf.loss_fn
        data = loader()

        def run():
            for xb, yb in data:
                model.eval()
                x_adv = xb + torch.empty_like(xb).uniform_(-eps, eps)
                for _ in range(10):
                    x_adv.requires_grad_(True)
                    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), yb), x_adv)
                    x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), xb - eps), xb + eps).clamp(0, 1)
                model.train()
                loss = loss_fn(model(x_adv), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return run

    def art_pgd20():
        clf = fresh()
        attack = ProjectedGradientDescent(clf, eps=eps, eps_step=step, max_iter=20, num_random_init=1,
                                          batch_size=args.batch_size, verbose=False)
        return lambda: attack.generate(x_float, y)

    def our_pgd20():
        attack = TensorPGD(fresh(), eps=eps, eps_step=step, max_iter=20, batch_size=args.batch_size)
        return lambda: attack.generate(x_float, y)

    variants = {"a": ("ART AdversarialTrainerMadryPGD (PGD-10)", art_trainer),
                "b": ("art-reat PGDATTrainer (PGD-10)", our_trainer),
                "c": ("art-reat REATTrainer (PGD-10, RBL+TAIL)", reat_trainer),
                "d": ("bare PyTorch loop, input-only grads (PGD-10)", bare_loop),
                "e": ("ART ProjectedGradientDescent.generate (PGD-20)", art_pgd20),
                "f": ("art-reat TensorPGD.generate (PGD-20)", our_pgd20)}
    runs = {key: build() for key, (_, build) in variants.items()}
    times = {key: [] for key in variants}
    peaks = {}
    for key, run in runs.items():  # warm-up (allocator, lazy init), not timed
        if not args.no_warmup:
            run()
    for _ in range(args.repeats):
        for key, run in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[key].append((time.perf_counter() - start) / args.batches)
            if device.type == "cuda":
                peaks[key] = torch.cuda.max_memory_allocated(device) / 2**20

    per_batch = {key: statistics.median(v) for key, v in times.items()}
    print(f"# throughput: {args.model}, batch {args.batch_size}, {args.batches} batches x {args.repeats} repeats "
          f"(interleaved{'' if args.no_warmup else ', after a warm-up round'}), device {device}")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {datetime.datetime.now().isoformat(timespec='minutes')}")
    print(f"{'variant':<50}{'s/batch':>10}" + (f"{'peak MiB':>10}" if peaks else ""))
    for key, (label, _) in variants.items():
        print(f"({key}) {label:<46}{per_batch[key]:>10.3f}" + (f"{peaks[key]:>10.0f}" if peaks else ""))
    if not peaks:
        print(f"peak resident memory of the whole process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    ratios = [("a/b", "art-reat trainer speed-up over ART's trainer (target >= 1.35)", per_batch["a"] / per_batch["b"]),
              ("b/d", "art-reat trainer time over the bare loop (target <= 1.05)", per_batch["b"] / per_batch["d"]),
              ("c/b", "REAT time over PGD-AT (target <= 1.03)", per_batch["c"] / per_batch["b"]),
              ("e/f", "art-reat PGD-20 speed-up over ART's PGD-20 (target >= 1.4)", per_batch["e"] / per_batch["f"])]
    for name, label, value in ratios:
        print(f"{name}: {value:.3f}  {label}")


if __name__ == "__main__":
    main()
