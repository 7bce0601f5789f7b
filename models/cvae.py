"""Conditional VAE over flat LoRA vectors (paper §3.3.2, eq. 9).

X is a LoRA snapshot and c = {mu*, sigma*^2} its task's semantic prior. Both live in a
per-coordinate normalised space (x - m) / s with m, s the statistics of the training
snapshots, stored as buffers so a saved generator is self-contained.

  encoder q(z | X, c): 2-layer ReLU MLP -> (mu_q, logvar_q)
  prior   p(z | c):    3-layer ReLU MLP -> (mu_p, logvar_p)   (the paper: 2 layers; see README)
  decoder p(X | z, c): 3-layer ReLU MLP -> X_hat
  loss = ||X - X_hat||^2 + lambda * KL(q || p)

The first layer of each MLP acts on a concatenation with c; its c-part W_c c is computed
once and shared by the three networks, which keeps the parameter count near 4·P·H instead of
8·P·H for large LoRAs (P = 110,592 for ViT-B/16). W_c c is kept as two products,
``cond_mu`` on the normalised mu* and ``cond_var`` on log sigma*^2: the first is linear in
mu* = sum_k alpha_k mu_k, so a sampler can precompute it per expert (:meth:`mean_features`)
and read only two of the three P x H weight blocks per sample.
With ``residual`` the decoder predicts X - mu* (normalised): the generator learns a
correction of the prior mean rather than the whole LoRA.
With ``description_dim`` > 0 (not in the paper) c also holds the task's description embedding d*
(D values): ``cond_desc`` adds W_d d* to the shared condition features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import skip_init

from models.packed import PackedLinear

LOGVAR_EPS = 1e-6
LOGVAR_BOUND = 10.0  # the prior's and the encoder's log-variances are kept within +-10
# The layers of the sampling path (condition on sigma*^2, prior network, decoder): those :meth:`CVAE.packed`
# moves onto oneDNN. cond_mu is left as it is: samplers read its weight through mean_features.
SAMPLING_LAYERS = ("cond_var", "cond_desc", "prior_in", "prior_out", "dec_z", "dec_hidden", "dec_out")


@dataclass(frozen=True)
class CVAEConfig:
    lora_dim: int  # P, length of the flat LoRA
    latent_dim: int = 32  # size of z
    hidden_dim: int = 256  # width of every hidden layer
    kl_weight: float = 1.0  # lambda in eq. 9 (paper: 1)
    residual: bool = True  # decoder predicts X - mu* (normalised) instead of X
    use_variance: bool = True  # condition on sigma*^2 as well as mu* (paper: c = {mu*, sigma*^2})
    description_dim: int = 0  # > 0: condition on the description embedding d* too (not in the paper)

    def __post_init__(self) -> None:
        for name in ("lora_dim", "latent_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"generator.{name} must be >= 1, got {getattr(self, name)}")
        if self.description_dim < 0:
            raise ValueError(f"description_dim must be >= 0, got {self.description_dim}")
        if self.kl_weight < 0:
            raise ValueError(f"generator.kl_weight must be >= 0, got {self.kl_weight}")

    def to_dict(self) -> dict:
        return asdict(self)


def _bounded(logvar: torch.Tensor) -> torch.Tensor:
    """``logvar`` clamped to +-LOGVAR_BOUND. While training, the gradient passes the bound (straight-through):
    a plain clamp passes none there, so a log-variance that overshot could not be pulled back by the KL term,
    and Adam's momentum carried it further (measured on the tiny config: a quarter of the prior's dimensions
    stuck at a standard deviation of e^5). Without a gradient the value is the plain clamp's, bit for bit."""
    clamped = logvar.clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
    return logvar + (clamped - logvar).detach() if logvar.requires_grad else clamped


def _gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over latent dims: (B, L) -> (B,)."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)


class CVAE(nn.Module):
    def __init__(self, config: CVAEConfig):
        super().__init__()
        self.config = config
        p, h, lat = config.lora_dim, config.hidden_dim, config.latent_dim
        c_dim = 2 * p if config.use_variance else p
        # Shared W_c c of the three first layers, as [W_mu | W_var]: initialised as one Linear(c_dim, h)
        # (the same draws as a single layer would take), then split.
        full = nn.Linear(c_dim, h)
        self.cond_mu = skip_init(nn.Linear, p, h)  # skip_init: no draws, so every later layer's init is unchanged
        self.cond_var = skip_init(nn.Linear, p, h, bias=False) if config.use_variance else None
        with torch.no_grad():
            self.cond_mu.weight.copy_(full.weight[:, :p])
            self.cond_mu.bias.copy_(full.bias)
            if self.cond_var is not None:
                self.cond_var.weight.copy_(full.weight[:, p:])
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
        # Last, so that without it every other layer draws the same initial weights as before.
        self.cond_desc = nn.Linear(config.description_dim, h, bias=False) if config.description_dim else None

    # ---- normalisation ------------------------------------------------------------------------
    def set_normalisation(self, snapshots: torch.Tensor, min_std: float = 1e-6) -> None:
        """Per-coordinate statistics of the training snapshots (N, P)."""
        self.x_mean.copy_(snapshots.mean(0))
        self.x_std.copy_(snapshots.std(0, unbiased=False).clamp_min(min_std))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.x_std + self.x_mean

    def condition(
        self,
        prior_mean: torch.Tensor,
        prior_var: torch.Tensor,
        mean_features: torch.Tensor | None = None,
        description: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw prior (B, P) x2 -> (shared condition features (B, H), normalised mu* (B, P)).

        ``mean_features`` (B, H): W_mu applied to the normalised mu*, when the caller has it already
        (sum_k alpha_k of the experts' :meth:`mean_features`); it replaces a read of W_mu.
        ``description`` (B, D): the description embeddings d*; required exactly when
        ``config.description_dim`` > 0."""
        mu_n = self.normalise(prior_mean)
        if mean_features is None:
            hc = self.cond_mu(mu_n)
        else:
            hc = mean_features + self.cond_mu.bias
        if self.cond_var is not None:
            hc = hc + self.cond_var(torch.log(prior_var / self.x_std**2 + LOGVAR_EPS))
        if self.cond_desc is not None:
            if description is None or description.shape[-1] != self.config.description_dim:
                got = None if description is None else tuple(description.shape)
                dim = self.config.description_dim
                raise ValueError(f"this generator is conditioned on {dim}-d description embeddings, got {got}")
            hc = hc + self.cond_desc(description.to(hc.dtype))
        elif description is not None:
            raise ValueError("this generator takes no description embedding (description_dim 0)")
        return hc, mu_n

    @torch.no_grad()
    def mean_features(self, means: torch.Tensor) -> torch.Tensor:
        """(E, P) raw expert means -> (E, H): W_mu applied to each normalised mean, one row at a time
        (a row's value does not depend on E). Since the softmax weights alpha sum to 1,
        W_mu normalise(sum_k alpha_k mu_k) = sum_k alpha_k (W_mu normalise(mu_k))."""
        w = self.cond_mu.weight
        return torch.cat([F.linear(self.normalise(m.unsqueeze(0)), w) for m in means.to(w.device, w.dtype)])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Generators saved before the split hold one ``cond`` layer over [mu_n, log var]: split it.
        old_w, old_b = state_dict.pop(prefix + "cond.weight", None), state_dict.pop(prefix + "cond.bias", None)
        if old_w is not None:
            p = self.config.lora_dim
            state_dict[prefix + "cond_mu.weight"] = old_w[:, :p].contiguous()
            if old_b is not None:
                state_dict[prefix + "cond_mu.bias"] = old_b
            if self.config.use_variance:
                state_dict[prefix + "cond_var.weight"] = old_w[:, p:].contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def packed(self, dtype: torch.dtype = torch.float32) -> CVAE | None:
        """A sampler for the CPU: a CVAE that shares this one's buffers and ``cond_mu`` and runs the layers
        of :meth:`sample` as :class:`PackedLinear` in ``dtype`` (float32, or bfloat16: half the weight bytes
        a pass reads; samples within ~2e-3 relative of float32's); it can sample (and nothing else: no
        encoder, no training), with this generator's weights as they are now. None where that is not
        possible (not a float32 CPU generator, a torch without oneDNN, or a dtype its kernels lack): then
        sample with the generator itself. Its rows round differently from this generator's (another
        kernel), so one service must sample with one or the other throughout."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"packed samplers run in float32 or bfloat16, not {dtype}")
        if self.x_mean.device.type != "cpu" or self.x_mean.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return None
        clone = CVAE.__new__(CVAE)
        nn.Module.__init__(clone)
        clone.config = self.config
        clone.register_buffer("x_mean", self.x_mean)
        clone.register_buffer("x_std", self.x_std)
        clone.cond_mu = self.cond_mu
        clone.enc_x = clone.enc_out = None
        try:
            for name in SAMPLING_LAYERS:
                layer = getattr(self, name)
                setattr(clone, name, None if layer is None else PackedLinear(layer, dtype=dtype))
            with torch.no_grad():  # one row through every packed layer: a kernel this build lacks fails here
                d = torch.zeros(self.config.description_dim) if self.cond_desc is not None else None
                clone.sample(self.x_mean, self.x_std**2, generator=torch.Generator().manual_seed(0), description=d)
        except (RuntimeError, AttributeError):
            return None
        return clone.eval()

    # ---- networks -----------------------------------------------------------------------------
    def _prior(self, hc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.prior_out(F.relu(self.prior_in(F.relu(hc)))).chunk(2, dim=-1)
        return mu, _bounded(logvar)

    def _decode(self, z: torch.Tensor, hc: torch.Tensor, mu_n: torch.Tensor) -> torch.Tensor:
        out = self.dec_out(F.relu(self.dec_hidden(F.relu(self.dec_z(z) + hc))))
        return out + mu_n if self.config.residual else out

    def loss(
        self, x: torch.Tensor, prior_mean: torch.Tensor, prior_var: torch.Tensor, description: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 9 on a batch of raw snapshots x (B, P): (total, reconstruction, KL), each a batch mean."""
        hc, mu_n = self.condition(prior_mean, prior_var, description=description)
        x_n = self.normalise(x)
        mu_q, logvar_q = self.enc_out(F.relu(self.enc_x(x_n) + hc)).chunk(2, dim=-1)
        logvar_q = _bounded(logvar_q)
        mu_p, logvar_p = self._prior(hc)
        z = mu_q + torch.randn_like(mu_q) * (0.5 * logvar_q).exp()
        x_hat = self._decode(z, hc, mu_n)
        rec = ((x_hat - x_n) ** 2).sum(-1).mean() / x.shape[-1]  # per-coordinate mean keeps lambda scale-free
        kl = _gaussian_kl(mu_q, logvar_q, mu_p, logvar_p).mean()
        return rec + self.config.kl_weight * kl / x.shape[-1], rec, kl

    def rsample(
        self, prior_mean: torch.Tensor, prior_var: torch.Tensor, eps: torch.Tensor, description: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The sampling path with gradients (reparameterised): raw prior (B, P) x2 and noise (B, L) -> raw
        LoRAs (B, P); :meth:`sample` with this noise gives the same values. For training objectives on
        what the generator samples."""
        hc, mu_n = self.condition(prior_mean, prior_var, description=description)
        mu_p, logvar_p = self._prior(hc)
        return self.denormalise(self._decode(mu_p + eps * (0.5 * logvar_p).exp(), hc, mu_n))

    @torch.no_grad()
    def sample(
        self,
        prior_mean: torch.Tensor,
        prior_var: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        mean_features: torch.Tensor | None = None,
        description: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draws z ~ p(z | c) and decodes: (P,) or (B, P) raw prior -> raw LoRA of the same shape.

        ``generator``: one for the whole draw, or a list with one per row (row i's noise is then what
        its generator alone would draw, whatever else is in the batch). ``mean_features`` and
        ``description``: see :meth:`condition`, (H,) / (D,) or (B, H) / (B, D).
        """
        single = prior_mean.dim() == 1
        pm, pv = (prior_mean.unsqueeze(0), prior_var.unsqueeze(0)) if single else (prior_mean, prior_var)
        if mean_features is not None and mean_features.dim() == 1:
            mean_features = mean_features.unsqueeze(0)
        if description is not None and description.dim() == 1:
            description = description.unsqueeze(0)
        hc, mu_n = self.condition(pm, pv, mean_features, description)
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
