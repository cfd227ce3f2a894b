#!/usr/bin/env python
"""A reproduction of the paper's main comparison that fits a 2-core CPU in about an hour.

Trains, on CIFAR-10-LT (UR = 100) read from ``../shared/data`` with the small CNN:

1. PGD-AT with the BSL loss (the paper's baseline),
2. REAT as released (RBL "reference", TAIL "reference", BSL),
3. REAT with the attack re-balancing that moves the examples (``--rbl logit``) and the paper's
   TAIL (``--tail paper``),
4. RoBal (SPEC section 7 defaults),

one after the other as child runs of one MLflow parent run (``art_reat.experiments.run_sweep``:
an interrupted protocol, run again, skips the methods that finished). Then evaluates each with
``art_reat.evaluation.evaluate`` (what ``art-reat attack`` does): standard AutoAttack on a small
stratified test subset first, then clean / PGD-20 / CW / logit-scaled PGD-20 (x10) on a larger
one (the per-class and head/body/tail metrics of the larger subset are the ones kept as the run's
latest `clean_acc`). Finally ``art_reat.reporting.make_report`` builds the table and figures, and
the script writes ``benchmarks/results/cpu_protocol.md`` with the table, the exact command, the
machine, the date and the time each phase took.

    python benchmarks/cpu_protocol.py            # the protocol (27 min measured on an idle 2-core machine)
    python benchmarks/cpu_protocol.py --quick    # the same pipeline at a toy scale (about 2 minutes)

``--quick`` writes to ``outputs/cpu_protocol_quick/`` (never to benchmarks/results) unless
``--out`` says otherwise. Every scale value can be overridden (``--train-subset``, ``--epochs``,
``--eval-samples``, ``--aa-samples``, ...); the report states the values used.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Dict

from machine_info import cpu_model  # benchmarks/machine_info.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"

METHODS = [
    # (label, TrainConfig values)
    ("PGD-AT (BSL)", dict(method="pgd-at", loss="bsl")),
    ("REAT (released: rbl reference, tail reference)", dict(method="reat", loss="bsl", rbl="reference",
                                                            tail="reference")),
    ("REAT (rbl logit, tail paper)", dict(method="reat", loss="bsl", rbl="logit", tail="paper")),
    ("RoBal", dict(method="robal", loss="bsl")),
]

# Chosen from measured costs on a 2-core machine (see the results file); small-cnn, batch 128.
SCALES = {
    # Measured on an idle 2-core AMD EPYC (torch 2.14, 2 threads): a PGD-10 training batch of 128 takes
    # about 1.9 s (RoBal's PGD-5 + TRADES about 1.5 s), i.e. about 1.3 ms per image and attack step;
    # standard AutoAttack about 80 s per 100 test images of a weak model (more for a more robust one).
    # Estimate: training about 29 min (4 methods x 3 epochs x 75 batches, with validation and the AE
    # probe), clean / PGD-20 / CW-30 / PGD-20 (x10) on 1000 images about 6 min, AutoAttack on 100
    # images about 8 min: about 45 of the 60 minutes, leaving room for a slower or busier machine.
    # Measured on 2026-11-22 (idle, with the attacks' 32-row CPU chunks): 26.6 min in all.
    "full": dict(train_subset=10000, epochs=3, milestones=[2], eval_samples=1000, aa_samples=100,
                 cw_steps=30, attack_steps=None, eval_attack_steps=10, batch_size=128, ae_probe=256),
    # the pipeline at a toy scale; AutoAttack (minutes even on 20 images) only with --aa-samples N
    "quick": dict(train_subset=300, epochs=1, milestones=[60, 75], eval_samples=60, aa_samples=0,
                  cw_steps=5, attack_steps=2, eval_attack_steps=2, batch_size=64, ae_probe=16),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy scale (about 2 minutes) to test the pipeline")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with cifar10/{train,test}.npz")
    p.add_argument("--work-dir", help="MLflow store, checkpoints, attack state and figures "
                                      "[outputs/cpu_protocol, or outputs/cpu_protocol_quick]")
    p.add_argument("--out", help="the results file [benchmarks/results/cpu_protocol.md; with --quick: "
                                 "WORK_DIR/cpu_protocol.md]")
    p.add_argument("--train-subset", type=int, help="proportional subset of the 12,406 CIFAR-10-LT training "
                                                    "images (0: all) [10000]")
    p.add_argument("--epochs", type=int)
    p.add_argument("--milestones", help="comma-separated epochs where the LR is x0.1")
    p.add_argument("--eval-samples", type=int, help="stratified test images for clean / PGD-20 / CW / x10")
    p.add_argument("--aa-samples", type=int, help="stratified test images for AutoAttack (0: no AutoAttack)")
    p.add_argument("--cw-steps", type=int, help="steps of the CW-margin PGD")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    scale = dict(SCALES["quick" if args.quick else "full"])
    for name in ("train_subset", "epochs", "eval_samples", "aa_samples", "cw_steps"):
        if getattr(args, name) is not None:
            scale[name] = getattr(args, name)
    if scale["train_subset"] == 0:
        scale["train_subset"] = None  # --train-subset 0: the whole long-tailed training set
    if args.milestones:
        scale["milestones"] = [int(v) for v in args.milestones.split(",") if v.strip()]
    args.scale = scale
    default_work = REPO / "outputs" / ("cpu_protocol_quick" if args.quick else "cpu_protocol")
    args.work_dir = Path(args.work_dir) if args.work_dir else default_work
    default_out = args.work_dir / "cpu_protocol.md" if args.quick else REPO / "benchmarks" / "results" / "cpu_protocol.md"
    args.out = Path(args.out) if args.out else default_out
    return args


def machine() -> str:
    import torch

    return (f"{cpu_model()}, {os.cpu_count()} logical cores visible, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}, {platform.system()} "
            f"{platform.release()}")


def main(argv=None) -> int:
    import torch

    from art_reat.config import TrainConfig
    from art_reat.evaluation.evaluate import AttackConfig, evaluate
    from art_reat.experiments.sweep import SweepPlan, run_sweep
    from art_reat.reporting import ReportConfig, make_report

    args = parse_args(argv)
    scale = args.scale
    if not (Path(args.data_dir) / "cifar10" / "train.npz").is_file():
        print(f"error: {args.data_dir}/cifar10/train.npz not found (use --data-dir)", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    experiment = "cpu-protocol-quick" if args.quick else "cpu-protocol"
    base = dict(dataset="cifar10lt", ur=100.0, data_dir=str(Path(args.data_dir).resolve()), model="small-cnn",
                epochs=scale["epochs"], milestones=scale["milestones"], batch_size=scale["batch_size"],
                train_subset=scale["train_subset"], eval_samples=min(scale["eval_samples"], 200),
                eval_attack_steps=scale["eval_attack_steps"], record_ae_distance=scale["ae_probe"],
                seed=args.seed, device=args.device,
                experiment=experiment, tracking_uri=uri, output_dir=str(work / "checkpoints"),
                run_name="cpu-protocol")
    if scale["attack_steps"] is not None:
        base["attack_steps"] = scale["attack_steps"]
    children = [(values, TrainConfig.from_dict({**base, **values}).validate()) for _, values in METHODS]
    labels = {i: label for i, (label, _) in enumerate(METHODS)}
    plan = SweepPlan(base, {}, children)

    timings: Dict[str, float] = {}
    started = time.perf_counter()
    print(f"[cpu-protocol] training {len(children)} methods ({'quick' if args.quick else 'full'} scale: "
          f"{scale}) into {work}", flush=True)

    def on_child(outcome, total):
        now = time.perf_counter()
        if outcome.status == "pending":
            timings[f"_start{outcome.index}"] = now
            print(f"[cpu-protocol] [{outcome.index + 1}/{total}] {labels[outcome.index]}: training", flush=True)
        else:
            if outcome.status == "trained":
                timings[f"train {labels[outcome.index]}"] = now - timings.pop(f"_start{outcome.index}", now)
            print(f"[cpu-protocol] [{outcome.index + 1}/{total}] {labels[outcome.index]}: {outcome.status} "
                  f"(run {outcome.run_id})", flush=True)

    sweep = run_sweep(plan, on_child=on_child)
    run_ids = [o.run_id for o in sweep.children]

    for index, run_id in enumerate(run_ids):
        common = dict(run_id=run_id, tracking_uri=uri, data_dir=base["data_dir"], seed=args.seed, device=args.device,
                      state_dir=str(work / "attack_state"), batch_size=256)
        t = time.perf_counter()
        # AutoAttack first, on the smaller subset: the larger subset's clean_acc is logged last (kept as latest)
        if scale["aa_samples"]:
            evaluate(AttackConfig(attacks=["aa"], eval_samples=scale["aa_samples"], aa_batch_size=100, **common))
        timings[f"AA {labels[index]}"] = time.perf_counter() - t
        t = time.perf_counter()
        evaluate(AttackConfig(attacks=["pgd20", f"cw{scale['cw_steps']}"], adaptive_scale=10.0,
                              eval_samples=scale["eval_samples"], **common))
        timings[f"PGD/CW {labels[index]}"] = time.perf_counter() - t
        print(f"[cpu-protocol] evaluated {labels[index]} (AA {timings[f'AA {labels[index]}']:.0f} s, "
              f"PGD/CW {timings[f'PGD/CW {labels[index]}']:.0f} s)", flush=True)

    report = make_report(ReportConfig(experiment=experiment, tracking_uri=uri, parent_run=sweep.parent_run_id,
                                      fmt="md", out_dir=str(work / "report"), group_attack="pgd20"))
    total = time.perf_counter() - started
    text = results_markdown(args, scale, report, sweep, timings, total, uri)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"[cpu-protocol] wrote {args.out} ({total / 60:.1f} min)", flush=True)
    return 0


def results_markdown(args, scale, report, sweep, timings: Dict[str, float], total: float, uri: str) -> str:
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    n_train = "the whole CIFAR-10-LT (UR=100) training set, 12,406 images" if scale["train_subset"] is None else \
        f"a proportional subset of {scale['train_subset']} of the 12,406 CIFAR-10-LT (UR=100) training images"
    train_attack = ("PGD-10 (RoBal: PGD-5)" if scale["attack_steps"] is None else f"PGD-{scale['attack_steps']}")
    experiment = "cpu-protocol-quick" if args.quick else "cpu-protocol"
    resumed = ", resumed: some methods were trained by an earlier, interrupted invocation" if sweep.resumed else ""
    lines = [
        "# CPU-sized reproduction: PGD-AT, REAT (two variants) and RoBal on CIFAR-10-LT (UR = 100)",
        "",
        f"**This is a toy-scale run, far below the paper's protocol** (ResNet-18, 80 epochs, the full test set, "
        f"three seeds): a small CNN (about 94k parameters), {scale['epochs']} epoch(s) on {n_train}, one seed "
        f"({args.seed}), evaluated on stratified subsets of the test set. The numbers show that the pipeline runs "
        f"end to end and how the methods compare at this scale; they are not comparable with the paper's.",
        "",
        "**The pixels of this CIFAR-10 copy are JPEG-compressed** (quality 75, about 6 intensity levels of 255 from "
        "the official pixels on average; `../shared/data/README.md`); labels and the long-tailed selection are "
        "exact, absolute accuracies differ somewhat from the official files.",
        "",
        f"- Command: `{command}`",
        f"- Date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine()}",
        f"- Total time: {total / 60:.1f} min{resumed}",
        f"- MLflow: experiment `{experiment}` in `{uri}`, parent run "
        f"`{sweep.parent_run_id}`; figures in `{args.work_dir / 'report'}`",
        "",
        "## Settings",
        "",
        f"- Training: small-cnn, batch {scale['batch_size']}, SGD lr 0.1 (momentum 0.9, weight decay 5e-4), "
        f"x0.1 at epochs {scale['milestones']}, eps 8/255, step 2/255, training attack "
        f"{train_attack}, "
        f"checkpoint chosen by PGD-{scale['eval_attack_steps']} accuracy on a 5% stratified validation split; "
        f"Fig. 3's AE distance recorded on {scale['ae_probe']} fixed training images.",
        f"- Evaluation: clean, PGD-20, CW-{scale['cw_steps']} (CW margin loss, kappa 50) and PGD-20 on "
        f"10 x logits (the adaptive attack of SPEC section 9; prediction on the unscaled logits) on "
        f"{scale['eval_samples']} stratified test images; " + (
            f"standard AutoAttack on {scale['aa_samples']} (a different, smaller subset: its column is not on "
            f"the same images as the others)." if scale["aa_samples"] else "no AutoAttack (--aa-samples 0)."),
        "- Head / body / tail: classes {0, 1, 2} / {3, 4, 5, 6} / {7, 8, 9} (the released code's rule), "
        "under PGD-20. The rbl / tail columns only matter for REAT (PGD-AT and RoBal ignore them).",
        "",
        "## Results",
        "",
        report.text.replace("### ", "#### "),
        "## Time per phase",
        "",
        "| phase | seconds |",
        "|:---|---:|",
    ]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items() if not name.startswith("_")]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
