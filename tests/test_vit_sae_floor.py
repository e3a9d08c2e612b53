"""The removal floor on toy_vit, restated on SAE features (issue 17).

Five residual-stream dimensions of toy_vit at ``blocks.4`` barely move its accuracy for any method
(tests/test_miclip_toy.py records that floor as a strict xfail), as in the paper's Table 2a for
ViT-B/16 neurons; the paper's ViT effects come from SAE features. The restated check: removing each
class's top-5 SAE features (MiClip's posterior ranking; scale 0 at every token, the SAE's
reconstruction error kept) costs at least 10 points more than 5 random *firing* features (on 10%+
of the images), mean over 3 alignment seeds x 2 SAE seeds, on 1200 ``shapes:test`` images. Beside
it, the SAE Ablation reference: each class's 5 features whose removal alone costs most (the
``ablation`` method on 300 training images), which shows what removing five features can cost.

Measured on a 2-core CPU (SAE expansion 8, 5 epochs; codes max-pooled, ``min_freq=0.1``, the
default AlignConfig on the SAE's own images; removal in points, class-averaged; MiClip is the mean
over 3 alignment seeds, random firing over 20 draws; the gap is random minus MiClip):

| SAE | SAE seed | explained variance | MiClip | random firing | gap | Ablation (gap) |
|---|---|---|---|---|---|---|
| k=16, 1500 images (notebook 02) | 0 | 0.923 | -3.8 | +0.1 | 3.9 | -10.0 (10.1) |
| | 1 | 0.922 | -9.4 | +0.1 | 9.5 | -18.8 (18.9) |
| k=8, 3000 images (this floor) | 0 | 0.925 | -19.2 | -0.3 | 18.9 | -35.2 (34.9) |
| | 1 | 0.923 | -23.0 | -0.3 | 22.7 | -39.4 (39.1) |

Means: notebook 02's setting 6.7 (the Ablation reference's gap 14.5): below the floor; this
floor's setting 20.8 (37.0). Across the sweep (expansion 4-16, k 4-32, 1500 or 3000 images, max
or mean pooling, ``min_freq`` 0.01-0.3; issue 17's report) what five features can cost is set by
how much of a token they carry: fewer features per token (k) and a better-trained SAE (3000
images give twice the optimisation steps of 1500 at the same batch size) raise the Ablation
reference and MiClip together, and MiClip's gap stays near half the reference's (0.38-0.57 for
every setting with ``min_freq`` 0.1 except k=32, 0.21). Settings that meet the floor: k=8 on
3000 images (20.8, explained variance 0.92), k=16 on 3000 images (12.7, 0.95), k=8 (12.5, 0.89)
and expansion 4 with k=8 (14.8, 0.89) on 1500 images, k=4 (21.2, 0.86). The test uses the first:
a healthy SAE, and each SAE seed alone above the floor. Notebook 02's setting is recorded with a
strict xfail for the floor.

The Ablation reference is computed by :func:`sae_ablation_scores`, the very quantity of
``baselines.ablation_scores`` with the SAE's edit (checked against it on a sample of features in
the fast test), about 20x faster: the layer's codes are computed once and the tail of the model
runs only on the images where the feature fires (elsewhere removing it changes nothing).

The slow tests take about 10 minutes on a busy 2-core CPU (``pytest -m slow tests/test_vit_sae_floor.py -s``
prints the tables); the fast one, a smaller setting with a looser floor, about half a minute.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from miclip_nb import align, datasets, embed, interpret, pipeline, sae, store, units, zoo
from miclip_nb.baselines import ablation_scores
from miclip_nb.intervention import intervention_table
from miclip_nb.select import MiClipSelector, RandomSelector, ScoreSelector
from miclip_nb.steer import cache_layer_outputs, tail_module

LAYER = "blocks.4"  # toy_vit's default layer, the SAE's layer in notebook 02
TAU, POOLING, MIN_FREQ = 5, "max", 0.1  # units per class; notebook 02's pooling of codes and firing threshold
FLOOR_SAE = sae.SAEConfig(expansion=8, k=8, epochs=5)  # on N_FLOOR_SAE images: meets the floor (module docstring)
NOTEBOOK_SAE = sae.SAEConfig(expansion=8, k=16, epochs=5)  # notebook 02's setting (the toy profile's)
N_FLOOR_SAE, N_NOTEBOOK_SAE = 3000, 1500  # training images of the SAEs (and of the alignment: the same images)
N_EVAL, N_RANDOM, N_ABLATION = 1200, 20, 300
SAE_SEEDS, ALIGN_SEEDS = (0, 1), (0, 1, 2)
FLOOR = 10.0  # points: random firing features minus MiClip's
SHARE = 0.35  # MiClip's gap is at least this share of the Ablation reference's (measured 0.56 and 0.46)


# --------------------------------------------------------------------------------------------
# Helpers


def vit_sae_world(config: sae.SAEConfig, sae_seed: int, align_seeds, n_train: int) -> SimpleNamespace:
    """Notebook 02's steps on toy_vit: tokens of ``n_train`` training images, an SAE (seed
    ``sae_seed``), its codes max-pooled per image, one alignment per seed in ``align_seeds``, and
    MiClip's selectors (posterior ranking, features firing on fewer than 10% of the images left out).
    Every step is cached (the tests' private cache)."""
    target, backend = zoo.load_target("toy_vit"), embed.load_clip("toyclip")
    class_emb = pipeline.class_prompts_embedding(backend, target.class_names)
    tokens = store.build_store(target, datasets.open_dataset(f"shapes:train:{n_train}"), [LAYER], pooling="none",
                               clip=backend, progress=False)
    autoencoder, metrics = sae.fit_sae(tokens, LAYER, config, seed=sae_seed, progress=False)
    codes = sae.code_store(autoencoder, tokens, pooling=POOLING, progress=False)
    freq = sae.feature_frequency(codes)
    with warnings.catch_warnings():  # latents that never fire are constant units: align warns
        warnings.simplefilter("ignore", UserWarning)
        encoders = [align.fit_alignment(codes, class_emb, seed=s, progress=False) for s in align_seeds]
    miclip = [MiClipSelector(sae.drop_rare_units(interpret.unit_embeddings(e), freq, MIN_FREQ), class_emb,
                             scoring="posterior", temperature=interpret.concept_temperature(e)) for e in encoders]
    return SimpleNamespace(target=target, sae=autoencoder, space=units.sae_features(target, LAYER, autoencoder),
                           metrics=metrics, freq=freq, miclip=miclip, n_classes=len(target.class_names))


@torch.no_grad()
def sae_ablation_scores(world, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(C, F) the drop in the mean log-probability of class c over its images when feature f alone
    is removed (scale 0 at every token, error kept): ``baselines.ablation_scores(model, layer,
    images, labels, n_units=F, edit_factory=space.edit_factory)``, computed with the codes of the
    layer's outputs taken once, and the tail of the model run only on the images where f fires."""
    model = world.target.module.eval()
    labels = torch.as_tensor(labels).long()
    tail = tail_module(model, LAYER, images[:2])
    acts = cache_layer_outputs(model, images, LAYER, batch_size)[0].float()  # (N, T, D)
    codes = torch.cat([world.sae.encode(acts[i : i + 64]) for i in range(0, len(acts), 64)])  # (N, T, F)
    fires = (codes > 0).any(1)  # (N, F)
    columns = world.sae.W_dec * world.sae.input_scale  # (D, F): a code's contribution to the layer's output

    def logp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = [tail(x[i : i + batch_size]).float().log_softmax(-1).gather(1, y[i : i + batch_size, None])[:, 0]
               for i in range(0, len(x), batch_size)]
        return torch.cat(out).double()

    base = logp(acts, labels)
    drops = torch.zeros(world.n_classes, world.sae.n_latents, dtype=torch.float64)
    for f in range(world.sae.n_latents):
        rows = torch.nonzero(fires[:, f]).flatten()
        if rows.numel():
            edited = acts[rows] - codes[rows, :, f, None] * columns[:, f]
            drops[:, f].index_add_(0, labels[rows], base[rows] - logp(edited, labels[rows]))
    counts = torch.bincount(labels, minlength=world.n_classes).double()
    scores = (drops / counts[:, None]).float()
    scores[counts == 0] = float("nan")
    return scores


def removal(world, images, labels, ablation: torch.Tensor, n_random: int) -> dict:
    """Class-averaged delta-accuracy (points) of removing each class's top-5 features: MiClip's (one
    value per alignment seed), 5 random firing features (mean over ``n_random`` draws), and the
    Ablation reference's top-5 by ``ablation`` scores."""
    firing = world.freq >= MIN_FREQ
    selectors = {"MiClip": world.miclip,
                 "random firing": [RandomSelector(world.sae.n_latents, s, among=firing) for s in range(n_random)],
                 "Ablation": [ScoreSelector("Ablation", ablation)]}
    table = intervention_table(world.target, images, LAYER, selectors, labels=labels, tau=TAU, betas={"remove": 0.0},
                               edit_factory=world.space.edit_factory, n_other=0, progress=False)
    per = table.groupby(["method", "seed"], sort=False)["delta_acc"].mean()
    miclip = per["MiClip"].tolist()
    return dict(miclip=miclip, random=float(per["random firing"].mean()), ablation=float(per["Ablation"].iloc[0]),
                ev=float(world.metrics["explained_variance"]), n_firing=int(firing.sum()))


def _load(spec: str, target):
    return datasets.load_images(datasets.open_dataset(spec), target.preprocess)


def _print_row(label: str, r: dict) -> None:
    mic = np.mean(r["miclip"])
    print(f"{label}: EV {r['ev']:.3f}, {r['n_firing']} firing | MiClip {mic:6.1f} "
          f"({', '.join(f'{m:.1f}' for m in r['miclip'])}) | random firing {r['random']:5.1f} | "
          f"gap {r['random'] - mic:5.1f} | Ablation {r['ablation']:6.1f} (gap {r['random'] - r['ablation']:5.1f})")


def _seed_grid(config: sae.SAEConfig, n_train: int, name: str) -> dict:
    """Removal figures per SAE seed (3 alignment seeds each) at the full size, printed as a table;
    returns the means over the grid and the per-SAE-seed rows."""
    rows = []
    for sae_seed in SAE_SEEDS:
        world = vit_sae_world(config, sae_seed, ALIGN_SEEDS, n_train)
        probe = _load(f"shapes:train:{N_ABLATION}", world.target)
        ablation = sae_ablation_scores(world, *probe)
        rows.append(removal(world, *_load(f"shapes:test:{N_EVAL}", world.target), ablation, N_RANDOM))
        _print_row(f"{name} SAE seed {sae_seed}", rows[-1])
    miclip = float(np.mean([np.mean(r["miclip"]) for r in rows]))
    random = float(np.mean([r["random"] for r in rows]))
    ablation = float(np.mean([r["ablation"] for r in rows]))
    print(f"{name} mean: MiClip {miclip:.1f}, random firing {random:.1f}, gap {random - miclip:.1f}; "
          f"Ablation {ablation:.1f} (gap {random - ablation:.1f})")
    return dict(miclip=miclip, random=random, ablation=ablation, rows=rows)


# --------------------------------------------------------------------------------------------
# CI-sized: one SAE seed, one alignment seed, fewer images, a looser floor

CI_SAE, N_CI_SAE, N_CI_EVAL, N_CI_RANDOM, N_CI_ABLATION = FLOOR_SAE, 800, 300, 5, 120
CI_FLOOR, CI_TOLERANCE = 2.0, 2.0  # points


def test_sae_feature_removal_beats_random_firing_features_fast():
    """The restated floor at a CI size (SAE on 800 images, seed 0; one alignment; 300 test images;
    5 random draws; Ablation reference on 120 training images): MiClip's top-5 features cost at
    least 2 points more than 5 random firing features, and the Ablation reference removes at least
    as much as MiClip (within 2 points). Also checks that :func:`sae_ablation_scores` equals
    ``baselines.ablation_scores`` with the SAE's edit on a sample of features."""
    world = vit_sae_world(CI_SAE, 0, (0,), N_CI_SAE)
    probe_x, probe_y = _load(f"shapes:train:{N_CI_ABLATION}", world.target)
    ablation = sae_ablation_scores(world, probe_x, probe_y)
    assert ablation.shape == (world.n_classes, world.sae.n_latents) and torch.isfinite(ablation).all()

    sample = torch.cat([ablation.topk(2, dim=1).indices.flatten(), torch.arange(0, world.sae.n_latents, 97)]).unique()
    library = ablation_scores(world.target.module, LAYER, probe_x[:60], probe_y[:60], world.n_classes,
                              n_units=len(sample),
                              edit_factory=lambda u, mode, beta: world.space.edit_factory(sample[torch.as_tensor(u)], mode, beta))
    ours = sae_ablation_scores(world, probe_x[:60], probe_y[:60])[:, sample]
    torch.testing.assert_close(ours, library, atol=1e-5, rtol=1e-4)

    r = removal(world, *_load(f"shapes:test:{N_CI_EVAL}", world.target), ablation, N_CI_RANDOM)
    _print_row("CI size", r)
    miclip = r["miclip"][0]
    assert r["ev"] >= 0.8
    assert miclip <= r["random"] - CI_FLOOR, f"MiClip {miclip:.1f} vs random firing {r['random']:.1f}"
    assert r["ablation"] <= miclip + CI_TOLERANCE, f"Ablation {r['ablation']:.1f} vs MiClip {miclip:.1f}"


# --------------------------------------------------------------------------------------------
# The full check (slow)


@pytest.mark.slow
def test_sae_feature_removal_floor():
    """Issue 17's floor on the setting that meets it (k=8 on 3000 images, module docstring):
    MiClip's top-5 SAE features cost at least 10 points more than 5 random firing features (mean
    over 3 alignment x 2 SAE seeds; measured 20.8), the Ablation reference removes at least as much
    as MiClip for each SAE seed, and MiClip's gap is at least 35% of the reference's (measured 56%)."""
    grid = _seed_grid(FLOOR_SAE, N_FLOOR_SAE, "k=8, 3000 images")
    gap, reference_gap = grid["random"] - grid["miclip"], grid["random"] - grid["ablation"]
    assert all(r["ev"] >= 0.85 for r in grid["rows"])
    assert all(r["ablation"] <= np.mean(r["miclip"]) for r in grid["rows"])
    assert gap >= SHARE * reference_gap, f"MiClip's gap {gap:.1f} vs the reference's {reference_gap:.1f}"
    assert gap >= FLOOR, f"MiClip {grid['miclip']:.1f} vs random firing {grid['random']:.1f}"


@pytest.fixture(scope="module")
def notebook_grid():
    return _seed_grid(NOTEBOOK_SAE, N_NOTEBOOK_SAE, "k=16, 1500 images (notebook)")


@pytest.mark.slow
def test_notebook_sae_config_removes_more_than_random_firing_features(notebook_grid):
    """Notebook 02's SAE (k=16), what holds: MiClip's top-5 features cost at least 2 points more
    than random firing features (measured 6.7), at least 35% of the Ablation reference's gap
    (measured 46%), and the reference removes at least as much as MiClip for each SAE seed."""
    gap = notebook_grid["random"] - notebook_grid["miclip"]
    assert all(r["ablation"] <= np.mean(r["miclip"]) for r in notebook_grid["rows"])
    assert gap >= 2.0 and gap >= SHARE * (notebook_grid["random"] - notebook_grid["ablation"])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="notebook 02's SAE (k=16): five of its features carry less (MiClip's gap 6.7, the Ablation "
                          "reference's 14.5; module docstring)")
def test_notebook_sae_config_meets_the_floor(notebook_grid):
    """The 10-point floor on notebook 02's SAE, a strict xfail: it fails the day the notebook's
    setting meets the floor, so that the marker is removed."""
    assert notebook_grid["random"] - notebook_grid["miclip"] >= FLOOR
