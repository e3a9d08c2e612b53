"""MiClip on the Shapes world: localized units are causal and described by their concept.

These are the issue's floors, checked on the committed toy models and ToyCLIP, with the alignment
averaged over three seeds as the paper reports it (about 4 minutes on 2 cores: marked slow, run
with ``pytest -m slow tests/test_miclip_toy.py -s`` to see the figures).

MiClip localizes by the posterior (interpret module docstring): a unit is picked for the class
that stands out against the other classes in its description. The paper's plain-cosine rule is
checked beside it (a weaker floor), so that a regression in either shows.

- toy_cnn (stages.2): removing each class's top-5 units costs 16.3 points under the posterior,
  11.4 under cosine, 1.5 for random units (Ablation reference 60.0).
- toy_vit (blocks.4): no selection of five residual-stream dimensions moves accuracy much.
  MiClip's units cost 0.6 points; the Ablation reference, each class's five dimensions whose
  removal alone costs the most, costs 3.8 (random +0.1). The 10-point floor is out of reach for
  any method there, and is recorded as a strict xfail (it fails the day the gap closes, so that
  the marker is removed). The paper's Table 2a shows the same for ViT-B/16 neurons (MiClip
  removal -0.04%); its ViT effects come from SAE features (tests/test_sae.py).
"""

import pytest
import torch

from miclip_nb import align, datasets, interpret, pipeline, shapes
from miclip_nb.intervention import intervention_table
from miclip_nb.select import MiClipSelector, RandomSelector

N_TRAIN, N_EVAL, N_RANDOM, SEEDS = 4000, 1200, 20, (0, 1, 2)
pytestmark = pytest.mark.slow
VIT_GAP = "five residual-stream dimensions of toy_vit barely move its accuracy, for any method (see module docstring)"


@pytest.fixture(scope="module", params=["toy_cnn", "toy_vit"])
def aligned(request):
    config = pipeline.PipelineConfig(model=request.param, clip="toyclip", train_data=f"shapes:train:{N_TRAIN}", seeds=(0,))
    prep = pipeline.prepare(config, progress=False)
    encoders = [align.fit_alignment(prep.store, prep.class_text_emb_cd, seed=s, progress=False) for s in SEEDS]
    images, labels = datasets.load_images(datasets.open_dataset(f"shapes:test:{N_EVAL}"), prep.target.preprocess)
    temperatures = [interpret.concept_temperature(e) for e in encoders]
    return prep, encoders[0], [interpret.unit_embeddings(e) for e in encoders], images, labels, temperatures


def _mean_delta(prep, images, labels, selectors, beta):
    """(delta-accuracy, share of other-class images flipped to the class), averaged over classes and
    over the selectors (seeds or random draws)."""
    table = intervention_table(prep.target, images, prep.layer, {"m": selectors}, labels=labels, betas={"x": beta},
                               progress=False)
    return float(table["delta_acc"].mean()), float(table["flip_to_class"].mean())


def _miclip_selectors(prep, unit_embs, temperatures, scoring="posterior"):
    return [MiClipSelector(u, prep.class_text_emb_cd, scoring=scoring, temperature=t) for u, t in zip(unit_embs, temperatures)]


def _random_selectors(unit_embs):
    return [RandomSelector(unit_embs[0].shape[0], s) for s in range(N_RANDOM)]


def test_removal_of_miclip_units_hurts_far_more_than_random(aligned, request):
    prep, _, unit_embs, images, labels, temps = aligned
    if prep.target.name == "toy_vit":
        request.applymarker(pytest.mark.xfail(strict=True, reason=VIT_GAP))
    miclip, _ = _mean_delta(prep, images, labels, _miclip_selectors(prep, unit_embs, temps), 0.0)
    random, _ = _mean_delta(prep, images, labels, _random_selectors(unit_embs), 0.0)
    print(f"{prep.target.name}: removal, MiClip {miclip:.1f}, random {random:.1f}")
    assert miclip <= random - 10.0, f"{prep.target.name}: MiClip removal {miclip:.1f} vs random {random:.1f}"


def test_cosine_localization_also_removes_more_than_random(aligned, request):
    """The paper's plain-cosine rule, same encoders: its units are causal too, less so (toy_cnn:
    11.4 points against 1.5). Floor: 5 points more than random; toy_vit as above (strict xfail)."""
    prep, _, unit_embs, images, labels, temps = aligned
    if prep.target.name == "toy_vit":
        request.applymarker(pytest.mark.xfail(strict=True, reason=VIT_GAP))
    cosine, _ = _mean_delta(prep, images, labels, _miclip_selectors(prep, unit_embs, temps, "cosine"), 0.0)
    random, _ = _mean_delta(prep, images, labels, _random_selectors(unit_embs), 0.0)
    print(f"{prep.target.name}: removal, MiClip (cosine) {cosine:.1f}, random {random:.1f}")
    assert cosine <= random - 5.0


def test_ablation_reference_bounds_the_removal(aligned):
    """The Ablation reference (each class's 5 units whose removal alone costs most, on 300 training
    images) removes at least as much as MiClip: it reads the quantity removal measures. On toy_vit
    it also shows why the 10-point floor is out of reach there: even these units cost only about
    4 points (measured, see the module docstring)."""
    from miclip_nb.baselines import ablation_scores
    from miclip_nb.select import ScoreSelector

    prep, _, unit_embs, images, labels, temps = aligned
    probe_images, probe_labels = datasets.load_images(datasets.open_dataset("shapes:train:300"), prep.target.preprocess)
    scores = ablation_scores(prep.target.module, prep.layer, probe_images, probe_labels, len(prep.target.class_names))
    ablation, _ = _mean_delta(prep, images, labels, [ScoreSelector("ablation", scores)], 0.0)
    miclip, _ = _mean_delta(prep, images, labels, _miclip_selectors(prep, unit_embs, temps), 0.0)
    print(f"{prep.target.name}: removal, Ablation {ablation:.1f}, MiClip {miclip:.1f}")
    assert ablation <= miclip


def test_enhancement_of_miclip_units_helps_at_least_as_much_as_random(aligned):
    prep, _, unit_embs, images, labels, temps = aligned
    miclip, flips = _mean_delta(prep, images, labels, _miclip_selectors(prep, unit_embs, temps), 2.0)
    random, random_flips = _mean_delta(prep, images, labels, _random_selectors(unit_embs), 2.0)
    print(f"{prep.target.name}: enhancement, MiClip {miclip:.1f} (flips {flips:.2f}%), random {random:.1f} ({random_flips:.2f}%)")
    assert miclip >= random, f"{prep.target.name}: MiClip enhancement {miclip:.1f} vs random {random:.1f}"
    assert flips >= random_flips


def test_localized_units_are_described_by_their_concept(aligned):
    """Localize each shape and colour (among those 12 concepts) to one unit; is the concept among
    that unit's top-3 descriptions? Checked for both scorings; the rate is printed."""
    prep, _, unit_embs, _, _, temps = aligned
    vocab = list(shapes.SHAPES + shapes.COLORS)
    vocab_emb = interpret.encode_concepts(prep.backend, vocab)
    for scoring in interpret.SCORINGS:
        rates = []
        for unit_emb, temperature in zip(unit_embs, temps):
            hits = 0
            for concept, emb in zip(vocab, vocab_emb):
                reference = vocab_emb if scoring == "posterior" else None
                unit = int(interpret.localize(unit_emb, emb, 1, reference, temperature)[0][0])
                hits += concept in [c for c, _ in interpret.describe(unit_emb, unit, vocab_emb, vocab, tau=3)]
            rates.append(hits / len(vocab))
        print(f"{prep.target.name}: description rate ({scoring}) per seed {[round(r * len(vocab)) for r in rates]} of {len(vocab)}")
        assert min(rates) > 0.5, scoring


def test_same_seed_same_encoder_and_units(aligned):
    prep, encoder, unit_embs, _, _, _ = aligned
    unit_emb = unit_embs[0]
    again = align.fit_alignment(prep.store, prep.class_text_emb_cd, seed=0, cache=False, progress=False)
    for a, b in zip(encoder.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    star = interpret.encode_concepts(prep.backend, ["star"])[0]
    assert torch.equal(interpret.localize(unit_emb, star, 5)[0], interpret.localize(interpret.unit_embeddings(again), star, 5)[0])
    temperature = interpret.concept_temperature(again)
    assert interpret.concept_temperature(encoder) == temperature
    first, second = (MiClipSelector(u, prep.class_text_emb_cd, temperature=temperature) for u in (unit_emb, interpret.unit_embeddings(again)))
    assert all(torch.equal(first.select(c, 5), second.select(c, 5)) for c in range(len(prep.target.class_names)))


def test_encoder_refuses_activations_of_another_layer(aligned):
    from miclip_nb.align import EncoderMismatchError

    prep, encoder, _, _, _, _ = aligned
    encoder.check_compatible(model=prep.store.spec.model, layer=prep.layer, pooling="mean")
    with pytest.raises(EncoderMismatchError):
        encoder.check_compatible(layer="stages.0" if prep.layer != "stages.0" else "stages.1")
