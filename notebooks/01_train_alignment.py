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
# # 01 · Training the alignment, then localizing and describing units
#
# **What this notebook teaches**
# 1. capture a frozen model's activations at one layer, with the CLIP embedding of each image and
#    the model's prediction (a cached, resumable store on disk);
# 2. train MiClip's neuron encoder $E_n$ with its two contrastive terms;
# 3. localize concepts and describe units, and browse them in two panels.
#
# **The equations.** With $z_i = E_n(a_i)/\lVert E_n(a_i)\rVert$, a batch of $B$ images and a learnable
# temperature $t$, the symmetric InfoNCE between $z$ and targets $y$ is
#
# $$\mathrm{InfoNCE}(z, y) = \tfrac12\Big[\mathrm{CE}\big(t\,z y^\top, I\big) + \mathrm{CE}\big(t\,y z^\top, I\big)\Big],$$
#
# and MiClip minimises $\mathrm{InfoNCE}(z, E_c(\hat c)) + \mathrm{InfoNCE}(z, E_i(x))$: the text
# embedding of the **predicted** label (what the model concluded) and the CLIP image embedding (what
# was in front of it). Localization: $L_c = \mathrm{top}_\tau\, \cos(u_i, E_c(c))$; description:
# $D_u = \mathrm{top}_\tau\, \cos(u, E_c(c_j))$ over a vocabulary.

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
from miclip_nb import align, datasets, interpret, pipeline, viz, widgets

prep = pipeline.prepare(P.pipeline_config(seeds=(SEED,)))
print(f"model: {prep.target.name} | layer: {prep.layer} | classes: {len(prep.target.class_names)}")
print(f"store: {prep.store.n_rows} images, fields {sorted(prep.store.fields)}")

# %% [markdown]
# The store is a folder named by a hash of everything that determines its content (model weights,
# layer, pooling, dataset, transforms, CLIP model). Run the cell again: it returns at once. Change
# the layer or the data: a new folder is made; an old one is never reused by mistake.
#
# ## Train the neuron encoder
# Activations are standardised with statistics of the training rows; 10% of the rows (chosen by a
# hash of the row index) are held out for early stopping; the best epoch is kept.

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
encoder, history = align.train_encoder(prep.store, prep.class_text_emb_cd, seed=SEED)
print(f"best epoch {history['best_epoch'] + 1}: validation loss {history['val_loss'][history['best_epoch']]:.2f} "
      f"(from {history['val_loss'][0]:.2f}); learned temperatures {history['temperature']['concept']:.3f} / {history['temperature']['image']:.3f}")
_ = viz.loss_curves(history, f"MiClip alignment of {prep.target.name} {prep.layer}")

# %%
from miclip_nb.claims import claim

_ = claim("training lowered the held-out loss", history["val_loss"][0] - min(history["val_loss"]), at_least=0.05,
          check=P.check_claims)

# %% [markdown]
# ## Localize concepts
# Each unit gets an embedding (the encoder's response to that unit alone, minus its response to
# silence). Two ways to rank units for a concept:
# - **cosine** (the paper's rule): cosine similarity of the unit embedding to the concept's text embedding;
# - **posterior** (our default wherever a vocabulary is at hand): $\log p(c \mid u)$, the
#   softmax over the vocabulary of the unit's cosines at the temperature the alignment learned,
#   i.e. how the encoder's concept term would classify the unit alone.
#
# Related prompts share most of their direction in CLIP space, so under plain cosine a unit that
# points at what they all share ranks high for all of them; the posterior asks instead whether
# the concept stands out in the unit's description. Describing a unit ranks concepts the same
# way under both, since the softmax shifts each unit's scores by one constant.

# %%
# NBVAL_IGNORE_OUTPUT
# (unit numbers come from training)
unit_emb = interpret.unit_embeddings(encoder)
temperature = interpret.concept_temperature(encoder)  # the posterior's temperature, learned by the alignment
vocab = interpret.concept_set(P.vocabulary)
vocab_emb = interpret.encode_concepts(prep.backend, vocab)
query_emb = interpret.encode_concepts(prep.backend, P.queries)
interpret.localization_table(unit_emb, query_emb, P.queries, reference_kd=vocab_emb, temperature=temperature, tau=5)

# %% [markdown]
# ## Describe units
# The reverse question: for each concept's best unit, which words of the vocabulary fit it best?
# When localization is consistent, the concept comes back among the unit's top descriptions.

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
found_back = 0
for q, emb in zip(P.queries, query_emb):
    unit = int(interpret.localize(unit_emb, emb, tau=1, reference_kd=vocab_emb, temperature=temperature)[0][0])
    top = interpret.describe(unit_emb, unit, vocab_emb, vocab, tau=3)
    found_back += q in [c for c, _ in top]
    print(f"best unit for {q!r:>9} is {unit:>4}: " + ", ".join(f"{c} ({s:.2f})" for c, s in top))

# %%
_ = claim(f"each query comes back among its best unit's top-3 descriptions ({len(P.queries)} queries)",
          found_back, at_least=len(P.queries) - 1, check=P.check_claims)

# %% [markdown]
# ## Panels
# **Concept search**: type any concept; see its top units with scores (by posterior against
# the vocabulary, or by cosine: the *rank by* menu) and each unit's top-activating probe images.
# **Unit inspector**: pick a unit; see its top concepts, its top-activating images and the
# histogram of its activations.

# %%
# NBVAL_IGNORE_OUTPUT
# (a live panel: its text form holds trained results)
probe = datasets.open_dataset(P.probe_data or P.eval_data)
state = widgets.build_explorer(prep.target, prep.backend, unit_emb, vocab, vocab_emb, probe, prep.layer, n_probe=P.n_probe,
                               temperature=temperature)
search = widgets.concept_search_panel(state)
search["parts"]["concept"].value = P.queries[0]
search["widget"]

# %%
# NBVAL_IGNORE_OUTPUT
# (a live panel)
inspector = widgets.unit_inspector_panel(state)
inspector["widget"]

# %% [markdown]
# ## What to take away
# - The encoder is small (a linear map here) and trains in seconds on cached activations; the
#   forward passes of the model and of CLIP are the real cost, and the store pays them once.
# - Units are ranked by *meaning* (direction in CLIP space), not by how large they get; ranking by
#   posterior against a vocabulary, rather than by raw cosine, keeps a unit that fits every
#   concept a little from topping them all.
# - `03_intervention_tables` checks causally that the localized units matter.
#
# ## Exercises
# 1. Set `P = P.replace(model="toy_vit")` and rerun. Are colour units easier or harder to find in the
#    ViT's residual stream than in the CNN's channels?
# 2. Train with `align.AlignConfig(image_weight=0)` (output term only) and with
#    `concept_weight=0` (input term only). Which concepts does each variant still localize?
# 3. Use `unit_embeddings(encoder, value="typical")` with an MLP encoder (`AlignConfig(kind="mlp")`).
# 4. Train with `AlignConfig(unit_dropout=0.0)`. Compare the validation loss and the accuracy cost
#    of removing the localized units: which one tells you whether localization works, and why?
#    Does the ranking change?
