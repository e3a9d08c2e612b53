"""Delta-accuracy tables as the paper lays them out: marks, bold, specificity, stable HTML."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from miclip_nb import reporting


def _summary(rows):
    return pd.DataFrame([{"method": m, "intervention": i, "beta": b, "delta_acc_mean": v, "delta_acc_std": 0.5,
                          "flip_to_class_mean": 0.0, "n": 3} for m, i, b, v in rows])


def test_markers_flag_entries_against_the_expected_direction():
    table = _summary([("MiClip", "enhance", 2.0, 1.5), ("MiClip", "remove", 0.0, -9.0),
                      ("Act-Values", "enhance", 2.0, -0.2), ("Act-Values", "remove", 0.0, 0.4),
                      ("Random", "enhance", 2.0, 0.0), ("Random", "remove", 0.0, -0.1),
                      ("Other", "x0.5", 0.5, 0.3), ("Other", "x1", 1.0, 0.2)])
    assert reporting.against_expected(table).tolist() == [False, False, True, True, False, False, True, False]
    md = reporting.table_markdown(table)
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "method" not in line}
    assert lines["Act-Values"].count(reporting.WRONG_MARK) == 2 and reporting.WRONG_MARK not in lines["MiClip"]
    assert "**+1.50 (± 0.50)**" in lines["MiClip"] and "**-9.00 (± 0.50)**" in lines["MiClip"]  # best per column
    assert "specific" not in md  # not measured here: no column, no legend
    wide = reporting.wide_table(table)
    assert list(wide.index) == ["MiClip", "Act-Values", "Random", "Other"]
    assert wide.loc["Act-Values", "remove_wrong"] and not wide.loc["MiClip", "remove_wrong"]
    cells, wrong = reporting.paper_table({"toy_cnn": table, "toy_vit": table[table.method != "Other"]})
    assert cells.shape == (4, 8) and int(wrong.to_numpy().sum()) == 5
    assert cells.loc["Act-Values", (reporting.PAPER_HEADERS["enhance"], "toy_vit")].endswith(reporting.WRONG_MARK)
    html = reporting.style_paper_table({"toy_cnn": table}).to_html()
    assert html == reporting.style_paper_table({"toy_cnn": table}).to_html()  # stable for nbval
    assert "color: #d62728" in html and "miclip_table2" in html


def _long():
    rows = []
    for seed, (d_t, d_o) in enumerate([(-20.0, -1.0), (-10.0, -3.0)]):
        rows.append({"method": "MiClip", "intervention": "remove", "beta": 0.0, "seed": seed, "delta_acc": d_t,
                     "delta_other": d_o, "specific": d_t - d_o, "flip_to_class": 0.0})
    rows.append({"method": "Global", "intervention": "remove", "beta": 0.0, "seed": 0, "delta_acc": -30.0,
                 "delta_other": -29.0, "specific": -1.0, "flip_to_class": 0.0})
    return pd.DataFrame(rows)


def test_summaries_carry_the_specific_effect():
    table = reporting.summarize_table(_long())
    miclip = table.set_index("method").loc["MiClip"]
    assert miclip["delta_acc_mean"] == -15.0 and miclip["specific_mean"] == -13.0 and miclip["delta_other_mean"] == -2.0
    assert miclip["specific_std"] == pytest.approx(6.0) and miclip["n"] == 2
    md = reporting.table_markdown(table)
    assert "[specific -13.00]" in md and "[specific -1.00]" in md and "other classes" in md
    assert reporting.wide_table(table).loc["Global", "remove_specific"] == -1.0
    spec = reporting.specificity_table({"toy": table})
    assert spec.loc["Global", ("toy", "target")] == -30.0 and spec.loc["Global", ("toy", "specific")] == -1.0
    # An older long table without the columns: NaN, and no specificity anywhere.
    old = reporting.summarize_table(_long().drop(columns=["delta_other", "specific"]))
    assert math.isnan(old["specific_mean"].iloc[0]) and "specific" not in reporting.table_markdown(old)
    with pytest.raises(ValueError, match="n_other > 0"):
        reporting.specificity_table({"old": old})


def test_intervention_summary_and_ranking_lines():
    cnn = _summary([("MiClip", "remove", 0.0, -10.0), ("Act-Values", "remove", 0.0, -30.0), ("Random", "remove", 0.0, -1.0),
                    ("Ablation", "remove", 0.0, -60.0), ("MiClip", "enhance", 2.0, 3.0)])
    vit = _summary([("MiClip", "remove", 0.0, -2.0), ("Act-Values", "remove", 0.0, -1.0), ("Random", "remove", 0.0, 0.5)])
    summary = reporting.intervention_summary({"cnn": cnn, "vit": vit})
    assert list(summary.index) == ["Ablation", "Act-Values", "MiClip", "Random"]  # strongest removal first
    assert math.isnan(summary.loc["Ablation", "vit"])
    lines = reporting.ranking_lines(summary)
    assert lines[0] == "cnn: MiClip ranks 2 of 2 methods (MiClip -10.0, best Act-Values -30.0; random -1.0, ablation -60.0)"
    assert lines[1].startswith("vit: MiClip ranks 1 of 2 methods") and "ablation" not in lines[1]
