# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · SAE features as units, and where in the image they fire
#
# **What this notebook teaches**
# 1. train a top-k sparse autoencoder (k-SAE) on a ViT's token activations and read its health
#    (explained variance, L0, dead latents);
# 2. use its features as MiClip units: align them with CLIP, then localize colour and shape concepts;
# 3. *ground* a feature spatially (a heatmap over the image) and check it against pixel masks;
# 4. steer features: remove a class's top features and measure what the model loses.
#
# **The k-SAE** (Gao et al. 2024). For a token activation $a \in \mathbb R^d$,
#
# $$z = \mathrm{TopK}\big(W_{enc}(a - b_{pre}) + b_{enc}\big), \qquad \hat a = W_{dec}\, z + b_{pre},$$
#
# TopK keeps the $k$ largest pre-activations (ReLU'd) and zeroes the rest, so every token is
# explained by at most $k$ of $F = \text{expansion}\cdot d$ latents. The columns of $W_{dec}$ have
# unit norm (the gradient along each column is removed before every step, the columns renormalised
# after it), so a code's size is the feature's strength. The loss is
# $\lVert a - \hat a\rVert^2 / \mathrm{Var}(a)$ plus an auxiliary term (AuxK) in which the latents
# that have not fired for a while reconstruct the residual $a - \hat a$: it revives dead latents.
#
# **Features as units.** Feature $i$ of an image is its code pooled over the patch tokens,
# $u_i = \max_t z_{t,i}$. MiClip aligns these pooled codes exactly as it aligns neurons, so
# `unit_embeddings`, `localize` and `describe` work unchanged.
#
# **Steering a feature** edits the codes and keeps what the SAE fails to explain:
# $$a' = W_{dec}\, z' + b_{pre} + (a - \hat a) = a + W_{dec}(z' - z),$$
# with $z'_i = \beta z_i$ for the edited features ($\beta = 0$ removes them); $\beta = 1$ returns $a$ exactly.

# %%
# Parameters. PROFILE picks the whole setting: "toy" (the Shapes world: offline, CPU, minutes), "real"
# (the paper's: ImageNet folders in $IMAGENET_TRAIN / $IMAGENET_VAL, CLIP ViT-B/16 'openai', a GPU),
# or your own, e.g. profiles.get("real").replace(model="timm:convnext_tiny", train_data="/my/photos").
import os

from miclip_nb import profiles

PROFILE = os.environ.get("MICLIP_PROFILE", "toy")
SEED = 0
P = profiles.get(PROFILE)
print(f"profile {P.name}: {P.description}")

# %%
import warnings

import numpy as np
import pandas as pd
import torch

from miclip_nb import align, datasets, embed, grounding, interpret, pipeline, sae, select, store, units, widgets, zoo
from miclip_nb.claims import claim

target = zoo.load_target(P.sae_model, pretrained=P.pretrained)
backend = embed.load_clip(P.clip, P.clip_pretrained, device="cuda" if torch.cuda.is_available() else "cpu")
layer = P.sae_layer
class_emb = pipeline.class_prompts_embedding(backend, target.class_names)
print(f"model {target.name}, layer {layer}, SAE: {P.sae.expansion}x expansion, k = {P.sae.k}")

# %% [markdown]
# ## 1 · Train the SAE on token activations
# The store keeps every token (`pooling="none"`); the SAE streams it shard by shard. Images held out
# by a hash of their index give the metrics. Both the store and the SAE are cached by a hash of
# everything that determines them.

# %%
tokens = store.build_store(target, P.sae_data, [layer], pooling="none", clip=backend, n_items=P.n_sae_images)
autoencoder, metrics = sae.fit_sae(tokens, layer, P.sae, seed=SEED)
print(f"{tokens.n_rows} images x {tokens.fields['acts/' + layer][0]} tokens -> {autoencoder.n_latents} latents")

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
print(f"held out: explained variance {metrics['explained_variance']:.3f}, L0 {metrics['l0']:.1f} "
      f"(k = {autoencoder.k}), dead latents {metrics['dead_fraction']:.1%}")

# %%
_ = claim("the SAE explains most of the held-out variance", metrics["explained_variance"], at_least=0.85,
          check=P.check_claims)
_ = claim("most latents fire on held-out tokens", 1 - metrics["dead_fraction"], at_least=0.7, check=P.check_claims)

# %% [markdown]
# ## 2 · SAE features as MiClip units
# Each image's codes are max-pooled over its patch tokens and aligned with CLIP as neurons are (a
# store built with the SAE as its transform: from the token store above, or, where the profile asks
# for more images than the SAE saw, straight from the model). Constant units (latents that never
# vary over the images) get zero embeddings; features seen on fewer than 10% of the images get
# embeddings fit to a handful of examples, so `drop_rare_units` keeps `localize` away from them.
# The encoder trains with the default `unit_dropout=0.95` (95% of the inputs zeroed per row, so
# that one feature alone means something): on this SAE it makes the removal below about three
# times stronger than 0.5 or 0.0 do, and leaves the grounding unchanged (measured over four SAE
# seeds, see `tests/test_sae.py`).

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
codes = sae.code_store(autoencoder, tokens, target=target, clip=backend, pooling="max",
                       dataset=P.sae_data if P.n_code_images else None, n_items=P.n_code_images)
freq = sae.feature_frequency(codes)
with warnings.catch_warnings():  # latents that never fire are constant units: align warns about them
    warnings.simplefilter("ignore", UserWarning)
    encoder = align.fit_alignment(codes, class_emb, seed=SEED, progress=False)
feature_emb = sae.drop_rare_units(interpret.unit_embeddings(encoder), freq, min_freq=0.1)
print(f"{int((freq >= 0.1).sum())} of {autoencoder.n_latents} features fire on at least 10% of the images; "
      f"{len(encoder.constant_units)} constant over them (zero embeddings)")

# %% [markdown]
# ## 3 · Localize colour and shape features
# The top features for each concept (cosine similarity in brackets).

# %%
# NBVAL_IGNORE_OUTPUT
# (feature numbers come from training)
concepts = list(P.grounding_concepts)
concept_emb = interpret.encode_concepts(backend, concepts)
localized = grounding.localized_features(feature_emb, concept_emb, concepts, tau=5)
pd.DataFrame({c: [f"{u} ({s:.2f})" for u, s in zip(*localized[c])] for c in concepts},
             index=[f"#{i + 1}" for i in range(5)]).T

# %% [markdown]
# ## 4 · Where do they fire? Heatmaps across images
# A feature's heatmap is its code at every patch token, upsampled to the image. Top row: the single
# top feature for the concept; bottom row: its top-5 set, codes summed with their cosines as
# weights. Where the data has pixel masks, the first six images show the concept and the last two
# do not.

# %%
probe = datasets.as_dataset(P.grounding_data or P.eval_data)
idx = grounding.images_showing(probe, P.grounding_concept, n_with=6, n_without=2)
x, _ = datasets.load_images(torch.utils.data.Subset(probe, idx), target.preprocess)
shown = np.stack([np.asarray(probe[i][0].convert("RGB").resize(tuple(x.shape[-2:])[::-1])) for i in idx])
feature_units, weights = localized[P.grounding_concept]
heat = np.concatenate([grounding.feature_heatmaps(target, layer, autoencoder, x, feature_units[0]),
                       grounding.feature_heatmaps(target, layer, autoencoder, x, feature_units, weights=weights)])
titles = [target.class_names[probe[i][1]] if probe[i][1] >= 0 else "" for i in idx]
_ = grounding.plot_heatmaps(np.concatenate([shown, shown]), heat, titles + [""] * len(titles), ncols=len(idx), size=1.2,
                            suptitle=f"'{P.grounding_concept}': a top feature (top row), its top-5 set (bottom)")

# %% [markdown]
# ## 5 · Does the colour feature sit on that colour? IoU against the masks
# Where the data knows every object's pixels (the Shapes world does), threshold each heatmap at its
# 80th percentile (the top 20% of pixels) and compare with the object mask of the colour, on the
# images that contain the colour. *Chance* is the IoU of 20% of the pixels chosen at random.
#
# *Where* is not the only question: `auroc_*` asks *whether*. It ranks all 300 images by the
# feature's strongest code anywhere in the image and scores how well that ranking separates the
# images that show the colour from those that do not (0.5 = no idea, 1 = perfect).

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
table = pd.DataFrame()
if grounding.has_masks(probe):  # the first six concepts of the profile are colours
    table = grounding.sae_concept_grounding(target, layer, autoencoder, feature_emb, concept_emb[:6], concepts[:6],
                                            probe, tau=5, n_images=300)
    table["set / chance"] = table.iou_set / table.chance_iou
table.drop(columns=["area", "n_images"], errors="ignore").round(3)

# %%
if len(table):
    _ = claim("each colour's top-5 feature set covers its objects at several times chance (mean ratio)",
              (table.iou_set / table.chance_iou).mean(), at_least=2.5, check=P.check_claims)
    _ = claim("and every colour's set beats chance", (table.iou_set / table.chance_iou).min(), at_least=1.5,
              check=P.check_claims)

# %% [markdown]
# Read the two columns together. A top feature with a high `auroc_feature` but an IoU near chance
# *knows that the image holds the colour* and fires somewhere else: by block 4 of 6, attention has
# spread image-level facts over the patch tokens, and the SAE has features for them. A top
# feature low on both is simply a poor pick: on this small SAE, MiClip's single best feature is
# an unreliable reading (compare the colours above, and the SAE seeds in `tests/test_sae.py`).
# The top-5 set mixes such features with ones that sit on the object, and its map covers the
# object at several times chance for every colour.
#
# ## 6 · Remove a class's top-5 features
# Each class's five features that MiClip localizes for its name are set to zero at every token
# (the reconstruction error kept, see the equation above). *posterior* ranks features by
# $\log p(\text{class} \mid \text{feature})$ against the classes, the tables' default; *cosine* by
# plain cosine, the paper's rule (`miclip_nb.interpret` explains both). The control: five random
# features among those that fire on at least 10% of the images (removing a dead latent would
# change nothing).

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
from miclip_nb.intervention import intervention_table

space = units.sae_features(target, layer, autoencoder)
temperature = interpret.concept_temperature(encoder)
selectors = {f"MiClip top-5 ({s})": [select.MiClipSelector(feature_emb, class_emb, scoring=s, temperature=temperature)]
             for s in ("posterior", "cosine")}
selectors["random 5 firing"] = [select.RandomSelector(autoencoder.n_latents, s, among=freq >= 0.1) for s in range(3)]
removal = intervention_table(target, probe, layer, selectors, betas={"remove": 0.0}, edit_factory=space.edit_factory,
                             n_other=0, progress=False).groupby("method", sort=False)["delta_acc"].mean()
removal.rename("class-averaged delta-accuracy (points)")

# %%
_ = claim("removing MiClip's top-5 features (posterior) costs at least 2 points more than random firing features",
          removal["random 5 firing"] - removal["MiClip top-5 (posterior)"], at_least=2.0, check=P.check_claims)

# %% [markdown]
# ## 7 · Panel: a concept, its features, their heatmaps
# Pick a concept: its top features appear with their cosines. Pick a feature and some images: the
# heatmaps redraw, with the IoU against the concept's masks where the data has them.

# %%
# NBVAL_IGNORE_OUTPUT
# (a live panel: its text form holds image bytes)
state = widgets.build_feature_state(target, layer, autoencoder, feature_emb, backend, probe, concepts, n_images=12)
panel = widgets.sae_feature_panel(state, tau=5)
panel["widget"]

# %% [markdown]
# ## Exercises
# 1. Train the SAE with `k=4` and with `k=64` (`P = P.replace(sae=sae.SAEConfig(expansion=8, k=...))`).
#    How do explained variance and the colour IoU move? Is there a k where features become *less*
#    localized?
# 2. Align with `align.AlignConfig(unit_dropout=0.0)` (pass `config=` to `fit_alignment`). Does the
#    removal gap to random change? Does grounding?
# 3. Ground a *shape* ("star", "cross") instead of a colour: pass `concept_emb[6:]`, `concepts[6:]`
#    to `sae_concept_grounding`. Which is easier for this ViT at `blocks.4`, and why might that be?
# 4. Train the SAE on `blocks.1` instead of `blocks.4` (`P = P.replace(sae_layer="blocks.1")`). Do
#    the top features' `auroc_feature` and `iou_feature` move together more closely in an early
#    block? What does that say about where a ViT keeps *where*?
