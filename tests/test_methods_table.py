"""The methods option of the pipeline and the intervention tables (rows = methods).

Selector construction runs on the planted store of tests/_synthetic.py; the command-line run and
the harness use the committed toy_cnn on a few Shapes images.
"""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from _synthetic import planted_store
from miclip_nb import baselines as bl
from miclip_nb import cli, pipeline
from miclip_nb.select import MiClipSelector, RandomSelector, ScoreSelector
from miclip_nb.store import acts_field


def _planted_prep(tmp_path, **config):
    store, text, planted = planted_store(tmp_path, n=1200, shard_size=500)
    target = SimpleNamespace(module=nn.Identity(), class_names=[f"c{i}" for i in range(text.shape[0])], name="planted")
    cfg = pipeline.PipelineConfig(**config)
    return pipeline.Prepared(cfg, target, None, store, "layer", text), planted


def test_methods_option_selects_the_right_selectors(tmp_path):
    prep, planted = _planted_prep(tmp_path, methods=("act_values", "Random", "clip_dissect", "miclip"), seeds=(0, 1),
                                  n_random=3, n_probe=600)
    assert prep.config.methods == ("act_values", "random", "clip_dissect", "miclip")  # table names are accepted too
    space = pipeline.neuron_space(prep)
    assert space.n_units == 32 and space.edit_factory is None
    unit_emb = torch.zeros(32, prep.class_text_emb_cd.shape[1])
    unit_emb[planted] = prep.class_text_emb_cd
    sels = pipeline.method_selectors(prep, space, [unit_emb, unit_emb])
    assert list(sels) == [bl.ACT_VALUES, "Random", bl.CLIP_DISSECT, "MiClip"]  # the config's order
    assert [len(v) for v in sels.values()] == [2, 3, 2, 2]  # one per seed, n_random draws
    assert all(isinstance(s, ScoreSelector) for s in sels[bl.ACT_VALUES] + sels[bl.CLIP_DISSECT])
    assert all(isinstance(s, RandomSelector) for s in sels["Random"]) and all(isinstance(s, MiClipSelector) for s in sels["MiClip"])
    for c in range(6):
        assert int(sels[bl.ACT_VALUES][0].select(c, 1)[0]) == int(planted[c])
        assert int(sels["MiClip"][1].select(c, 1)[0]) == int(planted[c])
    # The seeds differ by the probing-set draw: same planted units, different scores.
    assert not torch.equal(sels[bl.ACT_VALUES][0].scores_cu, sels[bl.ACT_VALUES][1].scores_cu)
    with pytest.raises(ValueError, match="unit_embs"):
        pipeline.method_selectors(prep, space, None)


def test_miclip_rows_rank_by_posterior_and_by_cosine(tmp_path):
    """Row "MiClip" ranks by the posterior against the classes, row "MiClip (cosine)" by plain
    cosine: a unit pointing at the mean of the class prompts wins every class under cosine and none
    under the posterior, which picks each class's own unit."""
    import torch.nn.functional as F

    prep, planted = _planted_prep(tmp_path, methods=("miclip", "miclip_cosine"), seeds=(0,))
    space = pipeline.neuron_space(prep)
    axes = torch.eye(8)
    text = F.normalize(axes[7] + 0.6 * axes[:6], dim=-1)  # six class prompts sharing axis 7
    prep = pipeline.Prepared(prep.config, prep.target, None, prep.store, prep.layer, text)
    unit_emb = -axes[7].repeat(32, 1)  # filler units, far from every class
    unit_emb[planted] = axes[:6]  # each class's own unit: its prompt's own axis (cosine 0.51)
    generic = next(u for u in range(32) if u not in planted.tolist())
    unit_emb[generic] = axes[7]  # what all prompts share (cosine 0.86 to each)
    sels = pipeline.method_selectors(prep, space, [unit_emb], temperatures=[0.05])
    assert list(sels) == ["MiClip", "MiClip (cosine)"]
    posterior, cosine = sels["MiClip"][0], sels["MiClip (cosine)"][0]
    assert (posterior.scoring, posterior.temperature, cosine.scoring) == ("posterior", 0.05, "cosine")
    for c in range(6):
        assert int(cosine.select(c, 1)[0]) == generic
        assert int(posterior.select(c, 1)[0]) == int(planted[c])
    with pytest.raises(ValueError, match="2 temperatures for 1"):
        pipeline.method_selectors(prep, space, [unit_emb], temperatures=[0.05, 0.05])
    with pytest.raises(ValueError, match="miclip_cosine"):
        pipeline.PipelineConfig(methods=("miclip", "netdissect", "miclip-cos"))


def test_probe_draw_restricts_the_store_rows(tmp_path):
    store, _, _ = planted_store(tmp_path, n=1200, shard_size=500)
    rows = bl.probe_rows(store.n_rows, 300, seed=4)
    assert rows.shape == (300,) and torch.equal(rows, rows.sort().values) and torch.equal(rows, bl.probe_rows(1200, 300, 4))
    assert bl.probe_rows(1200, None, 0) is None and bl.probe_rows(1200, 5000, 0) is None
    shards = list(store.iter_shards([acts_field("layer"), "label"]))
    acts, labels = torch.cat([s[acts_field("layer")] for s in shards]), torch.cat([s["label"] for s in shards])
    expected = bl.act_values_scores(acts[rows], labels[rows], 6)
    torch.testing.assert_close(bl.act_values_from_store(store, "layer", 6, rows=rows), expected)
    with pytest.raises(ValueError, match="rows must lie"):
        bl.act_values_from_store(store, "layer", 6, rows=torch.tensor([0, 1200]))


def test_unknown_methods_fail_listing_the_valid_ones(capsys):
    with pytest.raises(ValueError) as err:
        pipeline.PipelineConfig(methods=("miclip", "lime"))
    assert "lime" in str(err.value) and all(k in str(err.value) for k in pipeline.METHODS)
    with pytest.raises(ValueError, match="give at least one method"):
        pipeline.PipelineConfig(methods=())
    with pytest.raises(ValueError, match="netdissect.*do not run on SAE features"):
        pipeline.PipelineConfig(methods=("miclip", "netdissect"), units="sae")
    with pytest.raises(SystemExit):
        cli.main(["run", "--set", "methods=[miclip,lime]"])
    assert "unknown method(s) ['lime']" in capsys.readouterr().err
    cfg = pipeline.PipelineConfig.from_dict({"methods": "miclip, act_values", "sae": {"k": 4}, "units": "sae"})
    assert cfg.methods == ("miclip", "act_values") and cfg.sae.k == 4


def _summary(rows):
    return pd.DataFrame([{"method": m, "intervention": i, "beta": b, "delta_acc_mean": v, "delta_acc_std": 0.5,
                          "flip_to_class_mean": 0.0, "n": 3} for m, i, b, v in rows])


def test_markers_flag_entries_against_the_expected_direction():
    table = _summary([("MiClip", "enhance", 2.0, 1.5), ("MiClip", "remove", 0.0, -9.0),
                      ("Act-Values", "enhance", 2.0, -0.2), ("Act-Values", "remove", 0.0, 0.4),
                      ("Random", "enhance", 2.0, 0.0), ("Random", "remove", 0.0, -0.1),
                      ("Other", "x0.5", 0.5, 0.3), ("Other", "x1", 1.0, 0.2)])
    assert pipeline.against_expected(table).tolist() == [False, False, True, True, False, False, True, False]
    md = pipeline.table_markdown(table)
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "method" not in line}
    assert lines["Act-Values"].count(pipeline.WRONG_MARK) == 2 and pipeline.WRONG_MARK not in lines["MiClip"]
    assert "**+1.50 (± 0.50)**" in lines["MiClip"] and "**-9.00 (± 0.50)**" in lines["MiClip"]  # best per column
    wide = pipeline.wide_table(table)
    assert list(wide.index) == ["MiClip", "Act-Values", "Random", "Other"]
    assert wide.loc["Act-Values", "remove_wrong"] and not wide.loc["MiClip", "remove_wrong"]
    cells, wrong = pipeline.paper_table({"toy_cnn": table, "toy_vit": table[table.method != "Other"]})
    assert cells.shape == (4, 8) and int(wrong.to_numpy().sum()) == 5
    assert cells.loc["Act-Values", (pipeline.PAPER_HEADERS["enhance"], "toy_vit")].endswith(pipeline.WRONG_MARK)
    html = pipeline.style_paper_table({"toy_cnn": table}).to_html()
    assert html == pipeline.style_paper_table({"toy_cnn": table}).to_html()  # stable for nbval
    assert "color: #d62728" in html and "miclip_table2" in html


@pytest.fixture(scope="module")
def toy_eval():
    """The committed toy_cnn and 60 Shapes test images (10 per class), preprocessed."""
    from miclip_nb import datasets, zoo

    target = zoo.load_target("toy_cnn")
    images, labels = pipeline.load_eval_images(target, datasets.open_dataset("shapes:test:60"))
    return target, images, labels


def test_harness_matches_class_deltas_and_reuses_edits(toy_eval):
    from miclip_nb.steer import class_deltas

    target, images, labels = toy_eval
    sel = RandomSelector(128, 1)
    selectors = {"a": [sel], "b": [RandomSelector(128, 1), RandomSelector(128, 2)]}
    cache: dict = {}
    long = pipeline.intervention_table(target, images, labels, "stages.2", selectors, n_other=0, cache=cache, progress=False)
    assert long.groupby("method").size().to_dict() == {"a": 2, "b": 4}
    expected = class_deltas(target.module, images, labels, "stages.2", {c: sel.select(c, 5) for c in range(6)}, beta=0.0, n_other=0)
    removal = long[(long.method == "a") & (long.intervention == "remove")]["delta_acc"].iloc[0]
    assert removal == pytest.approx(expected["delta_acc"].mean(), abs=1e-6)
    same = long[(long.seed == 0) & (long.intervention == "remove")]["delta_acc"]
    assert same.nunique() == 1  # the same units: evaluated once, same figure
    assert cache[("_layer_outputs", "stages.2")] is not None  # toy_cnn splits at stages.2: edits run its tail only
    assert len([k for k in cache if k[0] != "_layer_outputs"]) == 2 * 2 * 6  # (2 unit sets) x (2 betas) x (6 classes)


def test_cli_writes_csv_and_markdown_one_row_per_method(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--quiet", "--set", "model=toy_cnn", "--set", "train_data=shapes:train:240", "--set", "eval_data=shapes:test:60",
            "--set", "seeds=[0,1]", "--set", "n_random=2", "--set", "methods=[miclip,act_values,random]",
            "--set", "n_other=0", "--set", "align={epochs: 2}", "--set", f"out_dir={out}"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "delta_md:" in printed and "delta:" in printed
    table = pd.read_csv(out / "delta_accuracy.csv", index_col="method")
    assert list(table.index) == ["MiClip", "Act-Values", "Random"]
    assert {"enhance_mean", "enhance_std", "enhance_wrong", "remove_mean", "remove_std", "remove_wrong", "n"} <= set(table.columns)
    assert table.loc["MiClip", "n"] == 2 and table.loc["Random", "n"] == 2
    md = (out / "delta_accuracy.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["MiClip", "Act-Values", "Random"]
    long = pd.read_csv(out / "delta_accuracy_long.csv")
    assert len(long) == (2 + 2 + 2) * 2 and (out / "localization.csv").is_file()
    loc = pd.read_csv(out / "localization.csv")
    assert {"class", "seed", "rank", "unit", "scoring", "score", "cosine"} <= set(loc.columns)
    assert set(loc["scoring"]) == {"posterior"} and (loc["score"] <= 0).all()  # log-probabilities
    assert (loc.groupby(["class", "seed"])["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
