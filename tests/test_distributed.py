"""Distributed capture and data-parallel training (torch.distributed, gloo, 2 CPU processes) give
the one-process store value by value and the one-process encoder and SAE up to float summation
order.

One ``torchrun`` launch of this file as a script (two ranks, gloo, 127.0.0.1 only, one torch
thread each; :func:`distributed.init` reads torchrun's environment) does everything the
comparisons need, then runs the command line ``python -m miclip_nb.distributed capture`` under
the group; the parent builds and trains the one-process references. On the toy CNN: 300 Shapes
images (shards of 64, batches of 32), an interrupted 2-rank build resumed per rank, a corrupted
shard repaired by its rank alone, two encoders (linear with unit dropout, batch 64; MLP, batch
45 split 22 / 23) and a top-k SAE on the 8x8 maps of 40 images (batch 255 split 127 / 128, AuxK on).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from miclip_nb import distributed

N_IMAGES, SHARD, BATCH = 300, 64, 32
N_TOKENS_IMAGES, TOKEN_SHARD = 40, 16
ALIGN_CONFIGS = {"linear": dict(epochs=4, batch_size=64),
                 "mlp": dict(epochs=3, batch_size=45, kind="mlp", hidden=32, unit_dropout=0.5)}
SAE_CONFIG = dict(expansion=2, k=4, epochs=2, batch_size=255, dead_steps=3)
#: Stated tolerance of a 2-rank run against one process (float summation order only).
ATOL = 1e-5
FAIL_AT = {0: 100, 1: 250}  # an item of each rank's block that "crashes" the first build


class _ClampHalf:
    """A unit transform (store.UnitTransform) for derive_store: values below 0.5 raised to 0.5."""

    fingerprint = "clamp-half-test"

    def __call__(self, acts):
        return acts.clamp_min(0.5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counting(torch.utils.data.Dataset):
    """A dataset that records the items read and can raise (an interrupted capture) at one item."""

    def __init__(self, dataset, fail_at: int | None = None):
        self.dataset, self.fail_at, self.reads = dataset, fail_at, []
        self.fingerprint = dataset.fingerprint

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt(f"interrupted at item {i}")
        self.reads.append(i)
        return self.dataset[i]


def _objects():
    from miclip_nb import datasets, embed, zoo

    target = zoo.load_target("toy_cnn")
    clip = embed.load_clip("toyclip")
    text = embed.build_concept_bank(clip, target.class_names, allow_duplicates=True)  # the classes' text targets
    return target, datasets.open_dataset(f"shapes:train:{N_IMAGES}"), clip, text


def _pooled(target, data, clip, root, **kw):
    from miclip_nb.store import build_store

    return build_store(target, data, pooling="mean", clip=clip, root=root, batch_size=BATCH, shard_size=SHARD,
                       device="cpu", progress=False, **kw)


def _tokens(target, data, root, **kw):
    from miclip_nb.store import build_store

    return build_store(target, data, pooling="none", n_items=N_TOKENS_IMAGES, root=root, batch_size=TOKEN_SHARD,
                       shard_size=TOKEN_SHARD, device="cpu", progress=False, **kw)


def _train_all(store, tokens, text) -> dict:
    from miclip_nb.align import AlignConfig, train_encoder
    from miclip_nb.sae import SAEConfig, train_sae

    out = {}
    for name, cfg in ALIGN_CONFIGS.items():
        t0 = time.perf_counter()
        encoder, history = train_encoder(store, text, config=AlignConfig(**cfg), seed=0, device="cpu", progress=False)
        out[name] = {"state": encoder.state_dict(), "history": history, "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    sae, metrics = train_sae(tokens, config=SAEConfig(**SAE_CONFIG), seed=0, device="cpu", progress=False)
    out["sae"] = {"state": sae.state_dict(), "metrics": {k: v for k, v in metrics.items() if k != "config"},
                  "seconds": time.perf_counter() - t0}
    return out


def _worker(root: str, out_dir: str) -> None:
    """One rank (run by torchrun): interrupted then resumed capture, repair of a corrupted shard,
    token capture, derive_store, gathered-loss check, DDP training, the command line (reusing the
    store); results saved to ``out_dir/rank<r>.pt``."""
    import warnings

    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = distributed.init("gloo")  # CPU processes, also where CUDA is available
    assert world == 2 and dist.get_backend() == "gloo"
    try:
        from miclip_nb import store as store_mod
        from miclip_nb.align import _Temperatures, alignment_loss

        target, data, clip, text = _objects()
        res: dict = {"rank": rank}
        t0 = time.perf_counter()
        try:  # a crash in each rank's block: no barrier is reached, each part keeps its complete shards
            _pooled(target, _Counting(data, FAIL_AT[rank]), clip, root)
            raise AssertionError("the failing build did not fail")
        except KeyboardInterrupt:
            pass
        dist.barrier()
        counting = _Counting(data)
        store = _pooled(target, counting, clip, root)  # resumes every rank's part
        res["capture_seconds"] = time.perf_counter() - t0
        res["resumed_reads"] = sorted(set(counting.reads) - {0})  # as_dataset looks at item 0 once
        res["store_dir"] = str(store.dir)

        # A corrupted shard of rank 1: every rank checks its share of the shards, rank 1 alone recaptures.
        victim = store.dir / store.meta["shards"][3]["file"]
        dist.barrier()
        mtimes = {p.name: p.stat().st_mtime_ns for p in sorted(store.dir.glob("shard_*.safetensors"))}
        if rank == 0:
            data_bytes = bytearray(victim.read_bytes())
            data_bytes[-4:] = bytes(b ^ 0xFF for b in data_bytes[-4:])
            victim.write_bytes(bytes(data_bytes))
        dist.barrier()
        counting = _Counting(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            store = _pooled(target, counting, clip, root)
        res["repair_reads"] = sorted(set(counting.reads) - {0})
        res["repair_warned"] = any("corrupt" in str(w.message) for w in caught)
        res["rewritten"] = sorted(p.name for p in store.dir.glob("shard_*.safetensors")
                                  if p.stat().st_mtime_ns != mtimes.get(p.name))
        t0 = time.perf_counter()
        tokens = _tokens(target, data, root)
        res["tokens_seconds"] = time.perf_counter() - t0
        res["tokens_dir"] = str(tokens.dir)
        res["derived_dir"] = str(store_mod.derive_store(tokens, _ClampHalf(), pooling="max", root=root, progress=False).dir)

        # The gathered contrastive loss is the one-process loss of the whole batch.
        g = torch.Generator().manual_seed(5)
        z, t, im = (torch.randn(45, 64, generator=g) for _ in range(3))
        lo, hi = distributed.split(45, rank, world)
        temps = _Temperatures(0.07)
        gathered, _ = alignment_loss(distributed.gather_rows(z[lo:hi], 45), t, im, temps)
        full, _ = alignment_loss(z, t, im, temps)
        res["loss_gathered"], res["loss_full"] = float(gathered.detach()), float(full.detach())

        t0 = time.perf_counter()
        res["trained"] = _train_all(store, tokens, text)
        res["train_seconds"] = time.perf_counter() - t0
        # fit_* under the group: rank 0 writes the cache, every rank returns the trained model.
        from miclip_nb.align import AlignConfig, fit_alignment
        from miclip_nb.sae import SAEConfig, fit_sae

        os.environ["MICLIP_CACHE_DIR"] = cache = os.path.join(root, "fit-cache")
        encoder = fit_alignment(store, text, config=AlignConfig(**ALIGN_CONFIGS["linear"]), seed=0, device="cpu",
                                progress=False)
        fitted_sae, _ = fit_sae(tokens, config=SAEConfig(**SAE_CONFIG), seed=0, device="cpu", progress=False)
        dist.barrier()
        res["fitted"] = {"linear": encoder.state_dict(), "sae": fitted_sae.state_dict(),
                         "cached": sorted(str(p.relative_to(cache)) for p in Path(cache).rglob("*.safetensors"))}
        res["parts"] = sorted(p.name for p in store.dir.glob("metadata.r*.json"))
        res["merged"] = json.loads((store.dir / store_mod.METADATA).read_text())["world_size"]
        shards = {p.name: p.stat().st_mtime_ns for p in store.dir.glob("shard_*")}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # the command line under the group: reuses the complete store
            distributed.main(["capture", "--model", "toy_cnn", "--data", f"shapes:train:{N_IMAGES}", "--clip", "toyclip",
                              "--root", root, "--shard-size", str(SHARD), "--batch-size", str(BATCH)])
        res["cli_out"] = out.getvalue().strip()
        res["cli_untouched"] = shards == {p.name: p.stat().st_mtime_ns for p in store.dir.glob("shard_*")}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process results, [rank 0 results, rank 1 results], seconds) of the same work."""
    single_root, dist_root = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("dist")
    out_dir = tmp_path_factory.mktemp("ranks")
    from miclip_nb.store import derive_store

    t0 = time.perf_counter()
    target, data, clip, text = _objects()
    store = _pooled(target, data, clip, single_root)
    tokens = _tokens(target, data, single_root)
    derived = derive_store(tokens, _ClampHalf(), pooling="max", root=single_root, progress=False)
    single = {"store": store, "tokens": tokens, "derived": derived, "trained": _train_all(store, tokens, text)}
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, str(dist_root), str(out_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    t_dist = time.perf_counter() - t0
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return single, ranks, {"single": t_single, "torchrun": t_dist}


def _same_rows(a, b, **kw) -> bool:
    rows_a = torch.cat([x["_row"] for x in a(**kw)])
    rows_b = torch.cat([x["_row"] for x in b(**kw)])
    return torch.equal(rows_a, rows_b)


def test_two_ranks_write_one_store_equal_to_one_process_value_by_value(runs):
    from miclip_nb.store import ActivationStore

    single, ranks, _ = runs
    ref, store = single["store"], ActivationStore(ranks[0]["store_dir"])
    assert store.dir.name == ref.dir.name  # the key does not depend on the world size
    assert store.complete and store.n_rows == ref.n_rows == N_IMAGES
    assert store.fields == ref.fields
    for field in ref.fields:
        assert torch.equal(store.load(field), ref.load(field)), field
    # Shard-aligned blocks: the same shard boundaries, each rank's own files, merged in rank order.
    assert store.row_offsets == ref.row_offsets == [0, 64, 128, 192, 256]
    assert [s["file"] for s in store.meta["shards"]] == [
        "shard_r0_00000.safetensors", "shard_r0_00001.safetensors", "shard_r1_00000.safetensors",
        "shard_r1_00001.safetensors", "shard_r1_00002.safetensors"]
    assert ranks[0]["parts"] == ["metadata.r0.json", "metadata.r1.json"] and ranks[0]["merged"] == 2
    # Every reader sees the same rows: batches (shuffled or not, with a split), shards, the held-out hash.
    fields = ["acts/stages.2", "clip_image", "pred"]
    for kw in (dict(shuffle=False), dict(shuffle=True, seed=3, split="train"), dict(shuffle=True, seed=3, split="val")):
        a = list(ref.iter_batches(fields, 50, with_rows=True, **kw))
        b = list(store.iter_batches(fields, 50, with_rows=True, **kw))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert all(torch.equal(x[k], y[k]) for k in x)
    for split in ("train", "val"):
        assert _same_rows(ref.iter_shards, store.iter_shards, fields=["label"], split=split, with_rows=True)
        assert ref.split_sizes(split, 0.1) == store.split_sizes(split, 0.1)
    tokens_ref, tokens = single["tokens"], ActivationStore(ranks[0]["tokens_dir"])
    assert tokens.dir.name == tokens_ref.dir.name and tokens.row_offsets == tokens_ref.row_offsets
    for field in tokens_ref.fields:
        assert torch.equal(tokens.load(field), tokens_ref.load(field)), field
    # derive_store under the process group: rank 0 writes it, every rank gets it.
    derived_ref, derived = single["derived"], ActivationStore(ranks[0]["derived_dir"])
    assert ranks[1]["derived_dir"] == ranks[0]["derived_dir"] and derived.dir.name == derived_ref.dir.name
    assert not list(derived.dir.glob("metadata.r*.json"))
    for field in derived_ref.fields:
        assert torch.equal(derived.load(field), derived_ref.load(field)), field


def test_an_interrupted_distributed_build_resumes_per_rank_and_a_corrupt_shard_is_rewritten_by_its_rank(runs):
    _, ranks, _ = runs
    # Rank 0's block is items 0-127: shard 0-63 survived its crash at item 100, so it reads 64-127 again;
    # rank 1's block is 128-299: shard 128-191 survived the crash at 250, so it reads 192-299.
    assert [r["resumed_reads"] for r in ranks] == [list(range(64, 128)), list(range(192, 300))]
    # Shard 3 (rank 1's second) corrupted: rank 1 recaptures it and its last one, rank 0 reads nothing.
    assert [r["repair_reads"] for r in ranks] == [[], list(range(192, 300))]
    assert ranks[0]["rewritten"] == ["shard_r1_00001.safetensors", "shard_r1_00002.safetensors"]
    assert ranks[0]["repair_warned"]


def test_the_gathered_contrastive_loss_is_the_whole_batch_loss(runs):
    _, ranks, _ = runs
    for r in ranks:
        assert r["loss_gathered"] == pytest.approx(r["loss_full"], abs=1e-6)


def test_ddp_encoders_and_sae_equal_one_process_and_every_rank_holds_the_same_model(runs):
    single, ranks, _ = runs
    for name in (*ALIGN_CONFIGS, "sae"):
        ref, r0, r1 = single["trained"][name], ranks[0]["trained"][name], ranks[1]["trained"][name]
        for key, value in ref["state"].items():
            assert torch.equal(r0["state"][key], r1["state"][key]), (name, key)  # the same model on every rank
            assert torch.allclose(r0["state"][key], value, atol=ATOL, rtol=0), \
                (name, key, float((r0["state"][key] - value).abs().max()))
    for name in ALIGN_CONFIGS:
        ref, got = single["trained"][name]["history"], ranks[0]["trained"][name]["history"]
        assert got["best_epoch"] == ref["best_epoch"] and got["n_train"] == ref["n_train"]
        assert got["val_loss"] == pytest.approx(ref["val_loss"], abs=ATOL)
        assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=ATOL)
    ref, got = single["trained"]["sae"]["metrics"], ranks[0]["trained"]["sae"]["metrics"]
    assert ref["dead_fraction_train"] > 0  # the AuxK loss and the dead counters were in play
    for key in ("nmse", "explained_variance", "l0", "dead_fraction", "dead_fraction_train"):
        assert got[key] == pytest.approx(ref[key], abs=ATOL), key
    assert got["n_train_vectors"] == ref["n_train_vectors"] and got["n_vectors"] == ref["n_vectors"]
    assert got["history"]["train_nmse"] == pytest.approx(ref["history"]["train_nmse"], abs=ATOL)


def test_fitting_under_the_group_caches_once_and_every_rank_returns_the_trained_model(runs):
    _, ranks, _ = runs
    for name in ("linear", "sae"):
        for r in ranks:
            for key, value in r["trained"][name]["state"].items():
                assert torch.equal(r["fitted"][name][key], value), (r["rank"], name, key)
    cached = ranks[0]["fitted"]["cached"]
    assert cached == ranks[1]["fitted"]["cached"]
    assert sorted(p.split("/")[0] for p in cached) == ["encoders", "saes"]  # the cache: one encoder, one SAE


def test_report_figures(runs, capsys):
    """Rows, shard counts, max abs differences and times (printed with -s)."""
    single, ranks, times = runs
    diffs = {name: max(float((ranks[0]["trained"][name]["state"][k].double() - v.double()).abs().max())
                       for k, v in single["trained"][name]["state"].items()) for name in (*ALIGN_CONFIGS, "sae")}
    with capsys.disabled():
        print(f"\nrows {single['store'].n_rows}, shards {len(single['store'].meta['shards'])}; token rows "
              f"{single['tokens'].n_rows}, shards {len(single['tokens'].meta['shards'])}; max |diff| {diffs}; "
              f"one process {times['single']:.1f}s, 2-rank torchrun {times['torchrun']:.1f}s "
              f"(capture {ranks[0]['capture_seconds']:.1f}s, training {ranks[0]['train_seconds']:.1f}s)")
    assert max(diffs.values()) <= ATOL


def test_the_command_line_under_torchrun_reuses_the_complete_store(runs):
    _, ranks, _ = runs
    assert ranks[0]["cli_out"] == ranks[0]["store_dir"] and ranks[1]["cli_out"] == ""  # rank 0 prints
    assert ranks[0]["cli_untouched"] and ranks[1]["cli_untouched"]


def test_split_and_blocks_cover_everything_once():
    from miclip_nb.store import rank_block

    for n, world in ((10, 3), (2, 3), (0, 2), (300, 2)):
        parts = [distributed.split(n, r, world) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert [rank_block(300, 64, r, 2) for r in range(2)] == [(0, 128), (128, 300)]
    assert [rank_block(100, 64, r, 3) for r in range(3)] == [(0, 0), (0, 64), (64, 100)]
    assert all(lo % 64 == 0 for r in range(7) for lo, _ in [rank_block(1000, 64, r, 7)])


def test_without_a_process_group_everything_runs_in_one_process():
    assert not distributed.is_initialized() and distributed.rank_and_world() == (0, 1)
    assert distributed.enabled(None) is False and distributed.enabled(False) is False
    with pytest.raises(RuntimeError, match="process group"):
        distributed.enabled(True)
    assert distributed.init() == (0, 1)  # no torchrun environment: nothing to initialise


def test_the_command_line_runs_capture_align_and_sae(tmp_path, capsys):
    """``python -m miclip_nb.distributed`` in one process (torchrun runs the same code per rank)."""
    root = tmp_path / "stores"
    assert distributed.main(["capture", "--model", "toy_cnn", "--data", "shapes:train:40", "--clip", "toyclip",
                             "--root", str(root), "--shard-size", "16", "--batch-size", "16"]) == 0
    store_dir = capsys.readouterr().out.strip().splitlines()[-1]
    assert os.path.isfile(os.path.join(store_dir, "metadata.json"))
    assert distributed.main(["align", "--store", store_dir, "--model", "toy_cnn", "--clip", "toyclip", "--epochs", "1",
                             "--batch-size", "16", "--out", str(tmp_path / "enc" / "encoder")]) == 0
    assert capsys.readouterr().out.strip().endswith("encoder.safetensors")
    tokens = distributed.main(["capture", "--model", "toy_cnn", "--data", "shapes:train:40", "--pooling", "none",
                               "--n-items", "40", "--root", str(root), "--shard-size", "16"])
    assert tokens == 0
    token_dir = capsys.readouterr().out.strip().splitlines()[-1]
    assert distributed.main(["sae", "--store", token_dir, "--expansion", "1", "--k", "4", "--epochs", "1",
                             "--batch-size", "64", "--out", str(tmp_path / "sae" / "sae")]) == 0
    assert capsys.readouterr().out.strip().endswith("sae.safetensors")


if __name__ == "__main__":  # torchrun tests/test_distributed.py <root> <out_dir>: one rank of the fixture's run
    _worker(sys.argv[1], sys.argv[2])
