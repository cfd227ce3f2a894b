"""The paper's tables from grouped runs: mean (standard error) over seeds, best per column in bold.

Accuracy table (Tables 1-5, 8-13): one row per group, columns Clean, PGD-20, PGD-100, CW-100, AA,
then any other attack found in the runs (e.g. PGD-20 (x10), the logit-scaled attack), then the
head / body / tail robust accuracy under one attack (PGD-20 by default). A value comes from the
metrics of `art-reat attack` when the run has them (`clean_acc`, `robust_acc/<attack>[/<group>]`),
otherwise from the test metrics written by training (`test/clean_acc`, `test/pgdN_acc`).

Training-cost table (Table 14): seconds per epoch (each run's mean `epoch_seconds`) per group.

Standard error: sample standard deviation (n - 1 denominator) / sqrt(n); none for n = 1.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from art_reat.reporting.runs import GroupedRuns, RunRecord, format_value

STANDARD_ATTACKS = ("pgd20", "pgd100", "cw100", "aa")
GROUPS = ("head", "body", "tail")
FORMATS = ("md", "csv", "latex")


def mean_se(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and standard error of the mean (sample std with n - 1, / sqrt(n)); SE None for n < 2."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, None
    if x.size == 1:
        return float(x[0]), None
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def attack_label(name: str) -> str:
    """`pgd20` -> PGD-20, `cw100` -> CW-100, `aa` -> AA, `pgd20-x10` -> PGD-20 (x10), `pgd20-l2` -> PGD-20 (L2)."""
    if name == "clean":
        return "Clean"
    if name == "aa" or name.startswith("aa-"):
        base, extra = "AA", name[3:]
    else:
        match = re.match(r"^([a-z]+)(\d+)(?:-(.*))?$", name)
        if not match:
            return name
        base, extra = f"{match[1].upper()}-{match[2]}", match[3] or ""
    notes = [("x" + p[1:]) if p.startswith("x") else p.upper() for p in extra.split("-") if p]
    return base + (f" ({', '.join(notes)})" if notes else "")


def metric_keys(attack: str, group: Optional[str] = None) -> List[str]:
    """Metric names holding an attack's accuracy, in order of preference (evaluation, then training)."""
    if attack == "clean":
        keys = ["clean_acc", "test/clean_acc"]
    else:
        keys = [f"robust_acc/{attack}"]
        if re.fullmatch(r"pgd\d+", attack):
            keys.append(f"test/{attack}_acc")
    return [f"{k}/{group}" for k in keys] if group else keys


def run_value(run: RunRecord, attack: str, group: Optional[str] = None) -> Optional[float]:
    for key in metric_keys(attack, group):
        if key in run.metrics:
            return run.metrics[key]
    return None


def extra_attacks(runs: Sequence[RunRecord]) -> List[str]:
    """Attacks evaluated on some run beyond the standard columns, in a stable order; when no run was
    evaluated by `art-reat attack`, the training's own test PGD-N (e.g. PGD-10 of --eval-attack-steps 10)."""
    evaluated, trained = set(), set()
    for run in runs:
        for key in run.metrics:
            if key.startswith("robust_acc/") and key.count("/") == 1:
                evaluated.add(key.split("/", 1)[1])
            elif match := re.fullmatch(r"test/(pgd\d+)_acc", key):  # training's own PGD-N (--eval-attack-steps)
                trained.add(match[1])
    found = evaluated or trained  # training's PGD-N only when no run was evaluated with `art-reat attack`
    return sorted(found - set(STANDARD_ATTACKS), key=lambda n: (re.sub(r"\d+", "", n), len(n), n))


@dataclass
class Cell:
    mean: float  # NaN when no run has the value
    se: Optional[float]
    n: int


@dataclass
class Row:
    keys: List[str]  # formatted group-key values
    n: int  # runs (seeds) in the group
    cells: List[Cell]
    run_ids: List[str] = field(default_factory=list)


@dataclass
class Table:
    title: str
    key_columns: List[str]
    columns: List[str]
    rows: List[Row]
    scale: float = 100.0  # displayed value = mean * scale
    digits: int = 2
    better: Optional[str] = "max"  # which value is bold: "max", "min" or None

    def best(self, column: int) -> Optional[str]:
        """The best displayed value of a column (ties share it), or None."""
        means = [r.cells[column].mean for r in self.rows if not math.isnan(r.cells[column].mean)]
        if not means or self.better is None:
            return None
        return self.fmt(max(means) if self.better == "max" else min(means))

    def fmt(self, value: float) -> str:
        return f"{value * self.scale:.{self.digits}f}" if not math.isnan(value) else "-"


def _summarize(values: List[Optional[float]]) -> Cell:
    present = [v for v in values if v is not None and not math.isnan(v)]
    mean, se = mean_se(present)
    return Cell(mean, se, len(present))


def default_group_attack(runs: Sequence[RunRecord]) -> str:
    """PGD-20 when a run has it, else the first PGD-N any run has (e.g. training's --eval-attack-steps)."""
    if any(run_value(r, "pgd20") is not None for r in runs):
        return "pgd20"
    found = [a for a in extra_attacks(runs) if re.fullmatch(r"pgd\d+", a)]
    return found[0] if found else "pgd20"


def accuracy_table(grouped: GroupedRuns, group_attack: Optional[str] = None) -> Table:
    """Clean, PGD-20, PGD-100, CW-100, AA, other attacks, and head/body/tail under `group_attack`
    (default: `default_group_attack`)."""
    all_runs = [r for g in grouped.groups for r in g.runs]
    group_attack = group_attack or default_group_attack(all_runs)
    attacks = ["clean", *STANDARD_ATTACKS, *extra_attacks(all_runs)]
    columns = [attack_label(a) for a in attacks] + [f"{g.capitalize()} ({attack_label(group_attack)})"
                                                    for g in GROUPS]
    rows = []
    for group in grouped.groups:
        cells = [_summarize([run_value(r, a) for r in group.runs]) for a in attacks]
        cells += [_summarize([run_value(r, group_attack, g) for r in group.runs]) for g in GROUPS]
        rows.append(Row([format_value(v) for v in group.key], len(group.runs), cells, [r.run_id for r in group.runs]))
    return Table("Accuracy (%), mean (standard error) over seeds", grouped.key_labels, columns, rows)


def mean_epoch_seconds(run: RunRecord) -> Optional[float]:
    history = run.history("epoch_seconds")
    return float(np.mean([v for _, v in history])) if history else None


def cost_table(grouped: GroupedRuns) -> Table:
    """Seconds per epoch (Table 14): each run's mean over its epochs, then mean (SE) over seeds."""
    rows = []
    for group in grouped.groups:
        seconds = [mean_epoch_seconds(r) for r in group.runs]
        epochs = [float(len(r.history("epoch_seconds"))) for r in group.runs]
        rows.append(Row([format_value(v) for v in group.key], len(group.runs),
                        [_summarize(seconds), _summarize(epochs)], [r.run_id for r in group.runs]))
    table = Table("Training cost: seconds per epoch, mean (standard error) over seeds", grouped.key_labels,
                  ["s / epoch", "Epochs"], rows, scale=1.0, digits=1, better=None)
    return table


# ----------------------------------------------------------------------------- rendering


def render(table: Table, fmt: str = "md") -> str:
    if fmt == "md":
        return _render_text(table, lambda s: f"**{s}**", _md)
    if fmt == "latex":
        return _render_text(table, lambda s: f"\\textbf{{{s}}}", _latex)
    if fmt == "csv":
        return _render_csv(table)
    raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def cell_text(table: Table, column: int, cell: Cell, bold: Callable[[str], str]) -> str:
    """`66.99 (0.21)`, the mean in bold when it is the column's best; `-` when missing."""
    if math.isnan(cell.mean):
        return "-"
    shown = table.fmt(cell.mean)
    text = bold(shown) if shown == table.best(column) else shown
    if cell.se is not None:
        text += f" ({cell.se * table.scale:.{table.digits}f})"
    return text


def _render_text(table: Table, bold: Callable[[str], str], layout) -> str:
    header = table.key_columns + ["n"] + table.columns
    body = [row.keys + [str(row.n)] + [cell_text(table, i, c, bold) for i, c in enumerate(row.cells)]
            for row in table.rows]
    return layout(table, header, body)


def _md(table: Table, header: List[str], body: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if i < len(table.key_columns) else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex(table: Table, header: List[str], body: List[List[str]]) -> str:
    keys = len(table.key_columns)
    spec = "l" * keys + "r" * (len(header) - keys)
    lines = [f"% {table.title}", f"\\begin{{tabular}}{{{spec}}}", "\\hline",
             " & ".join(latex_escape(h) for h in header) + r" \\", "\\hline"]
    for row in body:
        # key values are escaped; cells are numbers, possibly in \textbf{}
        lines.append(" & ".join([latex_escape(v) for v in row[:keys]] + row[keys:]) + r" \\")
    lines += ["\\hline", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _render_csv(table: Table) -> str:
    """Machine-readable: a mean and an SE column per value (displayed units: % for accuracy), empty when missing."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = table.key_columns + ["n"]
    for name in table.columns:
        header += [name, f"{name} SE"]
    writer.writerow(header)
    for row in table.rows:
        values = row.keys + [row.n]
        for cell in row.cells:
            values.append("" if math.isnan(cell.mean) else f"{cell.mean * table.scale:.4f}")
            values.append("" if cell.se is None else f"{cell.se * table.scale:.4f}")
        writer.writerow(values)
    return out.getvalue()
