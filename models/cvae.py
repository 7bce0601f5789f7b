"""Conditional VAE over flat LoRA vectors (paper §3.3.2, eq. 9).

X is a LoRA snapshot and c = {mu*, sigma*^2} its task's semantic prior. Both live in a
per-coordinate normalised space (x - m) / s with m, s the statistics of the training
snapshots, stored as buffers so a saved generator is self-contained.

  encoder q(z | X, c): 2-layer ReLU MLP -> (mu_q, logvar_q)
  prior   p(z | c):    2-layer ReLU MLP -> (mu_p, logvar_p)
  decoder p(X | z, c): 3-layer ReLU MLP -> X_hat
  loss = ||X - X_hat||^2 + lambda * KL(q || p)

The first layer of each MLP acts on a concatenation with c; its c-part W_c c is computed
once and shared by the three networks (one ``cond`` projection), which keeps the
parameter count near 4·P·H instead of 8·P·H for large LoRAs (P = 110,592 for ViT-B/16).
With ``residual`` the decoder predicts X - mu* (normalised): the generator learns a
correction of the prior mean rather than the whole LoRA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

LOGVAR_EPS = 1e-6


@dataclass(frozen=True)
class CVAEConfig:
    lora_dim: int  # P, length of the flat LoRA
    latent_dim: int = 32  # size of z
    hidden_dim: int = 256  # width of every hidden layer
    kl_weight: float = 1.0  # lambda in eq. 9 (paper: 1)
    residual: bool = True  # decoder predicts X - mu* (normalised) instead of X
    use_variance: bool = True  # condition on sigma*^2 as well as mu* (paper: c = {mu*, sigma*^2})

    def __post_init__(self) -> None:
        for name in ("lora_dim", "latent_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"generator.{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_weight < 0:
            raise ValueError(f"generator.kl_weight must be >= 0, got {self.kl_weight}")

    def to_dict(self) -> dict:
        return asdict(self)


def _gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over latent dims: (B, L) -> (B,)."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)


class CVAE(nn.Module):
    def __init__(self, config: CVAEConfig):
        super().__init__()
        self.config = config
        p, h, lat = config.lora_dim, config.hidden_dim, config.latent_dim
        c_dim = 2 * p if config.use_variance else p
        self.cond = nn.Linear(c_dim, h)  # shared W_c c of the three first layers
        self.enc_x = nn.Linear(p, h, bias=False)
        self.enc_out = nn.Linear(h, 2 * lat)
        self.prior_in = nn.Linear(h, h)
        self.prior_out = nn.Linear(h, 2 * lat)
        self.dec_z = nn.Linear(lat, h, bias=False)
        self.dec_hidden = nn.Linear(h, h)
        self.dec_out = nn.Linear(h, p)
        nn.init.zeros_(self.dec_out.weight)  # start at X_hat = mu* (residual) / m (plain)
        nn.init.zeros_(self.dec_out.bias)
        self.register_buffer("x_mean", torch.zeros(p))
        self.register_buffer("x_std", torch.ones(p))

    # ---- normalisation ------------------------------------------------------------------------
    def set_normalisation(self, snapshots: torch.Tensor, min_std: float = 1e-6) -> None:
        """Per-coordinate statistics of the training snapshots (N, P)."""
        self.x_mean.copy_(snapshots.mean(0))
        self.x_std.copy_(snapshots.std(0, unbiased=False).clamp_min(min_std))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.x_std + self.x_mean

    def condition(self, prior_mean: torch.Tensor, prior_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw prior (B, P) x2 -> (shared condition features (B, H), normalised mu* (B, P))."""
        mu_n = self.normalise(prior_mean)
        parts = [mu_n]
        if self.config.use_variance:
            parts.append(torch.log(prior_var / self.x_std**2 + LOGVAR_EPS))
        return self.cond(torch.cat(parts, dim=-1)), mu_n

    # ---- networks -----------------------------------------------------------------------------
    def _prior(self, hc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.prior_out(F.relu(self.prior_in(F.relu(hc)))).chunk(2, dim=-1)
        return mu, logvar.clamp(-10, 10)

    def _decode(self, z: torch.Tensor, hc: torch.Tensor, mu_n: torch.Tensor) -> torch.Tensor:
        out = self.dec_out(F.relu(self.dec_hidden(F.relu(self.dec_z(z) + hc))))
        return out + mu_n if self.config.residual else out

    def loss(
        self, x: torch.Tensor, prior_mean: torch.Tensor, prior_var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 9 on a batch of raw snapshots x (B, P): (total, reconstruction, KL), each a batch mean."""
        hc, mu_n = self.condition(prior_mean, prior_var)
        x_n = self.normalise(x)
        mu_q, logvar_q = self.enc_out(F.relu(self.enc_x(x_n) + hc)).chunk(2, dim=-1)
        logvar_q = logvar_q.clamp(-10, 10)
        mu_p, logvar_p = self._prior(hc)
        z = mu_q + torch.randn_like(mu_q) * (0.5 * logvar_q).exp()
        x_hat = self._decode(z, hc, mu_n)
        rec = ((x_hat - x_n) ** 2).sum(-1).mean() / x.shape[-1]  # per-coordinate mean keeps lambda scale-free
        kl = _gaussian_kl(mu_q, logvar_q, mu_p, logvar_p).mean()
        return rec + self.config.kl_weight * kl / x.shape[-1], rec, kl

    @torch.no_grad()
    def sample(
        self,
        prior_mean: torch.Tensor,
        prior_var: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Draws z ~ p(z | c) and decodes: (P,) or (B, P) raw prior -> raw LoRA of the same shape.

        ``generator``: one for the whole draw, or a list with one per row (row i's noise is then what
        its generator alone would draw, whatever else is in the batch).
        """
        single = prior_mean.dim() == 1
        pm, pv = (prior_mean.unsqueeze(0), prior_var.unsqueeze(0)) if single else (prior_mean, prior_var)
        hc, mu_n = self.condition(pm, pv)
        mu_p, logvar_p = self._prior(hc)
        # Noise drawn on the CPU from the caller's generator(s): identical bytes on every device.
        if isinstance(generator, list):
            if len(generator) != mu_p.shape[0]:
                raise ValueError(f"{len(generator)} generators for {mu_p.shape[0]} rows")
            eps = torch.cat([torch.randn((1, mu_p.shape[1]), generator=g, dtype=mu_p.dtype) for g in generator])
        else:
            eps = torch.randn(mu_p.shape, generator=generator, dtype=mu_p.dtype)
        x = self.denormalise(self._decode(mu_p + eps.to(mu_p.device) * (0.5 * logvar_p).exp(), hc, mu_n))
        return x[0] if single else x
