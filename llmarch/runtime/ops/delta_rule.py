"""The gated delta rule, shared by Gated DeltaNet (one decay per head) and Kimi Delta Attention
(one decay per key channel), and the short causal convolution both put in front of it.

Per head, a dk x dv state S takes, token by token, a decay and a delta-rule write:

    S <- diag(exp(g)) S;   S <- S + k (beta (v - k^T S))^T;   o = q^T S

g is the log-decay: one number per head ([..., H], S decays as a whole) or one per key channel
([..., H, dk], each row of S decays on its own). Two forms of the same recurrence:
`recurrent_step` (one token, decode) and `chunked` (prefill), the chunk/WY form: inside a chunk of
C tokens the delta-rule writes are condensed by one triangular solve into matmuls over the whole
chunk; only the chunk-to-chunk state update is sequential.

Per chunk, from its start state S (rows: the chunk's tokens; G the log-decay from the chunk's start
to each token, Gl its last row; Gamma_ij = exp(G_i - G_j)):

    A  = I + strictly_lower(diag(beta) (K K^T o Gamma))            (the chunk's own earlier writes)
    Y  = V - (exp(G) o K) S                                        (what S does not already predict)
    V' = A^-1 diag(beta) Y
    O  = (exp(G) o Q) S + lower(Q K^T o Gamma) V'
    S <- exp(Gl) o S + (exp(Gl - G) o K)^T V'

What does not involve S is a C x C matrix per chunk, found for all chunks at once: P = A^-1 diag(beta)
(A^-1 from one batched triangular solve against I) and M = lower(Q K^T o Gamma) P. The sequential
loop is then four small batched matmuls per chunk (K S, Q S, [P; M] Y, K^T V') and no solve; with
one decay per head the exp(G) factors scale whole rows and are applied to those products instead of
to copies of K and Q.

Inside a chunk the rule needs, for every token pair j <= i, sum_c a_i[c] b_j[c] exp(G_i[c] - G_j[c])
(G the cumulative log-decay from the chunk's start). With one decay per head exp(G_i - G_j) is a
factor of the pair and a matmul does the rest. Per channel it is not, and splitting it into
exp(G_i) exp(-G_j) overflows float32 once a chunk decays by more than ~88 nats (common: gates near
-1 per token over 64 tokens); so the chunk is cut into sub-chunks: pairs in different sub-chunks
are taken relative to the log-decay just before the later sub-chunk (both factors then <= 1, a
matmul per sub-chunk row), pairs inside one sub-chunk exactly, elementwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens per chunk of the prefill form where kernel launches bound the loop (GPU; the
# reference kernels' size)
CPU_CHUNK = 32  # on the CPU the arithmetic does: the within-chunk work grows with the chunk (~4 C dk
# multiply-adds per token beside ~3 dk dv against the state), and 32 rows keep the matmuls efficient
SUB = 16  # tokens per sub-chunk of the per-channel pair products (a divisor of CHUNK and CPU_CHUNK)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def short_conv(window: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, act) -> torch.Tensor:
    """act(causal depthwise conv) of x [B, T, C] with weight [C, 1, K], over [the previous K - 1
    inputs | this step's]; window [B, C, K - 1] holds those previous inputs and is updated in place."""
    kernel = weight.shape[-1]
    xc = torch.cat([window.to(x.dtype), x.transpose(1, 2)], dim=-1)
    if kernel > 1:
        window.copy_(xc[..., -(kernel - 1) :])
    return act(F.conv1d(xc, weight, groups=weight.shape[0])).transpose(1, 2)


def gated_delta(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """T tokens laid out [B, T, H, ...] (g [B, T, H] or [B, T, H, Dk], beta [B, T, H], float32):
    the recurrence for one token, the chunked form for more. state [B, H, Dk, Dv] float32, updated
    in place. Returns o [B, T, H, Dv]."""
    if q.shape[1] == 1:
        return recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)[:, None]
    tr = lambda t: t.transpose(1, 2)  # noqa: E731  [B,T,H,...] -> [B,H,T,...]
    return tr(chunked(tr(q), tr(k), tr(v), tr(g), tr(beta), state))


def recurrent_step(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """One token. q, k [B,H,Dk], v [B,H,Dv], g [B,H] or [B,H,Dk], beta [B,H] (float32); state
    [B,H,Dk,Dv] float32, updated in place. Returns o [B,H,Dv]."""
    decay = g.exp()
    state.mul_(decay[..., None] if g.dim() == k.dim() else decay[..., None, None])
    kv_mem = torch.einsum("bhk,bhkv->bhv", k, state)
    delta = (v - kv_mem) * beta[..., None]
    state.add_(k[..., :, None] * delta[..., None, :])
    return torch.einsum("bhk,bhkv->bhv", q, state)


def decayed_pairs(lefts: list[torch.Tensor], b: torch.Tensor, gc: torch.Tensor, sub: int = SUB) -> list[torch.Tensor]:
    """For each a in lefts: M[..., i, j] = sum_c a_i[c] b_j[c] exp(gc_i[c] - gc_j[c]) for j <= i,
    0 above; a, b, gc [..., C, D] with gc non-increasing along C (cumulative log-decays), C a
    multiple of `sub`. What depends on b and gc alone is computed once for every a."""
    *lead, C, D = b.shape
    m = C // sub
    bb, gb = (x.reshape(*lead, m, sub, D) for x in (b, gc))
    # each sub-chunk's reference: the log-decay just before its first token (0 before the chunk)
    ref = torch.cat([torch.zeros_like(gb[..., :1, 0, :]), gb[..., :-1, -1, :]], dim=-2)  # [..., m, D]
    to_ref = (gb - ref[..., None, :]).exp()  # [..., m, sub, D], exponents <= 0
    # every column against every sub-chunk's reference; columns at or after the reference are
    # masked below, so their exponent is capped at 0 instead of overflowing
    right = b[..., None, :, :] * (ref[..., :, None, :] - gc[..., None, :, :]).clamp(max=0).exp()  # [..., m, C, D]
    col_block = torch.arange(C, device=b.device) // sub
    earlier = col_block[None, None, :] < torch.arange(m, device=b.device)[:, None, None]  # [m, 1, C]
    # pairs inside a sub-chunk exactly: b_j exp(gc_i - gc_j) for j <= i, 0 for j > i (their
    # exponent, >= 0, capped first)
    causal = torch.ones(sub, sub, dtype=torch.bool, device=b.device).tril()
    within = (gb[..., :, None, :] - gb[..., None, :, :]).clamp_(max=0).exp_()  # [..., m, sub_i, sub_j, D]
    within.mul_(bb[..., None, :, :]).masked_fill_(~causal[..., None], 0.0)
    outs = []
    for a in lefts:
        ab = a.reshape(*lead, m, sub, D)
        out = ((ab * to_ref) @ right.transpose(-1, -2)).masked_fill_(~earlier, 0.0)  # [..., m, sub, C]
        diag = (within @ ab[..., None]).squeeze(-1)  # [..., m, sub_i, sub_j]
        out.view(*lead, m, sub, m, sub).diagonal(dim1=-4, dim2=-2).copy_(diag.movedim(-3, -1))
        outs.append(out.reshape(*lead, C, C))
    return outs


def chunked(q, k, v, g, beta, state: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """T tokens in the chunk/WY form. q, k [B,H,T,Dk], v [B,H,T,Dv], g [B,H,T] or [B,H,T,Dk], beta
    [B,H,T] (float32); state [B,H,Dk,Dv] float32, updated in place. Returns o [B,H,T,Dv]. chunk:
    tokens per chunk (a multiple of SUB), by default CPU_CHUNK on the CPU and CHUNK elsewhere."""
    if chunk is None:
        chunk = CPU_CHUNK if q.device.type == "cpu" else CHUNK
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    per_channel = g.dim() == k.dim()
    pad = (-T) % chunk
    if pad:  # padded tokens write nothing (beta = 0, k = 0) and do not decay (g = 0)
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, 0, 0, pad) if per_channel else (0, pad))
        beta = F.pad(beta, (0, pad))
    n = (T + pad) // chunk
    # [heads, chunk, token, width]: one chunk of every head is a batch of contiguous matrices
    q, k, v = (x.reshape(B * H, n, chunk, x.shape[-1]) for x in (q, k, v))
    beta = beta.reshape(B * H, n, chunk)
    if per_channel:
        gk = g.reshape(B * H, n, chunk, Dk).cumsum(-2)  # log-decay per channel from the chunk's start
        system, attn = decayed_pairs([k * beta[..., None], q], k, gk)  # attn: within-chunk q.k with decay
        last = gk[..., -1:, :]
        kl, ql, rows = k * gk.exp(), q * gk.exp(), None  # decay to each token, per channel: on the inputs
        kd = k * (last - gk).exp()
        chunk_decay = last.exp().transpose(-1, -2)  # [.., Dk, 1]: the state's rows decay
    else:
        gc = g.reshape(B * H, n, chunk).cumsum(-1)  # log-decay from the chunk's start to each token
        # exp(gc_i - gc_j), capped at 1 above the diagonal (j > i) where the solve does not look
        decay = (gc[..., :, None] - gc[..., None, :]).clamp_(max=0).exp_()
        kt = k.transpose(-1, -2)
        system = (k @ kt).mul_(decay).mul_(beta[..., None])
        causal = torch.ones(chunk, chunk, dtype=q.dtype, device=q.device).tril()
        attn = (q @ kt).mul_(decay.mul_(causal))  # within-chunk q.k with decay, causal
        last = gc[..., -1:]
        kl, ql, rows = k, q, gc.exp()[..., None]  # one decay per token: scales whole product rows
        kd = k
        chunk_decay = last.exp()[..., None]  # [.., 1, 1]
    # P = A^-1 diag(beta): the solve reads only the strict lower triangle of `system`
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    P = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True).mul_(beta[..., None, :])
    M = attn @ P
    if not per_channel:  # fold the decay from each token to the chunk's end into P's rows (<= 1)
        P.mul_((last - gc).exp()[..., None])
    W = torch.cat([P, M], dim=-2)  # [P; M] Y in one matmul per chunk: V' and the within-chunk output
    out = torch.empty(B * H, n, chunk, Dv, dtype=q.dtype, device=q.device)
    S = state.reshape(B * H, Dk, Dv).clone()
    for i in range(n):
        ks, qs = torch.bmm(kl[:, i], S), torch.bmm(ql[:, i], S)
        y = v[:, i] - ks if rows is None else torch.addcmul(v[:, i], ks, rows[:, i], value=-1.0)
        vm = torch.bmm(W[:, i], y)
        if rows is None:
            torch.add(vm[:, chunk:], qs, out=out[:, i])
        else:
            torch.addcmul(vm[:, chunk:], qs, rows[:, i], out=out[:, i])
        S.mul_(chunk_decay[:, i]).baddbmm_(kd[:, i].transpose(-1, -2), vm[:, :chunk])
    state.copy_(S.view(B, H, Dk, Dv))
    return out.view(B, H, n * chunk, Dv)[:, :, :T]
