"""Capture and training past one GPU: ``torch.distributed`` (launched by ``torchrun``).

When you need it
----------------
One GPU and one disk suffice for most MiClip runs: a *pooled* store holds one vector per image
(ViT-B/16 block 10, mean-pooled: 768 float32 = 3 KB per image, 3.9 GB for ImageNet train's
1,281,167 images, plus 2 KB per image of CLIP embedding). You need several processes when:

- **the store does not fit one disk**: token stores (``pooling="none"``, for SAEs) keep every
  token. ViT-B/16 at block 10 is 197 x 768 float32 = 0.6 MB per image: ImageNet train is about
  775 GB, beyond one ordinary disk. Put the store on a shared (network or parallel) file system
  and let each node's ranks write their own shards into it;
- **capture takes too long on one GPU**. An estimate from FLOPs, not a measurement: ViT-B/16
  at 224 px is about 17 GMACs (35 GFLOP) a forward, and CLIP's ViT-B/16 image tower as much
  again, so about 70 GFLOP per image. A GPU sustaining 100 TFLOP/s in bf16 (an A100 at about a
  third of its peak) does about 1,400 images/s: ImageNet train's 1.28 M images take about 15
  minutes of GPU compute. Decoding and resizing JPEGs (roughly 100-200 images/s per CPU core,
  so 16 loader workers give 1,600-3,200 images/s) and writing 0.6 MB per image (1,400 images/s
  is 0.85 GB/s of writes, more than a network file system gives one client) bound it as much:
  expect 15-45 minutes on one GPU for ViT-B/16 tokens, about 3.5 times that for ViT-L/16
  (about 62 GMACs), and so on with the model's FLOPs and the number of images. N GPUs, with their
  nodes' CPUs and the file system's aggregate bandwidth, divide it by about N;
- **training an SAE on hundreds of millions of token vectors** (ImageNet train x 197 tokens =
  252 M vectors per epoch): the SAE step is data-parallel over ranks. Each rank reads every
  training shard once per epoch (it needs its share of every batch, and a batch mixes the
  tokens of a whole shard): on one node the page cache serves the ranks from one read while the
  store fits in memory; beyond that the reads grow with the number of ranks, so data-parallel
  SAE training pays off when compute, not reading, bounds the step (large expansions, fast
  parallel file systems).

What each function does under a process group
---------------------------------------------
``store.build_store``: rank r of W captures a contiguous, shard-aligned block of the dataset
(whole shards of ``shard_size`` items: shard slots ``[S*r//W, S*(r+1)//W)`` of the
``S = ceil(n_items / shard_size)``) and writes its own shards ``shard_r<r>_<i>.safetensors`` and
its own metadata ``metadata.r<r>.json`` into the same store folder (the key does not depend on
W); after a barrier, rank 0 merges the parts, in rank order, into the one ``metadata.json``. Rows
come out in dataset order with the same shard boundaries as a one-process build (when nothing is
skipped), so every reader sees the same store. An interrupted distributed build resumes per rank.

``align.train_encoder`` / ``sae.train_sae``: every rank reads every batch of the one-process run
(same seed, same shuffles), computes on its contiguous share of the batch's rows, and the
gradients are all-reduced, so a W-rank run takes the same optimisation steps as one process with
the same batch size (equal up to float summation order). Statistics (standardisation, the SAE's
``b_pre`` and scale, dead-latent counters, metrics) are all-reduced; every rank returns the same
model.

Use it as::

    torchrun --nproc_per_node=8 -m miclip_nb.distributed capture --model timm:vit_base_patch16_224 \\
        --data /data/imagenet/train --layer blocks.10 --pooling none --root /shared/stores
    torchrun --nproc_per_node=8 -m miclip_nb.distributed sae --store /shared/stores/<key> --out sae/vitb16

or, in your own script run by ``torchrun``::

    from miclip_nb import distributed, store, sae
    distributed.init()                       # reads torchrun's environment; gloo on CPU, nccl on GPUs
    tokens = store.build_store(target, data, ["blocks.10"], pooling="none")   # each rank its part
    model, metrics = sae.train_sae(tokens, config=cfg)                         # data-parallel
    if distributed.rank_and_world()[0] == 0:
        sae.save_sae(model, "sae/vitb16")
    distributed.shutdown()
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def enabled(distributed: bool | None) -> bool:
    """Whether a function runs distributed: ``None`` (auto) when a process group with more than one
    rank is initialised, ``True`` demands one (RuntimeError without it), ``False`` never."""
    if distributed is None:
        return rank_and_world()[1] > 1
    if distributed and not is_initialized():
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group: run under "
                           "torchrun and call miclip_nb.distributed.init() (or torch.distributed.init_process_group)")
    return bool(distributed)


def setup(distributed: bool | None, device: str | torch.device | None) -> tuple[bool, int, int, torch.device]:
    """A training function's ``distributed`` and ``device`` arguments resolved: (on, as
    :func:`enabled`; rank and world size, (0, 1) when off; the device: ``device``, else this rank's
    (:func:`default_device`) when on, else CUDA when available, else the CPU). Raises as :func:`enabled`."""
    on = enabled(distributed)
    rank, world = rank_and_world() if on else (0, 1)
    fallback = default_device() if on else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return on, rank, world, torch.device(device) if device else fallback


def split(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous share ``[lo, hi)`` of ``n`` items that ``rank`` of ``world`` takes
    (sizes differ by at most one; lower ranks get the smaller shares)."""
    return n * rank // world, n * (rank + 1) // world


def _comm_device(device: torch.device) -> torch.device:
    """Where a collective on a tensor of ``device`` runs: CUDA for nccl, CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A copy of ``t`` reduced over every rank (``op``: "sum" or "max"), on ``t``'s device.
    Raises ValueError for another op."""
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    buf = t.detach().to(_comm_device(t.device), copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return buf.to(t.device)


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (same shapes on every rank) with rank ``src``'s values, in place."""
    for t in tensors:
        buf = t.detach().to(_comm_device(t.device), copy=True).contiguous()
        dist.broadcast(buf, src)
        with torch.no_grad():
            t.copy_(buf.to(t.device))


def broadcast_module_(*modules: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (in place)."""
    for module in modules:
        broadcast_(list(module.parameters()) + list(module.buffers()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj``, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_initialized():
        dist.barrier()


def on_rank0(fn, *args) -> Any:
    """``fn(*args)`` run on rank 0 alone; every rank returns its (picklable) result, or raises the
    exception it raised, so no rank is left waiting on one that failed. Every rank calls it."""
    outcome = None
    if rank_and_world()[0] == 0:
        try:
            outcome = ("ok", fn(*args))
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised there
            outcome = ("error", err)
    status, value = broadcast_object(outcome)
    if status == "error":
        raise value
    return value


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of known sizes whose backward hands each rank the sum over ranks of
    the gradients of its rows, as ``torch.distributed.nn.all_gather`` (open_clip's
    ``gather_with_grad=True``); here with blocks of unequal sizes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        rank, device = dist.get_rank(), _comm_device(x.device)
        ctx.sizes, ctx.rank = sizes, rank
        width = max(sizes)
        pad = torch.zeros(width, *x.shape[1:], dtype=x.dtype, device=device)
        pad[: x.shape[0]] = x.detach().to(device)
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(x.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = all_reduce(grad.contiguous())
        lo = sum(ctx.sizes[: ctx.rank])
        return total[lo : lo + ctx.sizes[ctx.rank]], None


def gather_rows(x: torch.Tensor, n_total: int) -> torch.Tensor:
    """The (n_total, ...) concatenation, in rank order, of every rank's rows, where rank r holds
    rows ``split(n_total, r, W)`` as ``x``. Differentiable: the gradient of the result flows back
    to each rank's own rows, summed over ranks (each rank computing the same loss on the result
    and then averaging parameter gradients gives the one-process gradient)."""
    world = dist.get_world_size()
    sizes = tuple(split(n_total, r, world)[1] - split(n_total, r, world)[0] for r in range(world))
    if x.shape[0] != sizes[dist.get_rank()]:
        raise ValueError(f"rank {dist.get_rank()} holds {x.shape[0]} rows; its share of {n_total} is {sizes[dist.get_rank()]}")
    return _GatherRows.apply(x, sizes)


def reduce_gradients_(params: Sequence[torch.nn.Parameter], op: str = "sum",
                      extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """All-reduce the gradients of ``params`` in one flat buffer (a missing gradient counts as
    zeros), in place: ``op`` "sum" (each rank's loss is its share of the batch's loss) or "mean"
    (each rank computes the whole batch's loss). ``extra``: a 1-D float tensor summed along in the
    same call (counters, loss shares); returns it reduced (summed, whatever ``op``), else None."""
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + ([] if extra is None else [extra.reshape(-1).float()]))
    flat = all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        reduced = flat[offset : offset + n].view_as(g).to(g.dtype)
        if op == "mean":
            reduced = reduced / dist.get_world_size()
        p.grad = reduced
        offset += n
    return None if extra is None else flat[offset:].to(extra.device)


def default_device() -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` when CUDA is available (torchrun sets
    LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) and return (rank, world size); backend
    default nccl with CUDA (each rank on ``cuda:<LOCAL_RANK>``), else gloo. Without that
    environment (a plain ``python``), or when a group exists already, nothing is initialised."""
    if is_initialized():
        return rank_and_world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return 0, 1
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return rank_and_world()


def shutdown() -> None:
    """Destroy the default process group, if there is one."""
    if is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# torchrun --nproc_per_node=N -m miclip_nb.distributed capture|align|sae ...


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m miclip_nb.distributed",
                                     description="MiClip capture / alignment / SAE training, one process per rank "
                                                 "(run under torchrun; a plain python runs one process)")
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="capture layers into a store; rank 0 prints the store folder")
    cap.add_argument("--model", required=True, help="zoo.load_target name (e.g. toy_cnn, timm:vit_base_patch16_224)")
    cap.add_argument("--weights", default=None, help="local weights file for the model")
    cap.add_argument("--data", required=True, help="datasets.open_dataset spec (a folder, shapes:train:400, ...)")
    cap.add_argument("--layer", action="append", default=None, help="layer to capture (repeat for several)")
    cap.add_argument("--pooling", default="mean")
    cap.add_argument("--n-items", type=int, default=None)
    cap.add_argument("--root", default=None, help="stores root (default cache_dir()/stores)")
    cap.add_argument("--batch-size", type=int, default=64)
    cap.add_argument("--shard-size", type=int, default=2048)
    cap.add_argument("--num-workers", type=int, default=0)
    cap.add_argument("--on-error", default="raise", choices=("raise", "skip"))
    cap.add_argument("--clip", default=None, help="embed.load_clip name (e.g. toyclip, ViT-B-16)")
    cap.add_argument("--clip-pretrained", default="openai")
    cap.add_argument("--clip-checkpoint", default=None)
    al = sub.add_parser("align", help="train a neuron encoder on a store; rank 0 saves it")
    al.add_argument("--store", required=True)
    al.add_argument("--model", required=True, help="the store's model (its class names give the text targets)")
    al.add_argument("--weights", default=None)
    al.add_argument("--clip", required=True)
    al.add_argument("--clip-pretrained", default="openai")
    al.add_argument("--clip-checkpoint", default=None)
    al.add_argument("--layer", default=None)
    al.add_argument("--epochs", type=int, default=30)
    al.add_argument("--batch-size", type=int, default=256)
    al.add_argument("--lr", type=float, default=3e-3)
    al.add_argument("--unit-dropout", type=float, default=0.95)
    al.add_argument("--seed", type=int, default=0)
    al.add_argument("--out", required=True, help="checkpoint path (align.save_encoder)")
    sa = sub.add_parser("sae", help="train a top-k SAE on a token/map store; rank 0 saves it")
    sa.add_argument("--store", required=True)
    sa.add_argument("--layer", default=None)
    sa.add_argument("--expansion", type=int, default=8)
    sa.add_argument("--k", type=int, default=16)
    sa.add_argument("--epochs", type=int, default=5)
    sa.add_argument("--batch-size", type=int, default=4096)
    sa.add_argument("--lr", type=float, default=1e-3)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--out", required=True, help="checkpoint path (sae.save_sae)")
    return parser


def _clip(args):
    from .embed import load_clip

    if args.clip is None:
        return None
    return load_clip(args.clip, args.clip_pretrained, checkpoint_path=args.clip_checkpoint,
                     device=default_device())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m miclip_nb.distributed capture|align|sae ...`` (under torchrun:
    one process per rank; ``--help`` lists the options). Initialises the process group from the
    environment (:func:`init`), runs the command on every rank, prints the result on rank 0 and
    returns 0. Raises what the command raises."""
    args = _parser().parse_args(argv)
    rank, _ = init()
    try:
        if args.command == "capture":
            from .datasets import open_dataset
            from .store import build_store
            from .zoo import load_target

            target = load_target(args.model, weights_path=args.weights)
            store = build_store(target, open_dataset(args.data), args.layer, pooling=args.pooling, clip=_clip(args),
                                n_items=args.n_items, root=args.root, batch_size=args.batch_size,
                                shard_size=args.shard_size, num_workers=args.num_workers, on_error=args.on_error,
                                progress=rank == 0)
            result = str(store.dir)
        elif args.command == "align":
            from .align import AlignConfig, save_encoder, train_encoder
            from .embed import build_concept_bank
            from .store import ActivationStore
            from .zoo import load_target

            target = load_target(args.model, weights_path=args.weights)
            text = build_concept_bank(_clip(args), target.class_names, allow_duplicates=True)
            config = AlignConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                 unit_dropout=args.unit_dropout)
            encoder, _ = train_encoder(ActivationStore(args.store), text, layer=args.layer, config=config,
                                       seed=args.seed, progress=rank == 0)
            result = str(save_encoder(encoder, args.out)) if rank == 0 else ""
        else:
            from .sae import SAEConfig, save_sae, train_sae
            from .store import ActivationStore

            config = SAEConfig(expansion=args.expansion, k=args.k, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr)
            model, _ = train_sae(ActivationStore(args.store), args.layer, config, seed=args.seed, progress=rank == 0)
            result = str(save_sae(model, args.out)) if rank == 0 else ""
        barrier()
        if rank == 0:
            print(result)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
