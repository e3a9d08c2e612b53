"""Reporting: delta-accuracy tables as the paper lays them out (Table 2), in Markdown and styled HTML.

Input everywhere: the long table of :func:`miclip_nb.intervention.intervention_table` (one row per
method, intervention and seed) or its :func:`summarize_table`. An entry that moves against the
expected direction (enhancement should raise accuracy, removal lower it) is marked
:data:`WRONG_MARK` (the paper's red); the best *method* of each column is bold; reference rows
(:data:`REFERENCE_ROWS`: random units, the ablation reference) are never marked best.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Rows that are references, not methods: never marked best in a table.
REFERENCE_ROWS: tuple[str, ...] = ("Random", "Ablation")


def summarize(values) -> tuple[float, float]:
    """(mean, std) of per-seed results (std 0 for a single seed)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=0)) if arr.size > 1 else 0.0


def summarize_table(long: pd.DataFrame) -> pd.DataFrame:
    """Collapse seeds: one row per (method, intervention) with its beta, mean and std of delta_acc,
    mean and std of the specific effect (``specific``: the target class's change minus the other
    classes'), the means of delta_other and flip_to_class, and n (seeds or draws). Columns the long
    table lacks (an older table without other-class images) are NaN."""
    out = []
    for (method, interv), grp in long.groupby(["method", "intervention"], sort=False):
        mean, std = summarize(grp["delta_acc"].tolist())
        row = {"method": method, "intervention": interv, "beta": float(grp["beta"].iloc[0]),
               "delta_acc_mean": mean, "delta_acc_std": std}
        specific = grp["specific"] if "specific" in grp else pd.Series([np.nan] * len(grp))
        row["specific_mean"], row["specific_std"] = summarize(specific.tolist())
        for col in ("delta_other", "flip_to_class"):
            row[f"{col}_mean"] = float(grp[col].mean()) if col in grp else float("nan")
        row["n"] = len(grp)
        out.append(row)
    return pd.DataFrame(out)


#: Sign a delta-accuracy is expected to have per intervention (paper Table 2: enhancement up, removal down).
EXPECTED_SIGN: dict[str, int] = {"enhance": 1, "remove": -1}
#: Plain-text mark of an entry that moves against the expected direction (the paper's red).
WRONG_MARK = "†"


def expected_sign(intervention: str, beta: float | None = None) -> int:
    """+1 (accuracy should rise), -1 (should fall) or 0 (no expectation) for an intervention:
    its entry in :data:`EXPECTED_SIGN`, else from the scale beta (> 1: +1, < 1: -1)."""
    if intervention in EXPECTED_SIGN:
        return EXPECTED_SIGN[intervention]
    if beta is None or pd.isna(beta) or float(beta) == 1.0:
        return 0
    return 1 if float(beta) > 1.0 else -1


def against_expected(table: pd.DataFrame) -> pd.Series:
    """Bool per row of :func:`summarize_table` (columns intervention, delta_acc_mean, optional
    beta): the mean has the sign opposite to :func:`expected_sign`; exactly 0 is not flagged."""
    betas = table["beta"] if "beta" in table else [None] * len(table)
    signs = [expected_sign(i, b) for i, b in zip(table["intervention"], betas)]
    return pd.Series([bool(s != 0 and m * s < 0) for s, m in zip(signs, table["delta_acc_mean"])], index=table.index)


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table with rows = methods (index ``method``): per intervention ``<name>_mean``,
    ``<name>_std`` and ``<name>_wrong`` (against the expected direction), ``<name>_specific`` (the
    target class's change minus the other classes', when measured), then ``n`` (seeds or draws).
    Input: :func:`summarize_table`'s output."""
    table = table.assign(wrong=against_expected(table))
    out = pd.DataFrame(index=pd.Index(list(dict.fromkeys(table["method"])), name="method"))
    for interv, grp in table.groupby("intervention", sort=False):
        g = grp.set_index("method")
        out[f"{interv}_mean"], out[f"{interv}_std"], out[f"{interv}_wrong"] = g["delta_acc_mean"], g["delta_acc_std"], g["wrong"]
        if _has_specific(table):
            out[f"{interv}_specific"] = g["specific_mean"]
    out["n"] = table.groupby("method", sort=False)["n"].max()
    return out


def table_markdown(table: pd.DataFrame) -> str:
    """A Markdown table from :func:`summarize_table`: rows = methods, columns = interventions,
    cells 'mean (± std)', followed where it was measured by the specific effect '[specific s]' (the
    target class's change minus the other classes'). Entries against the expected direction get
    :data:`WRONG_MARK` (the paper's red), the best method per column (Random and Ablation excluded;
    none when no method moves the expected way) is bold; a legend line follows."""
    table = table.assign(wrong=against_expected(table))
    interventions = list(dict.fromkeys(table["intervention"]))
    best = {}
    for i in interventions:
        rows = table[(table["intervention"] == i) & ~table["method"].isin(REFERENCE_ROWS)]
        sign = expected_sign(i, rows["beta"].iloc[0] if "beta" in rows and len(rows) else None)
        if len(rows) and sign and (rows["delta_acc_mean"] * sign).max() > 0:  # no bold when nothing moves the right way
            best[i] = rows.loc[(rows["delta_acc_mean"] * sign).idxmax(), "method"]
    arrows = {1: " (↑)", -1: " (↓)", 0: ""}
    head = [f"{i} ΔAcc (%){arrows[expected_sign(i, table.loc[table['intervention'] == i, 'beta'].iloc[0] if 'beta' in table else None)]}"
            for i in interventions]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(interventions)]
    for method, grp in table.groupby("method", sort=False):
        cells = []
        for i in interventions:
            r = grp[grp["intervention"] == i]
            if not len(r):
                cells.append("")
                continue
            cell = f"{r['delta_acc_mean'].iloc[0]:+.2f} (± {r['delta_acc_std'].iloc[0]:.2f})"
            cell = f"**{cell}**" if best.get(i) == method else cell
            cell += f" {WRONG_MARK}" if bool(r["wrong"].iloc[0]) else ""
            if _has_specific(table) and pd.notna(r["specific_mean"].iloc[0]):
                cell += f" [specific {r['specific_mean'].iloc[0]:+.2f}]"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"{WRONG_MARK}: moves against the expected direction (the paper's red); bold: best method per column."]
    if _has_specific(table):
        lines.append("specific: the target class's change minus the mean change of the other classes' accuracy "
                     "(removal that hurts every class alike has a specific effect near 0).")
    return "\n".join(lines) + "\n"


#: Column headers of the paper's Table 2 per intervention.
PAPER_HEADERS: dict[str, str] = {"enhance": "Enhancement ΔAcc (%) (↑)", "remove": "Removal ΔAcc (%) (↓)"}


def paper_table(tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's Table 2 layout from several :func:`summarize_table` outputs.

    tables: ``{column label (a model, or "model · units"): summary}``. Returns ``(cells, wrong)``:
    DataFrames with rows = methods (in order of first appearance) and columns = a MultiIndex
    (intervention header, label), enhancement columns first; ``cells`` holds "mean (± std)"
    strings, with :data:`WRONG_MARK` appended where the entry moves against the expected direction,
    ``wrong`` the matching booleans (False where a method is missing). Raises ValueError for no tables.
    """
    if not tables:
        raise ValueError("give at least one summary table")
    methods = list(dict.fromkeys(m for t in tables.values() for m in t["method"]))
    interventions = list(dict.fromkeys(i for t in tables.values() for i in t["intervention"]))
    columns = pd.MultiIndex.from_tuples([(PAPER_HEADERS.get(i, f"{i} ΔAcc (%)"), label) for i in interventions for label in tables])
    cells = pd.DataFrame("", index=pd.Index(methods, name="method"), columns=columns)
    wrong = pd.DataFrame(False, index=cells.index, columns=columns)
    for label, t in tables.items():
        t = t.assign(wrong=against_expected(t))
        for _, r in t.iterrows():
            col = (PAPER_HEADERS.get(r["intervention"], f"{r['intervention']} ΔAcc (%)"), label)
            cells.loc[r["method"], col] = (f"{r['delta_acc_mean']:+.2f} (± {r['delta_acc_std']:.2f})"
                                           + (f" {WRONG_MARK}" if r["wrong"] else ""))
            wrong.loc[r["method"], col] = bool(r["wrong"])
    return cells, wrong


def style_paper_table(tables: dict[str, pd.DataFrame], color: str = "#d62728"):
    """:func:`paper_table`'s cells as a pandas Styler: entries against the expected direction in
    red (they also keep their text mark), the best method of each column (Random and Ablation excluded) in
    bold, with a fixed table id so that its HTML is the same on every run."""
    cells, wrong = paper_table(tables)
    css = wrong.map(lambda w: f"color: {color}" if w else "")
    for label, t in tables.items():
        for interv, grp in t[~t["method"].isin(REFERENCE_ROWS)].groupby("intervention", sort=False):
            sign = expected_sign(interv, grp["beta"].iloc[0] if "beta" in grp else None)
            if sign and (grp["delta_acc_mean"] * sign).max() > 0:
                best = grp.loc[(grp["delta_acc_mean"] * sign).idxmax(), "method"]
                col = (PAPER_HEADERS.get(interv, f"{interv} ΔAcc (%)"), label)
                css.loc[best, col] = "; ".join(filter(None, [css.loc[best, col], "font-weight: bold"]))
    return cells.style.apply(lambda _: css, axis=None).set_uuid("miclip_table2")


def _has_specific(table: pd.DataFrame) -> bool:
    return "specific_mean" in table and bool(table["specific_mean"].notna().any())


def specificity_table(tables: dict[str, pd.DataFrame], intervention: str = "remove") -> pd.DataFrame:
    """Does an intervention hurt the target class, or every class? One row per method, for each
    label of ``tables`` (``{label: summarize_table output}``) three columns: ``target`` (the class's
    own change, points), ``others`` (the mean change of the other classes' accuracy) and
    ``specific`` (their difference). Raises ValueError when no table measured other classes
    (``n_other=0``)."""
    frames = {}
    for label, t in tables.items():
        t = t[t["intervention"] == intervention].set_index("method")
        if not _has_specific(t.reset_index()):
            continue
        frames[label] = pd.DataFrame({"target": t["delta_acc_mean"], "others": t["delta_other_mean"],
                                      "specific": t["specific_mean"]})
    if not frames:
        raise ValueError("no table measured the other classes: run it with n_other > 0")
    return pd.concat(frames, axis=1)


def intervention_summary(tables: dict[str, pd.DataFrame], intervention: str = "remove") -> pd.DataFrame:
    """One intervention's mean effect per method (rows, strongest first by the most negative entry)
    and setting (columns: the labels of ``tables``, ``{label: summarize_table output}``)."""
    out = pd.DataFrame({label: t[t["intervention"] == intervention].set_index("method")["delta_acc_mean"]
                        for label, t in tables.items()})
    return out.loc[out.min(axis=1).sort_values().index]


def ranking_lines(summary: pd.DataFrame, method: str = "MiClip") -> list[str]:
    """Per setting (column of :func:`intervention_summary`), where ``method`` ranks among the methods
    (reference rows left out), beside the strongest method, random units and the ablation ceiling."""
    lines = []
    for setting, col in summary.items():
        ranked = col.drop(list(REFERENCE_ROWS), errors="ignore").dropna().sort_values()
        if method not in ranked:
            continue
        ceiling = f", ablation {col['Ablation']:+.1f}" if pd.notna(col.get("Ablation")) else ""
        rand = f"; random {col['Random']:+.1f}" if pd.notna(col.get("Random")) else ""
        lines.append(f"{setting}: {method} ranks {list(ranked.index).index(method) + 1} of {len(ranked)} methods "
                     f"({method} {ranked[method]:+.1f}, best {ranked.index[0]} {ranked.iloc[0]:+.1f}{rand}{ceiling})")
    return lines
