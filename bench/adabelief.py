"""AdaBelief in plain PyTorch: a baseline of ``python -m bench train``."""
from __future__ import annotations

import torch
from torch.optim import Optimizer


class AdaBelief(Optimizer):
    """AdaBelief (Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris, Duncan, "AdaBelief
    Optimizer: Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020,
    arXiv 2010.07468), Algorithm 2 of the paper.

    Adam with the second moment of the gradient replaced by the "belief" ``(g - m)^2``, the
    squared deviation of the gradient from its running mean.  Per param, at step ``t``::

        g   <- grad (+ weight_decay * x   with L2 weight decay, decoupled=False)
        m   <- beta1 m + (1 - beta1) g
        s   <- beta2 s + (1 - beta2) (g - m)^2 + eps
        m_hat = m / (1 - beta1^t),  s_hat = s / (1 - beta2^t)
        x   <- x * (1 - lr * weight_decay)          (decoupled weight decay, decoupled=True)
        x   <- x - lr m_hat / (sqrt(s_hat) + eps)

    Args:
        params: iterable of params or param groups.
        lr: step size (default 1e-3).
        betas: (beta1, beta2) (default (0.9, 0.999)).
        eps: added to s every step and to its square root in the denominator (default 1e-16,
            the official implementation's default since its version 0.1.0).
        weight_decay: weight decay factor (default 0: off).
        decoupled: decoupled weight decay as in AdamW (True) or L2 added to the gradient
            (False, default); only used with ``weight_decay > 0``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-16, weight_decay: float = 0.0, decoupled: bool = False) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid eps: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta{i + 1}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, decoupled=decoupled))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AdaBelief does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_var"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, s = state["exp_avg"], state["exp_avg_var"]
                if wd:
                    if group["decoupled"]:
                        p.mul_(1 - lr * wd)
                    else:
                        grad = grad.add(p, alpha=wd)
                m.lerp_(grad, 1 - beta1)
                diff = grad - m
                s.mul_(beta2).addcmul_(diff, diff, value=1 - beta2).add_(eps)
                bias1 = 1 - beta1 ** t
                bias2 = 1 - beta2 ** t
                denom = (s / bias2).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias1)
        return loss


__all__ = ["AdaBelief"]
