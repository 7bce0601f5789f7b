import dataclasses

import pytest
import torch
from onednn_support import needs_onednn, needs_onednn_bfloat16

from models.cvae import CVAE, CVAEConfig


def _model(residual=True):
    torch.manual_seed(0)
    m = CVAE(CVAEConfig(lora_dim=20, latent_dim=4, hidden_dim=16, residual=residual))
    m.set_normalisation(torch.randn(50, 20) * 3 + 1)
    return m


def test_same_seed_same_bytes_and_seeds_differ():
    m = _model()
    torch.nn.init.normal_(m.dec_out.weight)  # as after training; at init the output ignores z
    mu, var = torch.randn(20), torch.rand(20)
    a = m.sample(mu, var, torch.Generator().manual_seed(7))
    b = m.sample(mu, var, torch.Generator().manual_seed(7))
    c = m.sample(mu, var, torch.Generator().manual_seed(8))
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c)
    assert m.sample(torch.randn(3, 20), torch.rand(3, 20)).shape == (3, 20)


def test_untrained_residual_decoder_returns_prior_mean():
    m = _model()
    mu = torch.randn(20)
    torch.testing.assert_close(m.sample(mu, torch.rand(20), torch.Generator().manual_seed(0)), mu, atol=1e-5, rtol=1e-5)


def test_training_reduces_loss_and_learns_the_task_offset():
    # Target = prior mean + a fixed offset: the generator must learn the correction.
    torch.manual_seed(0)
    m = _model()
    offset = torch.linspace(-2, 2, 20)
    mu = torch.randn(64, 20)
    x = mu + offset + 0.01 * torch.randn(64, 20)
    m.set_normalisation(x)
    var = torch.full((64, 20), 0.1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = m.loss(x, mu, var)[0].item()
    for _ in range(300):
        loss = m.loss(x, mu, var)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    sample = m.sample(mu[0], var[0], torch.Generator().manual_seed(0))
    assert (sample - x[0]).abs().mean() < 0.5 * offset.abs().mean()


def test_log_variances_are_bounded_but_the_kl_can_pull_them_back():
    """A prior log-variance beyond the bound reads as the bound, and the loss's gradient still reaches it
    (a plain clamp passed none: such a dimension stayed at std e^5); without gradients the plain clamp's value."""
    m = _model()
    with torch.no_grad():
        m.prior_out.bias[m.config.latent_dim :] = 25.0  # every prior log-variance far above the bound
    hc, _ = m.condition(torch.randn(20), torch.rand(20))
    _, logvar = m._prior(hc)
    assert torch.equal(logvar.detach(), torch.full_like(logvar, 10.0))
    m.loss(torch.randn(8, 20), torch.randn(8, 20), torch.rand(8, 20))[0].backward()
    grad = m.prior_out.bias.grad[m.config.latent_dim :]
    assert (grad > 0).all()  # descending it lowers the variance that overshot
    with torch.no_grad():
        _, logvar = m._prior(hc)
    assert not logvar.requires_grad and torch.equal(logvar, torch.full_like(logvar, 10.0))


def test_rows_with_their_own_generators_match_each_row_alone():
    m = _model()
    torch.nn.init.normal_(m.dec_out.weight)
    torch.nn.init.normal_(m.prior_out.weight)
    mus, vars_ = torch.randn(5, 20), torch.rand(5, 20)
    seeds = [3, 1, 4, 1, 5]
    batch = m.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in seeds])
    for i, s in enumerate(seeds):
        alone = m.sample(mus[i : i + 1], vars_[i : i + 1], [torch.Generator().manual_seed(s)])
        torch.testing.assert_close(batch[i], alone[0])  # same noise; the product's rounding may differ
    assert not torch.equal(batch[1], batch[2])
    with pytest.raises(ValueError, match="2 generators for 5 rows"):
        m.sample(mus, vars_, [torch.Generator(), torch.Generator()])


def test_condition_from_precomputed_expert_features_matches_the_full_product():
    """W_mu normalise(sum_k alpha_k mu_k) = sum_k alpha_k (W_mu normalise(mu_k)) when alpha sums to 1:
    a sample from the experts' precomputed features equals (to rounding) the full product's."""
    m = _model()
    torch.nn.init.normal_(m.dec_out.weight)
    means, variances = torch.randn(6, 20), torch.rand(6, 20)
    alpha = torch.softmax(torch.randn(6), 0)
    mu = alpha @ means
    var = alpha @ variances
    feats = m.mean_features(means)
    assert feats.shape == (6, 16)
    assert torch.equal(m.mean_features(means[2:3])[0], feats[2])  # a row's value does not depend on the others
    full = m.sample(mu, var, torch.Generator().manual_seed(1))
    quick = m.sample(mu, var, torch.Generator().manual_seed(1), mean_features=alpha @ feats)
    torch.testing.assert_close(quick, full, rtol=1e-5, atol=1e-6)


def test_generators_saved_with_one_condition_layer_still_load():
    """Before the condition layer was split, it was one Linear over [normalised mu*, log var*]."""
    m = _model()
    torch.nn.init.normal_(m.dec_out.weight)
    state = dict(m.state_dict())
    state["cond.weight"] = torch.cat([state.pop("cond_mu.weight"), state.pop("cond_var.weight")], dim=1)
    state["cond.bias"] = state.pop("cond_mu.bias")
    old = CVAE(m.config)
    old.load_state_dict(state, strict=True)
    mu, var = torch.randn(20), torch.rand(20)
    a = old.sample(mu, var, torch.Generator().manual_seed(4))
    b = m.sample(mu, var, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert torch.equal(old.cond_mu.weight, m.cond_mu.weight) and torch.equal(old.cond_var.weight, m.cond_var.weight)


def test_generator_weight_decay_shrinks_the_learnt_weights():
    from training.config import GeneratorTrainingConfig
    from training.generator import GeneratorData, train_generator

    torch.manual_seed(0)
    mu = torch.randn(8, 20)
    x = (mu + torch.linspace(-2, 2, 20)).repeat_interleave(4, 0) + 0.1 * torch.randn(32, 20)
    data = GeneratorData(x, mu, torch.full((8, 20), 0.1), torch.arange(8).repeat_interleave(4))

    def norm(wd: float) -> float:
        cfg = GeneratorTrainingConfig(latent_dim=4, hidden_dim=16, epochs=40, batch_size=8, weight_decay=wd)
        model, _ = train_generator(data, None, cfg, progress=False)
        return float(torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("weight")]).norm())

    assert norm(3.0) < 0.8 * norm(0.0)


def test_patience_stops_early_and_keeps_the_best_epoch():
    from training.config import GeneratorTrainingConfig
    from training.generator import GeneratorData, train_generator

    torch.manual_seed(0)
    mu = torch.randn(8, 20)
    x = (mu + torch.linspace(-2, 2, 20)).repeat_interleave(4, 0) + 0.1 * torch.randn(32, 20)
    data = GeneratorData(x, mu, torch.full((8, 20), 0.1), torch.arange(8).repeat_interleave(4))
    val = GeneratorData(x[:8] + 5.0, mu[:2], torch.full((2, 20), 0.1), torch.arange(2).repeat_interleave(4))
    base = dict(latent_dim=4, hidden_dim=16, epochs=60, batch_size=8, lr=0.05)
    full_model, full = train_generator(data, val, GeneratorTrainingConfig(**base), progress=False)
    model, hist = train_generator(data, val, GeneratorTrainingConfig(**base, patience=3), progress=False)
    losses = [h["val_loss"] for h in hist]
    best = losses.index(min(losses))
    assert len(hist) < len(full) and len(hist) == best + 4  # stopped 3 epochs after its best
    assert [h["val_loss"] for h in full[: len(hist)]] == losses  # the same run up to the stop
    from training.generator import _eval_loss

    assert _eval_loss(model, val, GeneratorTrainingConfig(**base), None) == pytest.approx(min(losses))  # best kept
    with pytest.raises(ValueError, match="patience needs validation"):
        train_generator(data, None, GeneratorTrainingConfig(**base, patience=3), progress=False)
    with pytest.raises(ValueError, match="patience"):
        GeneratorTrainingConfig(patience=0)


def test_validation_leaves_the_training_noise_alone(monkeypatch):
    # The validation loss uses a fixed noise draw, but must not reseed the training loop's generator:
    # each epoch then drew the encoder's noise the validation pass had just reset it to.
    from training.config import GeneratorTrainingConfig
    from training.generator import GeneratorData, _eval_loss, train_generator

    torch.manual_seed(0)
    mu = torch.randn(4, 20)
    x = mu.repeat_interleave(4, 0) + 0.1 * torch.randn(16, 20)
    data = GeneratorData(x, mu, torch.full((4, 20), 0.1), torch.arange(4).repeat_interleave(4))
    cfg = GeneratorTrainingConfig(latent_dim=4, hidden_dim=16, epochs=3, batch_size=16, lr=0.01)
    model = _model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = _eval_loss(model, data, cfg, None)
    assert torch.equal(torch.get_rng_state(), state)
    assert _eval_loss(model, data, cfg, None) == first  # still a fixed draw

    draws = []
    real = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: draws.append(real(t, **kw)) or draws[-1])
    train_generator(data, data, cfg, progress=False)
    training = draws[0::2]  # one batch per epoch: the training step's draw, then validation's
    assert len(training) == 3 and not torch.equal(training[1], training[2])
    assert torch.equal(draws[1], draws[3])  # validation: the same draw each epoch


def test_max_grad_norm_clips_every_step(monkeypatch):
    from training.config import GeneratorTrainingConfig
    from training.generator import GeneratorData, train_generator

    torch.manual_seed(0)
    mu = torch.randn(8, 20)
    x = (mu + torch.linspace(-2, 2, 20)).repeat_interleave(4, 0) + 0.1 * torch.randn(32, 20)
    data = GeneratorData(x, mu, torch.full((8, 20), 0.1), torch.arange(8).repeat_interleave(4))
    base = dict(latent_dim=4, hidden_dim=16, epochs=3, batch_size=8, lr=0.05)
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        norms.append(float(real(params, max_norm)))  # the norm before clipping
        after = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()
        assert after <= max_norm * 1.001
        return torch.tensor(norms[-1])

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    plain, _ = train_generator(data, None, GeneratorTrainingConfig(**base), progress=False)
    assert norms == []  # off by default
    clipped, _ = train_generator(data, None, GeneratorTrainingConfig(**base, max_grad_norm=0.01), progress=False)
    assert len(norms) == 3 * 4 and max(norms) > 0.01  # every step, and it had something to clip
    w = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (plain, clipped)]
    assert not torch.allclose(w[0], w[1])
    with pytest.raises(ValueError, match="max_grad_norm"):
        GeneratorTrainingConfig(max_grad_norm=0)


def test_negative_generator_weight_decay_is_refused():
    from training.config import GeneratorTrainingConfig

    with pytest.raises(ValueError, match="weight_decay"):
        GeneratorTrainingConfig(weight_decay=-1)


@needs_onednn
def test_packed_sampler_samples_what_the_generator_samples():
    """CVAE.packed: a sampling-only copy on oneDNN, equal to the generator to float32 rounding, sharing its
    buffers; without use_variance it packs no cond_var."""
    for use_variance in (True, False):
        torch.manual_seed(0)
        m = CVAE(CVAEConfig(lora_dim=20, latent_dim=4, hidden_dim=16, use_variance=use_variance))
        m.set_normalisation(torch.randn(50, 20) * 3 + 1)
        torch.nn.init.normal_(m.dec_out.weight)
        packed = m.packed()
        assert packed is not None  # None would be a failed test sample (needs_onednn: the kernel is there)
        assert (packed.cond_var is None) == (not use_variance) and packed.x_std is m.x_std
        mus, vars_ = torch.randn(5, 20), torch.rand(5, 20)
        want = m.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in range(5)])
        got = packed.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in range(5)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.equal(want, m.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in range(1, 6)]))


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_onednn_bfloat16)])
def test_a_packed_sampler_of_a_large_lora_splits_its_p_by_h_layers_and_samples_the_same_bits(monkeypatch, dtype):
    """split_large on a packed sampler (Engine.split_sampler, for the service): layers of at least
    SPLIT_MIN_BYTES (open_clip ViT-B-16's shape: 57 MB each in bfloat16) run in two
    blocks of outputs on two threads where two cores are there: the same samples, bit for bit."""
    import models.packed as packed_module
    from models.packed import PackedLinear, SplitLinear, split_large

    torch.manual_seed(0)
    m = CVAE(CVAEConfig(lora_dim=96, latent_dim=4, hidden_dim=16))
    m.set_normalisation(torch.randn(50, 96) * 3 + 1)
    torch.nn.init.normal_(m.dec_out.weight, std=0.1)
    whole = m.packed(dtype)
    assert split_large(whole) == 0  # 96 x 16 weights: far below the default size
    assert isinstance(whole.dec_out, PackedLinear) and isinstance(whole.cond_var, PackedLinear)
    monkeypatch.setattr(packed_module, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # as in the service's model threads
    monkeypatch.setattr(packed_module, "SPLIT_MIN_BYTES", 96 * 16 * torch.tensor([], dtype=dtype).element_size())
    split = m.packed(dtype)
    assert split_large(split) == 2
    assert isinstance(split.dec_out, SplitLinear) and isinstance(split.cond_var, SplitLinear)
    assert isinstance(split.dec_hidden, PackedLinear)  # 16 x 16: stays whole
    for n in (1, 3, 16):
        mus, vars_ = torch.randn(n, 96), torch.rand(n, 96)
        want = whole.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in range(n)])
        got = split.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in range(n)])
        assert torch.equal(got, want), n


@needs_onednn_bfloat16
def test_bfloat16_packed_sampler_is_close_to_float32_and_keeps_float32_at_its_edges():
    torch.manual_seed(0)
    m = CVAE(CVAEConfig(lora_dim=64, latent_dim=4, hidden_dim=32))
    m.set_normalisation(torch.randn(50, 64) * 3 + 1)
    torch.nn.init.normal_(m.dec_out.weight, std=0.1)  # a trained decoder's output is not zero
    packed32, packed16 = m.packed(), m.packed(torch.bfloat16)
    assert packed32 is not None and packed16 is not None
    assert packed16.dec_out.weight.dtype == torch.bfloat16 and "dtype=bfloat16" in repr(packed16.dec_out)
    mus, vars_ = torch.randn(5, 64), torch.rand(5, 64)
    want = packed32.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in range(5)])
    got = packed16.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in range(5)])
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    assert float((got - want).norm() / want.norm()) < 1e-2
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        m.packed(torch.float16)


def test_packed_sampler_falls_back_where_onednn_is_missing_or_fails(monkeypatch):
    m = _model()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert m.packed() is None
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken, raising=False)
    assert m.packed() is None
    assert m.half().packed() is None  # only float32 generators are packed


def test_rsample_is_sample_with_gradients():
    """The reparameterised sampling path (generator.task_weight) draws what sample draws with the same noise."""
    m = _model()
    torch.nn.init.normal_(m.dec_out.weight)
    torch.nn.init.normal_(m.prior_out.weight)
    mus, vars_ = torch.randn(3, 20), torch.rand(3, 20)
    eps = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    drawn = m.rsample(mus, vars_, eps)
    torch.testing.assert_close(drawn, m.sample(mus, vars_, torch.Generator().manual_seed(2)))
    drawn.square().sum().backward()
    assert m.prior_out.weight.grad.abs().sum() > 0 and m.dec_out.weight.grad.abs().sum() > 0


def test_task_loss_term_needs_the_backbone_and_every_tasks_data():
    from training.config import GeneratorTrainingConfig
    from training.generator import GeneratorData, train_generator

    data = GeneratorData(torch.randn(8, 20), torch.randn(2, 20), torch.rand(2, 20), torch.arange(2).repeat_interleave(4))
    with pytest.raises(ValueError, match="task_weight"):
        train_generator(data, None, GeneratorTrainingConfig(epochs=1, task_weight=1.0), progress=False)
    with pytest.raises(ValueError, match="task_weight"):
        GeneratorTrainingConfig(task_weight=-0.5)


def test_task_kinds_are_checked():
    from training.config import GeneratorTrainingConfig

    assert GeneratorTrainingConfig(task_kinds=("classification",)).task_kinds == ("classification",)
    for bad in ((), ("segmentation",)):
        with pytest.raises(ValueError, match="task_kinds"):
            GeneratorTrainingConfig(task_kinds=bad)


def test_prior_path_term_teaches_the_prior_network_what_to_propose():
    """generator.prior_path_weight > 0 (Sohn et al.'s hybrid objective): samples drawn through p(z | c)
    reconstruct the snapshots better than those of eq. 9 alone, whose prior network only follows the KL
    (here weighted 0, so eq. 9 leaves it untrained)."""
    from training.config import GeneratorTrainingConfig
    from training.generator import GeneratorData, train_generator

    torch.manual_seed(0)
    mu = torch.randn(8, 20)
    x = (mu + torch.randn(8, 20)).repeat_interleave(4, 0) + 0.05 * torch.randn(32, 20)  # a per-task offset
    data = GeneratorData(x, mu, torch.full((8, 20), 0.1), torch.arange(8).repeat_interleave(4))

    def sample_error(weight: float) -> float:
        cfg = GeneratorTrainingConfig(
            latent_dim=4, hidden_dim=32, epochs=150, batch_size=8, kl_weight=0.0, prior_path_weight=weight
        )
        model, history = train_generator(data, None, cfg, progress=False)
        assert ("prior_path" in history[-1]) == (weight > 0)
        drawn = torch.stack([model.sample(mu[t], data.prior_var[t], torch.Generator().manual_seed(t)) for t in range(8)])
        return float(((drawn - x[::4]) ** 2).mean())

    assert sample_error(1.0) < 0.8 * sample_error(0.0)
    with pytest.raises(ValueError, match="prior_path_weight"):
        GeneratorTrainingConfig(prior_path_weight=-1)


def _described_model():
    torch.manual_seed(0)
    m = CVAE(CVAEConfig(lora_dim=20, latent_dim=4, hidden_dim=16, description_dim=6))
    m.set_normalisation(torch.randn(50, 20) * 3 + 1)
    torch.nn.init.normal_(m.dec_out.weight)
    return m


def test_description_condition_changes_the_sample_and_is_required():
    """condition_on_description: c = {mu*, sigma*^2, d*}; the same prior and seed with another description
    gives another LoRA, rsample follows sample, and a missing or misshapen d* is refused by name."""
    m = _described_model()
    mu, var = torch.randn(3, 20), torch.rand(3, 20)
    d = torch.randn(3, 6)
    a = m.sample(mu, var, torch.Generator().manual_seed(1), description=d)
    assert torch.equal(a, m.sample(mu, var, torch.Generator().manual_seed(1), description=d))
    assert not torch.allclose(a, m.sample(mu, var, torch.Generator().manual_seed(1), description=d.flip(0)))
    eps = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m.rsample(mu, var, eps, d), a)
    torch.testing.assert_close(m.sample(mu[0], var[0], torch.Generator().manual_seed(1), description=d[0]), a[0])
    with pytest.raises(ValueError, match="6-d description"):
        m.sample(mu, var)
    with pytest.raises(ValueError, match="6-d description"):
        m.loss(mu, mu, var, torch.randn(3, 5))
    with pytest.raises(ValueError, match="no description"):
        _model().sample(mu, var, description=d)
    with pytest.raises(ValueError, match="description_dim"):
        CVAEConfig(lora_dim=20, description_dim=-1)


def test_without_a_description_the_layers_draw_as_before():
    """description_dim > 0 adds a layer after the others: every other initial weight stays the same."""
    torch.manual_seed(0)
    plain = CVAE(CVAEConfig(lora_dim=20, latent_dim=4, hidden_dim=16))
    torch.manual_seed(0)
    described = CVAE(CVAEConfig(lora_dim=20, latent_dim=4, hidden_dim=16, description_dim=6))
    for name, t in plain.state_dict().items():
        assert torch.equal(t, described.state_dict()[name]), name
    assert set(described.state_dict()) - set(plain.state_dict()) == {"cond_desc.weight"}


@needs_onednn
def test_packed_sampler_takes_the_description_too():
    m = _described_model()
    packed = m.packed()
    assert packed is not None
    mus, vars_, d = torch.randn(5, 20), torch.rand(5, 20), torch.randn(5, 6)
    want = m.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in range(5)], description=d)
    got = packed.sample(mus, vars_, [torch.Generator().manual_seed(s) for s in range(5)], description=d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generator_trains_on_descriptions_when_asked():
    from training.config import GeneratorTrainingConfig
    from training.generator import GeneratorData, train_generator

    g = torch.Generator().manual_seed(0)
    x, mu = torch.randn(32, 20, generator=g), torch.randn(8, 20, generator=g)
    index = torch.arange(8).repeat_interleave(4)
    data = GeneratorData(x, mu, torch.full((8, 20), 0.1), index, torch.randn(8, 6, generator=g))
    cfg = GeneratorTrainingConfig(epochs=3, hidden_dim=16, latent_dim=4, condition_on_description=True)
    model, history = train_generator(data, None, cfg, progress=False)
    assert model.config.description_dim == 6 and len(history) == 3
    moved = model.sample(mu, data.prior_var, torch.Generator().manual_seed(0), description=data.descriptions)
    other = model.sample(mu, data.prior_var, torch.Generator().manual_seed(0), description=data.descriptions.flip(0))
    assert not torch.allclose(moved, other)
    with pytest.raises(ValueError, match="description embedding"):
        train_generator(GeneratorData(x, mu, torch.full((8, 20), 0.1), index), None, cfg, progress=False)


def test_ema_decay_returns_the_moving_average_of_the_weights():
    """generator.ema_decay: the returned generator is the exponential moving average of the weights after
    each step (the first step copied), here two steps: decay * after_first + (1 - decay) * after_second."""
    from training.config import GeneratorTrainingConfig
    from training.generator import GeneratorData, train_generator

    g = torch.Generator().manual_seed(0)
    data = GeneratorData(
        torch.randn(16, 20, generator=g), torch.randn(4, 20, generator=g), torch.rand(4, 20), torch.arange(4).repeat_interleave(4)
    )
    base = GeneratorTrainingConfig(epochs=1, hidden_dim=16, latent_dim=4, batch_size=16)  # one step an epoch
    first = train_generator(data, None, base, progress=False)[0].state_dict()
    second = train_generator(data, None, dataclasses.replace(base, epochs=2), progress=False)[0].state_dict()
    averaged = train_generator(data, None, dataclasses.replace(base, epochs=2, ema_decay=0.25), progress=False)[0]
    assert not averaged.training
    for name, got in averaged.state_dict().items():
        torch.testing.assert_close(got, 0.25 * first[name] + 0.75 * second[name], msg=name)
    assert not torch.equal(first["dec_hidden.weight"], second["dec_hidden.weight"])
    with pytest.raises(ValueError, match="ema_decay"):
        GeneratorTrainingConfig(ema_decay=1.0)
