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
# # 00 · A five-minute tour of MiClip
#
# **What you will learn.** How MiClip reads a vision model's hidden units by *aligning* them with
# CLIP, and three things that alignment lets you do: find the units for a concept, describe a
# unit in words, and switch units off to see what the model loses.
#
# With the `toy` profile the model is `toy_cnn`, a small CNN trained to tell six shapes apart in the
# **Shapes world**: synthetic images where we know every attribute (shape, colour, background
# texture) and every pixel. Because the ground truth is known, every claim below can be checked.
# With `PROFILE = "real"` the same cells run the paper's setting: ResNet-50 aligned with CLIP
# ViT-B/16 on ImageNet (weights download on first use; a GPU). Your own model and photos: a
# profile of your own (see `miclip_nb.profiles`).

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
from miclip_nb import viz

_ = viz.dataset_grid(P.train_data, range(16))

# %% [markdown]
# ## The idea in one equation
#
# For each image $x_i$ the frozen model has hidden activations $a_i$ at some layer, and predicts a
# label $\hat c_i$. CLIP embeds the image, $E_i(x_i)$, and the label's name, $E_c(\hat c_i)$. MiClip
# learns a small encoder $E_n$ so that the activations land next to both:
#
# $$\mathcal L = \mathrm{InfoNCE}(E_n(a), E_c(\hat c)) + \mathrm{InfoNCE}(E_n(a), E_i(x)).$$
#
# A unit $u_i$ is then embedded as $E_n(a_i e^{(i)}) - E_n(0)$: what the encoder says when only
# that unit speaks. Its cosine similarity to a concept's text embedding says how much the unit
# *means* the concept, whatever its activation magnitude.
#
# One choice of ours (the paper is silent): during training, 95% of the units of every input are
# zeroed at random (*unit dropout*), so the encoder learns what small groups of units say on their
# own, the question a single-unit embedding asks it.

# %%
from miclip_nb import align, pipeline

config = P.pipeline_config(seeds=(SEED,))
prep = pipeline.prepare(config, progress=False)  # capture activations + CLIP embeddings (cached)
encoder = align.fit_alignment(prep.store, prep.class_text_emb_cd, seed=SEED, progress=False)
print(f"model {prep.target.name}, layer {prep.layer}: {prep.store.n_rows} images captured, "
      f"{encoder.config.n_units} units aligned into a {encoder.config.embed_dim}-d CLIP space")

# %% [markdown]
# ## Localize: which units mean each concept?
# Each unit is ranked by the probability the aligned space gives the concept against the other
# concepts of a vocabulary when only that unit is active (the *posterior*, a log-probability);
# without a vocabulary, `localize` uses the paper's plain cosine similarity.

# %%
# NBVAL_IGNORE_OUTPUT
# (unit numbers and probabilities come from training: they move with the CPU)
from miclip_nb import interpret

unit_emb = interpret.unit_embeddings(encoder)
temperature = interpret.concept_temperature(encoder)  # learned by the alignment's concept term
vocab = interpret.concept_set(P.vocabulary)
vocab_emb = interpret.encode_concepts(prep.backend, vocab)
concept_emb = interpret.encode_concepts(prep.backend, P.queries)
for name, emb in zip(P.queries, concept_emb):
    units, scores = interpret.localize(unit_emb, emb, tau=3, reference_kd=vocab_emb, temperature=temperature)
    print(f"{name:>8}: units {units.tolist()}  p {[round(s, 2) for s in scores.exp().tolist()]}")

# %% [markdown]
# ## Describe: what does the top unit of the second concept mean?

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
unit = int(interpret.localize(unit_emb, concept_emb[1], tau=1, reference_kd=vocab_emb, temperature=temperature)[0][0])
for concept, score in interpret.describe(unit_emb, unit, vocab_emb, vocab, tau=3):
    print(f"unit {unit}: {concept:<10} cosine {score:.2f}")

# %% [markdown]
# ## Steer: switch off the five units of one class
#
# If the localization is right, removing a class's units (scaling them by 0 at every location)
# should hurt the model on that class much more than removing five random units.

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures; the claims below are checked)
from miclip_nb import select, steer
from miclip_nb.datasets import load_images

images, labels = load_images(P.eval_data, prep.target.preprocess, n=P.n_eval)
c = prep.target.class_names.index(P.steer_class)
miclip_units = select.MiClipSelector(unit_emb, prep.class_text_emb_cd, temperature=temperature).select(c, 5)
for name, units in [("MiClip", miclip_units), ("random", select.RandomSelector(unit_emb.shape[0], SEED).select(c, 5))]:
    df = steer.class_deltas(prep.target.module, images, labels, prep.layer, {c: units}, beta=0.0)
    print(f"remove 5 {name:<6} units: {P.steer_class} accuracy {df.acc_base[0]:.1f}% -> {df.acc_edit[0]:.1f}%")

# %% [markdown]
# One class is an anecdote. Over all classes (each class's own top-5 units removed, accuracy on
# that class's images), against five random draws:

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
from miclip_nb.intervention import intervention_table

table = intervention_table(
    prep.target, images, prep.layer,
    {"MiClip": [select.MiClipSelector(unit_emb, prep.class_text_emb_cd, temperature=temperature)],
     "Random": [select.RandomSelector(unit_emb.shape[0], s) for s in range(5)]},
    labels=labels, betas={"remove": 0.0}, n_other=0, progress=False)
removal = table.groupby("method")["delta_acc"].mean()
print(f"class-averaged removal: MiClip {removal['MiClip']:+.1f} points, random {removal['Random']:+.1f}")

# %%
from miclip_nb.claims import claim

_ = claim("removing each class's top-5 MiClip units costs at least 5 points more than random units",
          removal["Random"] - removal["MiClip"], at_least=5.0, check=P.check_claims)

# %% [markdown]
# **Read the numbers honestly.** One seed is still an anecdote. On the toy profile, over all six
# classes and three alignment seeds, removing each class's top-5 MiClip units at this layer costs
# about 16 accuracy points (11 when units are ranked by plain cosine), five random units about 1.5;
# without unit dropout MiClip's units cost no more than random ones. Baselines that look at the
# class's activations or gradients directly do better still (Act-Values about 34 points, Captum's
# Gradient x Activation about 63): `03_intervention_tables` puts them side by side. A tool for
# interpretability has to show you that too.

# %% [markdown]
# ## Where next
# - `01_train_alignment`: the alignment step by step, with panels to search concepts and inspect units.
# - `02_sae_features`: sparse-autoencoder features as units, and where in the image they fire.
# - `03_intervention_tables`: the paper's Table 2 against Act-Values, Network Dissection, CLIP-Dissect, Captum.
# - `04_failure_diagnosis`: follow a wrong prediction layer by layer.
#
# ## Exercises
# 1. Replace `"star"` by `"stripes"` in the queries (`P = P.replace(queries=("red", "stripes", "dots"))`).
#    Which class's accuracy should fall when you remove those units, and why? (Hint: in training,
#    each shape sits on its *typical texture* 80% of the time.)
# 2. Set `P = P.replace(steer_class="heart")` and rerun the steering cell. Is the drop larger or
#    smaller than for stars?
# 3. Change `SEED` and rerun everything. Which results stay, and which change with the seed of
#    the alignment? What does that tell you about reading a single unit?
