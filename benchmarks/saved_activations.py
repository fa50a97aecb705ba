"""What one training step saves for backward: the bare frozen base against each method, and where it goes.

Issue target (§7): lorakit LoRA's saved-for-backward within 10 % of the bare base's. Saved bytes do
not depend on the machine, only on the graph autograd records, so they can be counted on a CPU:
saved-tensor hooks (``lorakit.fused.saved_tensors_observer``) see every tensor a node keeps for its backward;
each storage is counted once (views of one tensor, and a tensor several nodes keep, cost memory
once), and parameters and buffers are left out (they are alive anyway).

Model: a random Llama with 1B-shaped widths (hidden 2048, intermediate 5632, 32 heads, vocab
32000) but, by default, only 2 decoder layers, a bf16 base and float32 adapters as in §7.2;
r = 16, alpha = 32 on every linear but the LM head. The bare base runs with its input embeddings'
output requiring grad (as ``train_step.py``'s floor does), so its backward runs through every layer.

With few layers the LM head and the loss (float32 logits) weigh more than in a real model, so
every variant is also counted with one layer less: the difference is what one decoder layer
keeps, the rest is fixed (embeddings, LM head, loss, and the first layer's input, which needs no
gradient under an adapter), and the two give the ratio a model of ``--project-layers`` layers shows.

Per variant it prints the total, the ratio, and a breakdown by the autograd node that keeps each
storage (a storage several kinds of node keep is listed under all of their names, joined by "+").

    .venv/bin/python benchmarks/saved_activations.py [--variants base,lora,...] [--batch 2 --seq 256]
    .venv/bin/python benchmarks/saved_activations.py --device cuda --layers 16 --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc

import _common as c
import torch
from torch import nn

import lorakit
import lorakit.fused

VARIANTS = ("base", "lora", "dora", "vera", "lora-fa", "peft-lora")
MiB = 2**20


def saved_nodes(root) -> dict[int, tuple[set[str], int, torch.dtype]]:
    """storage pointer -> (names of the nodes that keep it, its bytes, dtype), from the graph below ``root``."""
    found: dict[int, tuple[set[str], int, torch.dtype]] = {}
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for tensor in _saved_tensors(node):
            storage = tensor.untyped_storage()
            names, _, _ = found.setdefault(storage.data_ptr(), (set(), storage.nbytes(), tensor.dtype))
            names.add(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


def _saved_tensors(node) -> list[torch.Tensor]:
    """The tensors a node keeps: a Python Function's ``saved_tensors``, a built-in node's ``_saved_*``."""
    out: list[torch.Tensor] = []
    if hasattr(node, "saved_tensors"):  # custom autograd.Function
        out += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        try:
            value = getattr(node, attr)
        except RuntimeError:  # freed or undefined
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        out += [t for t in values if isinstance(t, torch.Tensor)]
    return out


def count(model: nn.Module, ids: torch.Tensor) -> dict:
    """Saved bytes of one forward with the causal-LM loss (then the backward runs, to check it does)."""
    gc.collect()
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    packed: dict[int, int] = {}

    def see(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            packed[s.data_ptr()] = max(packed.get(s.data_ptr(), 0), s.nbytes())

    # lorakit's observer, not plain hooks: under hooks that may unpack once, the fused path keeps
    # inputs it would otherwise rebuild, and the count would not be what runs (lorakit.fused).
    with lorakit.fused.saved_tensors_observer(see):
        loss = model(input_ids=ids, labels=ids).loss
    nodes = {p: v for p, v in saved_nodes(loss.grad_fn).items() if p not in owned}
    by_node: collections.Counter[str] = collections.Counter()
    for names, nbytes, dtype in nodes.values():
        by_node[f"{'+'.join(sorted(names))} ({str(dtype).removeprefix('torch.')})"] += nbytes
    loss.backward()
    return {"total": sum(packed.values()), "by_node": by_node}


def build(base: nn.Module, args: argparse.Namespace, variant: str) -> nn.Module:
    if variant == "base":
        model = copy.deepcopy(base).train().requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        return model
    method = variant.removeprefix("peft-")
    if args.dropout:
        if variant.startswith("peft-"):
            raise SystemExit("--dropout applies to lorakit's variants only; leave out peft-lora")
        return lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(
            method=method, r=args.rank, alpha=args.alpha, target_modules="all-linear", dropout=args.dropout)).train()
    am = c.lorakit_model(base, args, method)
    if variant.startswith("peft-"):
        model = c.peft_model_like(base, am, args, method)
        del am
        return model.train()
    return am.train()


def measure(args: argparse.Namespace, variant: str, layers: int | None = None) -> dict:
    local = copy.copy(args)
    if layers is not None:
        local.layers = layers
    base = c.build_base(local)
    model = build(base, local, variant)
    del base
    result = count(model, c.inputs(local))
    del model
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.model_args(parser, batch=2, seq=256)
    parser.set_defaults(hidden=2048, layers=2, intermediate=5632, heads=32, dtype="bfloat16")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--project-layers", type=int, default=16,
                        help="also give each ratio for a model of this many layers (0: skip)")
    parser.add_argument("--top", type=int, default=8, help="rows of each variant's breakdown by node")
    parser.add_argument("--dropout", type=float, default=0.0, help="lorakit's adapter dropout (default 0, as in §7)")
    args = parser.parse_args()
    c.set_threads(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if "base" not in variants:
        variants.insert(0, "base")
    print(c.header(f"Saved for backward, one training step (r={args.rank}, all-linear)"))
    print(f"- model: Llama-style, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"{args.heads} heads, vocab {args.vocab}; {args.batch} × {args.seq} tokens; base {args.dtype}, "
          f"adapters float32, dropout {args.dropout:g}; each storage counted once, parameters and buffers excluded")
    results = {v: measure(args, v) for v in variants}
    project = args.project_layers if args.project_layers and args.layers > 1 else 0
    shallower = {v: measure(args, v, args.layers - 1)["total"] for v in variants} if project else {}

    def at(v: str, layers: int) -> float:
        """Saved bytes of variant ``v`` on a model of ``layers`` layers, from the two counts."""
        per_layer = results[v]["total"] - shallower[v]
        return results[v]["total"] + (layers - args.layers) * per_layer

    bare = results["base"]["total"]
    if project:
        per_layer = bare - shallower["base"]
        print(f"- bare base: {per_layer / MiB:.1f} MiB per decoder layer, {(bare - args.layers * per_layer) / MiB:.1f} "
              f"MiB outside them (embeddings, LM head, loss)")
    print()
    headers = ["variant", "saved MiB", "× bare base"]
    if project:
        headers += ["extra MiB per layer", f"× bare base at {project} layers"]
    rows = []
    for v in variants:
        total = results[v]["total"]
        row = [v, f"{total / MiB:.1f}", f"{total / bare:.3f}"]
        if project:
            extra = (total - shallower[v]) - (bare - shallower["base"])
            row += [f"{extra / MiB:.2f}", f"{at(v, project) / at('base', project):.3f}"]
        rows.append(row)
    print(c.table(headers, rows))
    for v in variants:
        print(f"\n#### {v}: largest kept storages by node (MiB)")
        for key, nbytes in results[v]["by_node"].most_common(args.top):
            print(f"- {key}: {nbytes / MiB:.1f}")


if __name__ == "__main__":
    main()
