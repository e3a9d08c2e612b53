"""Write notebooks/02_sae_features.ipynb (then run tools/execute_notebooks.sh to store its outputs).

Run: ``python tools/nb_02_sae_features.py``. The cell list is kept here, as in make_notebooks.py,
so that reviews read Python rather than JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nbbuild import code, md, params, write  # noqa: E402

NB = Path(__file__).resolve().parent.parent / "notebooks"



def sae_features():
    return [
        md(r"""
        # 02 · SAE features as units, and where in the image they fire

        **What this notebook teaches**
        1. train a top-k sparse autoencoder (k-SAE) on a ViT's token activations and read its health
           (explained variance, L0, dead latents);
        2. use its features as MiClip units: align them with CLIP, then localize colour and shape concepts;
        3. *ground* a feature spatially (a heatmap over the image) and check it against pixel masks;
        4. steer features: remove a class's top features and measure what the model loses.

        **The k-SAE** (Gao et al. 2024). For a token activation $a \in \mathbb R^d$,

        $$z = \mathrm{TopK}\big(W_{enc}(a - b_{pre}) + b_{enc}\big), \qquad \hat a = W_{dec}\, z + b_{pre},$$

        TopK keeps the $k$ largest pre-activations (ReLU'd) and zeroes the rest, so every token is
        explained by at most $k$ of $F = \text{expansion}\cdot d$ latents. The columns of $W_{dec}$ have
        unit norm (the gradient along each column is removed before every step, the columns renormalised
        after it), so a code's size is the feature's strength. The loss is
        $\lVert a - \hat a\rVert^2 / \mathrm{Var}(a)$ plus an auxiliary term (AuxK) in which the latents
        that have not fired for a while reconstruct the residual $a - \hat a$: it revives dead latents.

        **Features as units.** Feature $i$ of an image is its code pooled over the patch tokens,
        $u_i = \max_t z_{t,i}$. MiClip aligns these pooled codes exactly as it aligns neurons, so
        `unit_embeddings`, `localize` and `describe` work unchanged.

        **Steering a feature** edits the codes and keeps what the SAE fails to explain:
        $$a' = W_{dec}\, z' + b_{pre} + (a - \hat a) = a + W_{dec}(z' - z),$$
        with $z'_i = \beta z_i$ for the edited features ($\beta = 0$ removes them); $\beta = 1$ returns $a$ exactly.
        """),
        params("# The real profile here: CLIP ViT-B/16 'openai' itself is the model, block 10 (configured, not run here)."),
        code("""
        import warnings
        import numpy as np
        import pandas as pd
        import torch
        from miclip_nb import (align, datasets, embed, grounding, interpret, pipeline, sae, select, shapes, steer,
                               store, widgets, zoo)

        if PROFILE == "toy":
            target, backend = zoo.load_target("toy_vit"), embed.load_clip("toyclip")
            layer = "blocks.4"                                   # (N, 65, 128): CLS + 8 x 8 patch tokens
            sae_data = datasets.open_dataset("shapes:train:1500")
            sae_config = sae.SAEConfig(expansion=8, k=16, epochs=5)
            n_sae_images = None
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            target = zoo.load_target("clip:ViT-B-16/openai")     # CLIP as a zero-shot ImageNet classifier
            backend = embed.load_clip("ViT-B-16", "openai", device=device)
            layer = zoo.PAPER_LAYERS["clip:ViT-B-16"]            # visual.transformer.resblocks.10
            sae_data = datasets.open_dataset(IMAGENET_TRAIN)
            sae_config = sae.SAEConfig(expansion=16, k=32, epochs=2)
            n_sae_images = 20000                                 # 197 tokens x 768 floats per image on disk
        class_emb = pipeline.class_prompts_embedding(backend, target.class_names)
        print(f"model {target.name}, layer {layer}, SAE: {sae_config.expansion}x expansion, k = {sae_config.k}")
        """),
        md("""
        ## 1 · Train the SAE on token activations
        The store keeps every token (`pooling="none"`); the SAE streams it shard by shard. Images held out
        by a hash of their index give the metrics. Both the store and the SAE are cached by a hash of
        everything that determines them.
        """),
        code("""
        from miclip_nb.claims import claim
        tokens = store.build_store(target, sae_data, [layer], pooling="none", clip=backend, n_items=n_sae_images)
        autoencoder, metrics = sae.fit_sae(tokens, layer, sae_config, seed=SEED)
        print(f"{tokens.n_rows} images x {tokens.fields['acts/' + layer][0]} tokens -> {autoencoder.n_latents} latents")
        """),
        code("""
        print(f"held out: explained variance {metrics['explained_variance']:.3f}, L0 {metrics['l0']:.1f} "
              f"(k = {autoencoder.k}), dead latents {metrics['dead_fraction']:.1%}")
        """, ignore_output="trained figures"),
        code("""
        _ = claim("the SAE explains most of the held-out variance", metrics["explained_variance"], at_least=0.85)
        _ = claim("most latents fire on held-out tokens", 1 - metrics["dead_fraction"], at_least=0.7)
        """),
        md("""
        ## 2 · SAE features as MiClip units
        Each image's codes are max-pooled over its patch tokens and aligned with CLIP as neurons are.
        Constant units (latents that never vary over the images) get zero embeddings; features seen on
        fewer than 10% of the images get embeddings fit to a handful of examples, so `drop_rare_units`
        keeps `localize` away from them. The encoder trains with the default `unit_dropout=0.95` (95% of
        the inputs zeroed per row, so that one feature alone means something): on this SAE it makes the
        removal below about three times stronger than 0.5 or 0.0 do, and leaves the grounding unchanged
        (measured over four SAE seeds, see `tests/test_sae.py`).
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (trained figures)
        if PROFILE == "toy":
            codes = sae.build_sae_code_store(tokens, autoencoder, layer, pooling="max")
        else:  # align on many more images than the SAE saw, without storing their tokens
            codes = sae.build_sae_code_store_from_model(target, sae_data, layer, autoencoder, clip=backend,
                                                        pooling="max", n_items=200_000)
        freq = sae.feature_frequency(codes)
        with warnings.catch_warnings():  # latents that never fire are constant units: align warns about them
            warnings.simplefilter("ignore", UserWarning)
            encoder = pipeline.fit_alignment(codes, class_emb, seed=SEED, progress=False)
        feature_emb = sae.drop_rare_units(interpret.unit_embeddings(encoder), freq, min_freq=0.1)
        print(f"{int((freq >= 0.1).sum())} of {autoencoder.n_latents} features fire on at least 10% of the images; "
              f"{len(encoder.constant_units)} constant over them (zero embeddings)")
        """),
        md("""
        ## 3 · Localize colour and shape features
        The top features for each concept (cosine similarity in brackets).
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (feature numbers come from training)
        concepts = list(shapes.COLORS + shapes.SHAPES) if PROFILE == "toy" else ["red", "blue", "stripes", "dog", "wheel"]
        concept_emb = interpret.encode_concepts(backend, concepts)
        localized = grounding.localized_features(feature_emb, concept_emb, concepts, tau=5)
        pd.DataFrame({c: [f"{u} ({s:.2f})" for u, s in zip(*localized[c])] for c in concepts},
                     index=[f"#{i + 1}" for i in range(5)]).T
        """),
        md("""
        ## 4 · Where do they fire? Heatmaps across images
        A feature's heatmap is its code at every patch token, upsampled to the image. Top row: the single
        top feature for the concept; bottom row: its top-5 set, codes summed with their cosines as weights.
        """),
        code("""
        CONCEPT = "red" if PROFILE == "toy" else "dog"
        probe = datasets.open_dataset("shapes:test:300" if PROFILE == "toy" else IMAGENET_VAL)
        if PROFILE == "toy":  # six images with a red object, then two without
            colour = probe.attributes()[:, 1] == shapes.COLORS.index(CONCEPT)
            idx = np.flatnonzero(colour)[:6].tolist() + np.flatnonzero(~colour)[:2].tolist()
        else:
            idx = list(range(8))
        pil = [probe[i][0].convert("RGB") for i in idx]
        x = torch.stack([target.preprocess(im) for im in pil])
        shown = np.stack([np.asarray(im.resize(tuple(x.shape[-2:]))) for im in pil])
        units, weights = localized[CONCEPT]
        heat = np.concatenate([grounding.feature_heatmaps(target, layer, autoencoder, x, units[0]),
                               grounding.feature_heatmaps(target, layer, autoencoder, x, units, weights=weights)])
        titles = [" ".join(probe.sample(i).concepts[:2]) if PROFILE == "toy" else target.class_names[probe[i][1]] for i in idx]
        _ = grounding.plot_heatmaps(np.concatenate([shown, shown]), heat, titles + [""] * len(titles), ncols=8, size=1.2,
                                    suptitle=f"'{CONCEPT}': feature {units[0]} (top), its top-5 set {units} (bottom)")
        """),
        md("""
        ## 5 · Does the colour feature sit on that colour? IoU against the masks
        The Shapes world knows every object's pixels. Threshold each heatmap at its 80th percentile
        (the top 20% of pixels) and compare with the object mask of the colour, on the test images
        that contain the colour. *Chance* is the IoU of 20% of the pixels chosen at random.

        *Where* is not the only question: `auroc_*` asks *whether*. It ranks all 300 images by the
        feature's strongest code anywhere in the image and scores how well that ranking separates the
        images that show the colour from those that do not (0.5 = no idea, 1 = perfect).
        """),
        code("""
        if PROFILE == "toy":
            table = grounding.sae_concept_grounding(target, layer, autoencoder, feature_emb, concept_emb[:6], concepts[:6],
                                                    probe, tau=5, n_images=300)
            table["set / chance"] = table.iou_set / table.chance_iou
            display(table.drop(columns=["area", "n_images"]).round(3))
            print(f"mean IoU: top feature {table.iou_feature.mean():.3f}, top-5 set {table.iou_set.mean():.3f}, "
                  f"chance {table.chance_iou.mean():.3f}")
        """, ignore_output="trained figures"),
        code("""
        if PROFILE == "toy":
            _ = claim("each colour's top-5 feature set covers its objects at several times chance (mean ratio)",
                      (table.iou_set / table.chance_iou).mean(), at_least=2.5)
            _ = claim("and every colour's set beats chance", (table.iou_set / table.chance_iou).min(), at_least=1.5)
        """),
        md("""
        Read the two columns together. A top feature with a high `auroc_feature` but an IoU near chance
        *knows that the image holds the colour* and fires somewhere else: by block 4 of 6, attention has
        spread image-level facts over the patch tokens, and the SAE has features for them. A top
        feature low on both is simply a poor pick: on this small SAE, MiClip's single best feature is
        an unreliable reading (compare the colours above, and the SAE seeds in `tests/test_sae.py`).
        The top-5 set mixes such features with ones that sit on the object, and its map covers the
        object at several times chance for every colour.

        ## 6 · Remove a class's top-5 features
        Each class's five features that MiClip localizes for its name are set to zero at every token
        (the reconstruction error kept, see the equation above). *posterior* ranks features by
        $\\log p(\\text{class} \\mid \\text{feature})$ against the six classes, the tables' default; *cosine* by
        plain cosine, the paper's rule (`miclip_nb.interpret` explains both). The control: five random
        features among those that fire on at least 10% of the images (removing a dead latent would
        change nothing).
        """),
        code("""
        eval_images, eval_labels = pipeline.load_eval_images(target, probe, n=300 if PROFILE == "toy" else 2000)
        classes = sorted(set(eval_labels.tolist()))
        edit = sae.sae_edit_factory(autoencoder)
        firing = freq >= 0.1

        def removal(selector):
            df = steer.class_deltas(target.module, eval_images, eval_labels, layer, select.selection(selector, classes, 5),
                                    beta=0.0, edit_factory=edit, n_other=0)
            return round(float(df.delta_acc.mean()), 2)

        def random_firing(seed):
            scores = torch.rand(len(target.class_names), autoencoder.n_latents, generator=torch.Generator().manual_seed(seed))
            return select.ScoreSelector("random", scores.masked_fill(~firing, -1.0))

        temperature = interpret.concept_temperature(encoder)
        rows = {f"MiClip top-5 ({scoring})": removal(select.MiClipSelector(feature_emb, class_emb, scoring=scoring, temperature=temperature))
                for scoring in ("posterior", "cosine")}
        rows.update({f"random 5, draw {s}": removal(random_firing(s)) for s in range(3)})
        pd.Series(rows, name="class-averaged delta-accuracy (points)")
        """, ignore_output="trained figures"),
        code("""
        random_mean = np.mean([v for k, v in rows.items() if k.startswith("random")])
        _ = claim("removing MiClip's top-5 features (posterior) costs at least 2 points more than random firing features",
                  random_mean - rows["MiClip top-5 (posterior)"], at_least=2.0)
        """),
        md("""
        ## 7 · Panel: a concept, its features, their heatmaps
        Pick a concept: its top features appear with their cosines. Pick a feature and some images: the
        heatmaps redraw, with the IoU against the concept's masks where the Shapes world knows them.
        """),
        code("""
        # NBVAL_IGNORE_OUTPUT
        # (a live panel: its text form holds image bytes)
        state = widgets.build_feature_state(target, layer, autoencoder, feature_emb, backend, probe, concepts, n_images=12)
        panel = widgets.sae_feature_panel(state, tau=5)
        panel["widget"]
        """),
        md("""
        ## Exercises
        1. Train the SAE with `k=4` and with `k=64` (`sae.SAEConfig(expansion=8, k=...)`). How do explained
           variance and the colour IoU move? Is there a k where features become *less* localized?
        2. Align with `align.AlignConfig(unit_dropout=0.0)` (pass `config=` to `fit_alignment`). Does the
           removal gap to random change? Does grounding?
        3. Ground a *shape* ("star", "cross") instead of a colour: pass `concept_emb[6:]`, `concepts[6:]`
           to `sae_concept_grounding`. Which is easier for this ViT at `blocks.4`, and why might that be?
        4. Train the SAE on `blocks.1` instead of `blocks.4`. Do the top features' `auroc_feature` and
           `iou_feature` move together more closely in an early block? What does that say about where
           a ViT keeps *where*?
        """),
    ]


if __name__ == "__main__":
    NB.mkdir(exist_ok=True)
    write(NB / "02_sae_features.ipynb", sae_features())
    print("written: notebooks/02_sae_features.ipynb")
