"""Each method's formula written out independently, in float64, from the papers.

Nothing here imports lorakit's maths: these are the yardsticks the implementation is held to.
All weights are in the linear convention W (out, in); x is (tokens, in).
"""

from __future__ import annotations

import torch


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def lora(x, W, bias, A, B, s):
    """h = W x + b + s · B A x  (Hu et al. 2021, eq. 3)."""
    x, W, A, B = map(f64, (x, W, A, B))
    h = x @ W.T + s * (x @ A.T) @ B.T
    return h if bias is None else h + f64(bias)


def dora_weight(W, A, B, s, m):
    """W' = m ⊙ (W + s·BA) / ||W + s·BA||, norm over each output row (Liu et al. 2024, eq. 5)."""
    V = f64(W) + s * f64(B) @ f64(A)
    return f64(m).unsqueeze(1) * V / V.norm(dim=1, keepdim=True)


def dora(x, W, bias, A, B, s, m):
    h = f64(x) @ dora_weight(W, A, B, s, m).T
    return h if bias is None else h + f64(bias)


def vera(x, W, bias, A_shared, B_shared, d, b):
    """h = W x + b ⊙ (B (d ⊙ (A x))) with A, B sliced from the shared pair (Kopiczko et al. 2024)."""
    out, inp = W.shape
    A, B = f64(A_shared)[:, :inp], f64(B_shared)[:out, :]
    h = f64(x) @ f64(W).T + f64(b) * (((f64(x) @ A.T) * f64(d)) @ B.T)
    return h if bias is None else h + f64(bias)


def cera(x, W, bias, A_gate, A, B, s):
    """h = W x + b + s · B (silu(A_g x) ⊙ (A x)): lorakit's reading of CeRA (arXiv:2602.22911)."""
    x = f64(x)
    gate = x @ f64(A_gate).T
    h = x @ f64(W).T + s * ((gate / (1 + torch.exp(-gate))) * (x @ f64(A).T)) @ f64(B).T
    return h if bias is None else h + f64(bias)


def rank_r_svd(M, r):
    """The best rank-r approximation of M (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(f64(M), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def lowbias32(x: int) -> int:
    """C. Wellons' 32-bit integer hash, in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def gpart_groups(out, inp, d, seed):
    """GPart's partition as lorakit reads arXiv:2605.14841: the (out, in) entries (row-major) sorted
    by lowbias32(entry XOR lowbias32(seed)); the entry at position p joins group p mod d."""
    s = lowbias32(seed)
    order = sorted(range(out * inp), key=lambda j: lowbias32(j ^ s))
    groups = [0] * (out * inp)
    for position, entry in enumerate(order):
        groups[entry] = position % d
    return groups


def gpart_matrix(out, inp, d, seed):
    """P (out·in, d): 1/√n_g on the n_g entries of group g, so PᵀP = I."""
    groups = gpart_groups(out, inp, d, seed)
    sizes = [groups.count(g) for g in range(d)]
    P = torch.zeros(out * inp, d, dtype=torch.float64)
    for entry, g in enumerate(groups):
        P[entry, g] = sizes[g] ** -0.5
    return P


def gpart_weight(W, theta, scale, seed):
    """W' = W + scale · reshape(P θ)  (GPart, arXiv:2605.14841)."""
    out, inp = W.shape
    P = gpart_matrix(out, inp, theta.numel(), seed)
    return f64(W) + scale * (P @ f64(theta)).reshape(out, inp)


def gpart(x, W, bias, theta, scale, seed):
    h = f64(x) @ gpart_weight(W, theta, scale, seed).T
    return h if bias is None else h + f64(bias)
