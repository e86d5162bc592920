"""Fine-tune a tiny Qwen3-MoE with expert parallelism.

    torchrun --nproc-per-node 2 examples/train_ep.py [--steps 30]

gloo on CPUs, NCCL on GPUs (one GPU per process), the same script. Every rank builds the same
model (same seed), swaps its MoE blocks for moestream's (``ms.patch_moe``) and keeps only its
slice of the experts (``ms.parallelize_experts``); each rank then trains on its own batch. The
replicated parameters (attention, norms, embeddings, routers) get their gradients summed over the
ranks (``all_reduce_grads``), the expert parameters get theirs from the all-to-all's backward.

Loss convention: each rank's loss is its tokens' share of the global mean (sum over its tokens /
tokens on all ranks), so the summed gradients are those of one process training on the whole
batch. The load-balancing loss is computed over the group (``router_aux_loss``), equal to the
single-process value on every rank.

(The NCCL path uses the same calls but has not been run on a multi-GPU machine.)
"""

from __future__ import annotations

import argparse
import os

import moestream as ms
import torch
import torch.distributed as dist
import torch.nn.functional as F
from moestream import distributed as msd
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Train; returns the global mean cross-entropy of the first and the last step."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    own_group = not dist.is_initialized()  # (a test may call main() inside its own process group)
    if own_group:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)  # the same initial model on every rank
    model = Qwen3MoeForCausalLM(config).to(device)
    ms.patch_moe(model)
    blocks = ms.parallelize_experts(model)
    n_expert = sum(p.numel() for p in msd.expert_parameters(model))
    if rank == 0:
        print(f"world {world}: {blocks} MoE blocks sharded, {n_expert} expert parameters per rank")

    # each rank its own data: a repeating pattern per sequence, learnable from the context
    g = torch.Generator().manual_seed(1000 + rank)
    period = torch.randint(2, 6, (args.batch, 1), generator=g)
    base = torch.randint(3, config.vocab_size, (args.batch, 6), generator=g)
    pos = torch.arange(args.seq).unsqueeze(0) % period
    ids = base.gather(1, pos).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    n_local = torch.tensor(float(labels.numel()), device=device)
    n_global = n_local.clone()
    dist.all_reduce(n_global)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    first = last = None
    for step in range(args.steps):
        out = model(inputs, output_router_logits=True)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / n_global
        logits = torch.cat(out.router_logits)
        aux = msd.router_aux_loss(logits, logits.topk(config.num_experts_per_tok, dim=-1).indices)
        # aux has the group's value on every rank and this rank's share of the gradient: added once
        # per rank, the summed gradients are the single-process ones
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        msd.all_reduce_grads(model)  # replicated parameters: sum over ranks
        opt.step()
        total = ce.detach().clone()
        dist.all_reduce(total)  # the global mean cross-entropy
        last = float(total)
        first = last if first is None else first
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {last:.4f}  aux {float(aux.detach()):.4f}")

    # the replicated parameters must still be identical on every rank
    flat = torch.cat([p.detach().reshape(-1) for p in msd.replicated_parameters(model)])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = torch.tensor(float((flat - ref).abs().max()), device=device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if float(diff) != 0.0:
        raise RuntimeError(f"replicated parameters diverged across ranks (max difference {float(diff)})")
    if rank == 0:
        print(f"ok: loss {first:.4f} -> {last:.4f}, replicated parameters identical on all {world} ranks")
    if own_group:
        dist.destroy_process_group()
    return first, last


if __name__ == "__main__":
    main()
