"""Adversarial-training and evaluation throughput: art-reat against ART's stock path and bare PyTorch.

Times, in one run and interleaved (a, b, c, d, e, f, a, b, ...) so that machine noise hits every
variant alike, on the same model, data and PGD settings:

  (a) ART's stock AdversarialTrainerMadryPGD.fit, configured as a user would (PGD-10)
  (b) art-reat's PGDATTrainer.train_epoch (PGD-10)
  (c) art-reat's REATTrainer.train_epoch (released behaviour: reference RBL + reference TAIL, BSL)
  (d) a bare PyTorch loop with input-only gradients (the practical limit: frozen parameters and,
      on the CPU, the input gradient in chunks of 32 rows, the two speed-ups that (b) uses)
  (e) ART ProjectedGradientDescent.generate, PGD-20
  (f) art-reat TensorPGD.generate, PGD-20

and prints seconds per batch (median and minimum over repeats, and every sample), the ratios a/b,
b/d, c/b, e/f of both, and peak memory. ART's stock trainer builds its PGD with ART's default attack
batch size (32), so (a) too takes its attack gradients 32 images at a time.

    python benchmarks/throughput.py --model resnet18 --batches 3
"""

from __future__ import annotations

import argparse
import copy
import datetime
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from machine_info import cpu_model  # benchmarks/machine_info.py (the script's folder is on sys.path)


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
    from art_reat.attacks.pgd import auto_gradient_chunk
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

    def loader(x_uint8, y):
        return DeviceLoader(x_uint8, y, args.batch_size, device, augment=False, shuffle=True, seed=args.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def art_trainer(x_uint8, x_float, y):
        clf = fresh()
        trainer = AdversarialTrainerMadryPGD(clf, nb_epochs=1, batch_size=args.batch_size, eps=eps, eps_step=step,
                                             max_iter=10)
        trainer.attack.set_params(verbose=False)
        trainer.trainer._attacks[0].set_params(verbose=False) if hasattr(trainer.trainer, "_attacks") else None
        return lambda: trainer.fit(x_float, y, nb_epochs=1, batch_size=args.batch_size)

    def our_trainer(x_uint8, x_float, y):
        trainer = PGDATTrainer(fresh(), nb_epochs=1, batch_size=args.batch_size, eps=eps, eps_step=step, max_iter=10)
        data = loader(x_uint8, y)
        return lambda: trainer.train_epoch(0, data)

    def reat_trainer(x_uint8, x_float, y):
        clf = fresh(TAILPyTorchClassifier, train_counts=counts, tail_mode="reference",
                    tail_classes=class_groups(num_classes, "reference")["tail"])
        trainer = REATTrainer(clf, train_counts=counts, rebalance="reference", nb_epochs=1,
                              batch_size=args.batch_size, eps=eps, eps_step=step, max_iter=10)
        data = loader(x_uint8, y)

        def run():
            trainer.train_epoch(0, data)
            trainer.on_epoch_end(0)  # the per-epoch weight update is part of REAT's cost
        return run

    def bare_loop(x_uint8, x_float, y):
        clf = fresh()
        model, optimizer, loss_fn = clf.model, clf.optimizer, clf.loss_fn
        data = loader(x_uint8, y)
        # the same two speed-ups as (b), written out: frozen parameters during the attack (no weight
        # gradients) and the input gradient in chunks of rows on the CPU
        chunk = auto_gradient_chunk(device) or args.batch_size

        def input_grad(x_adv, yb):
            parts = []
            for i in range(0, x_adv.shape[0], chunk):
                xc = x_adv[i:i + chunk].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(model(xc), yb[i:i + chunk], reduction="sum"), xc)
                parts.append(g)
            return torch.cat(parts)

        def run():
            for xb, yb in data:
                model.eval()
                x_adv = xb + torch.empty_like(xb).uniform_(-eps, eps)
                for p in model.parameters():
                    p.requires_grad_(False)
                for _ in range(10):
                    grad = input_grad(x_adv, yb)
                    x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), xb - eps), xb + eps).clamp(0, 1)
                for p in model.parameters():
                    p.requires_grad_(True)
                model.train()
                loss = loss_fn(model(x_adv), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return run

    def art_pgd20(x_uint8, x_float, y):
        clf = fresh()
        # ART's default attack batch size (32), as in (a) and as a user who does not set it gets
        attack = ProjectedGradientDescent(clf, eps=eps, eps_step=step, max_iter=20, num_random_init=1, verbose=False)
        return lambda: attack.generate(x_float, y)

    def our_pgd20(x_uint8, x_float, y):
        attack = TensorPGD(fresh(), eps=eps, eps_step=step, max_iter=20, batch_size=args.batch_size)
        return lambda: attack.generate(x_float, y)

    variants = {"a": ("ART AdversarialTrainerMadryPGD (PGD-10)", art_trainer),
                "b": ("art-reat PGDATTrainer (PGD-10)", our_trainer),
                "c": ("art-reat REATTrainer (PGD-10, RBL+TAIL)", reat_trainer),
                "d": ("bare PyTorch loop, input-only grads (PGD-10)", bare_loop),
                "e": ("ART ProjectedGradientDescent.generate (PGD-20)", art_pgd20),
                "f": ("art-reat TensorPGD.generate (PGD-20)", our_pgd20)}
    if not args.no_warmup:  # one untimed batch per variant (allocator, lazy init), on its own copy
        one = slice(0, args.batch_size)
        for key, (_, build) in variants.items():
            build(x_uint8[one], x_float[one], y[one])()
    runs = {key: build(x_uint8, x_float, y) for key, (_, build) in variants.items()}
    times = {key: [] for key in variants}
    peaks = {}
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

    # the median is the headline; the minimum (the least-disturbed run: noise only adds time) is
    # printed beside it, with every sample, so that a noisy run shows itself
    per_batch = {key: statistics.median(v) for key, v in times.items()}
    best = {key: min(v) for key, v in times.items()}
    print(f"# throughput: {args.model}, batch {args.batch_size}, {args.batches} batches x {args.repeats} repeats "
          f"(interleaved{'' if args.no_warmup else ', after a one-batch warm-up per variant'}), device {device}")
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {datetime.datetime.now().isoformat(timespec='minutes')}")
    print(f"{'variant':<50}{'median':>8}{'min':>8}  samples (s/batch)" + (f"{'peak MiB':>10}" if peaks else ""))
    for key, (label, _) in variants.items():
        samples = " ".join(f"{t:.2f}" for t in times[key])
        print(f"({key}) {label:<46}{per_batch[key]:>8.3f}{best[key]:>8.3f}  {samples}"
              + (f"{peaks[key]:>10.0f}" if peaks else ""))
    if not peaks:
        print(f"peak resident memory of the whole process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    ratios = [("a", "b", "art-reat trainer speed-up over ART's trainer (target >= 1.35)"),
              ("b", "d", "art-reat trainer time over the bare loop (target <= 1.05)"),
              ("c", "b", "REAT time over PGD-AT (target <= 1.03)"),
              ("e", "f", "art-reat PGD-20 speed-up over ART's PGD-20 (target >= 1.4)")]
    for top, bottom, label in ratios:
        print(f"{top}/{bottom}: {per_batch[top] / per_batch[bottom]:.3f} (medians), "
              f"{best[top] / best[bottom]:.3f} (minima)  {label}")


if __name__ == "__main__":
    main()
