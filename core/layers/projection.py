"""The one dense projection every block uses: ``x @ kernel + bias`` as a single fused call."""

import torch


def project(x, kernel, bias=None):
    """[..., in] @ kernel [in, out] (+ bias [out]) -> [..., out].

    With a bias this is one ``addmm`` over the flattened rows, as ``torch.nn.Linear`` runs
    it, rather than a matmul and a separate add: one pass over the output instead of two.
    """
    if bias is None:
        return x @ kernel
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])
