"""``AutoIterativeNormal`` as a drop-in for ``AutoNormal`` (issue 15): models without local sites, ``pyro.factor``
in the plate, guide lists on new data sizes, missing observations, frozen guides, JIT, and the encoder-only
``AutoAmortizedNormal``. Pyro's own autoguide tests run with ``benchmarks/pyro_autoguide_suite.py``."""

from __future__ import annotations

import io
import math
import warnings

import pytest

pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO, config_enumerate  # noqa: E402
from pyro.infer.autoguide import AutoGuideList, AutoNormal  # noqa: E402

from learned_inference.integrations.pyro import (  # noqa: E402
    AutoAmortizedNormal,
    AutoIterativeNormal,
    IterativeTrace_ELBO,
    IterativeTraceEnum_ELBO,
)
from tests.pyro_fixtures import SMALL, fresh_param_store  # noqa: E402, F401  (the fixture applies here)


def global_model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=x)


def local_model(x, y=None):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z + x, 0.5), obs=y)


def test_global_only_model_is_guided_like_autonormal():
    x = torch.randn(20) + 2.0
    guide = AutoIterativeNormal(global_model, **SMALL)
    svi = SVI(global_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step(x)
    assert set(guide(x)) == {"loc", "scale"}
    assert guide.median(x)["loc"] == pytest.approx(x.mean().item(), abs=0.3)
    assert guide.quantiles([0.5], x)["scale"].shape == (1,)
    assert guide.locs.loc.shape == () and guide.scales.scale.shape == ()  # AutoNormal's attributes
    assert not any(name.startswith("network") for name, _ in guide.named_parameters())


def test_plate_of_latents_without_data_is_fit_per_element_and_serializes_with_jit():
    """A plate whose latent sites see no observation has nothing to amortize over: its sites get AutoNormal's
    per-element parameters (an encoder would give every element the same posterior), so the traced guide holds
    no refinement step and saves with ``torch.jit.save``."""

    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("plate", 2):
            pyro.sample("y", dist.LogNormal(0.0, 1.0))

    guide = AutoIterativeNormal(model, **SMALL)
    guide()
    assert guide.locs.y.shape == (2,) and guide.scales.y.shape == (2,)
    assert not any(name.startswith("network") for name, _ in guide.named_parameters())
    pyro.set_rng_seed(0)
    expected = guide.call()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace_module(guide, {"call": ()}, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    pyro.set_rng_seed(0)
    for actual, value in zip(torch.jit.load(buffer).call(), expected, strict=True):
        torch.testing.assert_close(actual, value)


def test_model_without_latents_gives_an_empty_dict():
    guide = AutoIterativeNormal(lambda x: pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x), **SMALL)
    assert guide(torch.zeros(())) == {}
    assert guide.median(torch.zeros(())) == {}


def test_factor_inside_the_plate_enters_the_loss_per_datapoint():
    def model(log_factor):
        pyro.sample("z1", dist.Normal(0.0, 1.0))
        pyro.factor("f1", log_factor)
        with pyro.plate("plate", 3):
            pyro.factor("f2", log_factor)
            pyro.sample("z3", dist.Normal(0.0, 1.0))

    guide = AutoIterativeNormal(model, **SMALL)
    elbo = Trace_ELBO()
    elbo.loss(model, guide, torch.tensor(0.0))
    pyro.set_rng_seed(1)
    loss_5 = elbo.loss(model, guide, torch.tensor(5.0))
    pyro.set_rng_seed(1)
    loss_4 = elbo.loss(model, guide, torch.tensor(4.0))
    assert loss_5 - loss_4 == pytest.approx(-1 - 3)


def test_discrete_error_gives_pyro_enumeration_guidance():
    def model():
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        pyro.sample("x", dist.Bernoulli(p))

    with pytest.raises(ValueError, match=r"enumeration\.html.*hide=\['x'\]"):
        AutoIterativeNormal(model)()


def test_guide_list_on_new_data_sizes():
    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("obs", dist.Normal(z, 0.5), obs=x)

    def guide_list(create_plates):
        guide = AutoGuideList(model, create_plates=create_plates)
        guide.append(AutoNormal(poutine.block(model, expose=["loc"])))
        guide.append(AutoIterativeNormal(poutine.block(model, hide=["loc"]), **SMALL))
        return guide

    guide = guide_list(None)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), IterativeTrace_ELBO())
    svi.step(torch.randn(6))
    with pytest.raises(ValueError, match=r"plate 'data' with size 6.*50 datapoints.*create_plates"):
        svi.step(torch.randn(50))
    pyro.clear_param_store()
    guide = guide_list(lambda x: pyro.plate("data", len(x)))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), IterativeTrace_ELBO())
    assert math.isfinite(svi.step(torch.randn(6))) and math.isfinite(svi.step(torch.randn(50)))
    assert guide(torch.randn(50))["z"].shape == (50,)
    assert guide.median(torch.randn(7))["z"].shape == (7,)


def test_missing_observations_are_named():
    x, y = torch.randn(5), torch.randn(5)
    guide = AutoIterativeNormal(local_model, **SMALL)
    guide(x, y)
    assert Predictive(local_model, guide=guide, num_samples=3)(x, y)["z"].shape == (3, 5)
    with pytest.raises(ValueError, match=r"1 per datapoint when it was set up, but 0.*None"):
        Predictive(local_model, guide=guide, num_samples=3)(x)


def test_a_sequential_plate_is_named_with_the_vectorized_alternative():
    def model(x, y):
        for i in pyro.plate("groups", len(x)):
            z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
            pyro.sample(f"obs_{i}", dist.Normal(z + x[i], 0.5), obs=y[i])

    with pytest.raises(NotImplementedError, match=r"sequential pyro.plate 'groups' .* latent site 'z_0'.* Use a "
                                                  r"vectorized plate, `with pyro.plate\('groups', size\):`.*"
                                                  r"poutine.block\(model, hide="):
        AutoIterativeNormal(model, **SMALL)(torch.randn(3), torch.randn(3))


def test_a_call_that_skips_the_amortized_plate_names_the_sites_and_the_fix():
    def model(x, y, local=True):
        if local:
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                pyro.sample("obs", dist.Normal(z + x, 0.5), obs=y)

    x, y = torch.randn(5), torch.randn(5)
    guide = AutoIterativeNormal(model, **SMALL)
    guide(x, y)
    with pytest.raises(ValueError, match=r"without reaching a site inside the plate\(s\) \['data'\], where this "
                                         r"guide amortizes the local latent sites \['z'\].*svi.step.*AutoNormal"):
        guide(x, y, local=False)


def test_a_plate_without_size_is_named_with_the_fix():
    from learned_inference.integrations.pyro.guide import _plate_indices

    with pytest.raises(ValueError, match=r"plate 'data' gave no subsample indices: it has no size.*"
                                         r"pyro.plate\('data', <number of datapoints>\)"):
        _plate_indices(pyro.plate("data"))
    assert _plate_indices(pyro.plate("data", 3)).tolist() == [0, 1, 2]


def test_frozen_guide_does_not_warn():
    x, y = torch.randn(5), torch.randn(5)
    guide = AutoIterativeNormal(local_model, **SMALL)
    SVI(local_model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(x, y)
    guide.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide(x, y)
        Trace_ELBO().loss(local_model, guide, x, y)


def test_jit_trains_the_refining_guide_with_the_same_loss_and_gradients_as_without():
    x, y = torch.randn(5), torch.randn(5)
    guide = AutoIterativeNormal(local_model, **SMALL)
    svi = SVI(local_model, guide, pyro.optim.Adam({"lr": 1e-2}), JitTrace_ELBO(ignore_jit_warnings=True))
    assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
    jit, plain = JitTrace_ELBO(ignore_jit_warnings=True, num_particles=3), Trace_ELBO(num_particles=3)
    jit.loss_and_grads(local_model, guide, x, y), plain.loss(local_model, guide, x, y)  # compile; guess nesting
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    x, y = torch.randn(5), torch.randn(5)  # new data: the traced graph refines it (no values baked in)

    def loss_and_grads(elbo):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(3)
        return elbo.loss_and_grads(local_model, guide, x, y), [p.grad.clone() for p in params]

    (traced, traced_grads), (expected, expected_grads) = loss_and_grads(jit), loss_and_grads(plain)
    assert traced == pytest.approx(expected, rel=1e-5)
    for actual, wanted in zip(traced_grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)
    guide = AutoIterativeNormal(global_model, **SMALL)  # no local sites: traced as AutoNormal
    svi = SVI(global_model, guide, pyro.optim.Adam({"lr": 1e-2}), JitTrace_ELBO(ignore_jit_warnings=True))
    assert all(math.isfinite(svi.step(x)) for _ in range(3))


def test_lr_005_on_a_conjugate_model_recovers_the_exact_posterior_with_network_scale():
    def model(data):  # Pyro's test_exact_batch: posterior N(x_i / 2, 1/2) per datapoint
        with pyro.plate("data", len(data)):
            loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)

    data = torch.randn(3)
    guide = AutoIterativeNormal(model, num_steps=2, network_scale=0.1)  # default width: it collapses at 0.05
    elbo = Trace_ELBO(num_particles=10, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.1 ** (1 / 300)}), elbo)
    for _ in range(300):
        svi.step(data)
    guide.requires_grad_(False)
    with torch.no_grad():
        samples = poutine.trace(pyro.plate("particles", 4000, dim=-2)(guide)).get_trace(data).nodes["loc"]["value"]
    torch.testing.assert_close(samples.mean(0), data / 2, rtol=0.0, atol=0.1)
    torch.testing.assert_close(samples.std(0), torch.full((3,), 0.5**0.5), rtol=0.1, atol=0.0)


def test_network_scale_is_checked_and_stores_the_network_scaled():
    for bad in (0, 0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match=rf"network_scale must be a finite float > 0, got {bad}"):
            AutoIterativeNormal(local_model, network_scale=bad)
    x, y = torch.randn(5), torch.randn(5)
    pyro.set_rng_seed(0)
    scaled = AutoIterativeNormal(local_model, network_scale=0.1, **SMALL)
    scaled(x, y)
    pyro.set_rng_seed(0)
    plain = AutoIterativeNormal(local_model, **SMALL)
    plain(x, y)
    stored = dict(scaled.named_parameters())
    for name, value in plain.named_parameters():  # same network, stored ten times larger
        owner, _, leaf = name.rpartition(".")
        torch.testing.assert_close(stored[f"{owner}.parametrizations.{leaf}.original"], value / 0.1)
    pyro.set_rng_seed(1)
    expected = plain.median(x, y)["z"]
    pyro.set_rng_seed(1)
    torch.testing.assert_close(scaled.median(x, y)["z"], expected)


def test_encoder_only_guide_trains_with_jit_and_matches_the_plain_elbo():
    x, y = torch.randn(5), torch.randn(5)
    guide = AutoAmortizedNormal(local_model, hidden_size=16)
    svi = SVI(local_model, guide, pyro.optim.Adam({"lr": 1e-2}), JitTrace_ELBO(ignore_jit_warnings=True))
    assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
    pyro.set_rng_seed(2)
    traced = JitTrace_ELBO(ignore_jit_warnings=True).loss(local_model, guide, x, y)
    pyro.set_rng_seed(2)
    assert traced == pytest.approx(Trace_ELBO().loss(local_model, guide, x, y))
    assert guide.num_steps == 0 and guide.median(torch.randn(9), torch.randn(9))["z"].shape == (9,)


def test_encoder_only_guide_serializes_with_torch_jit():
    x, y = torch.randn(4), torch.randn(4)
    guide = AutoAmortizedNormal(local_model, hidden_size=16)
    guide(x, y)
    pyro.set_rng_seed(0)
    (expected,) = guide.call(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace_module(guide, {"call": (x, y)}, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    pyro.set_rng_seed(0)
    (actual,) = torch.jit.load(buffer).call(x, y)
    torch.testing.assert_close(actual, expected)


def test_encoder_only_needs_a_data_encoding():
    with pytest.raises(ValueError, match=r"num_steps=0 is the encoder-only guide.*encoding='data'"):
        AutoIterativeNormal(local_model, num_steps=0)


def test_a_plate_without_a_size_takes_the_size_of_its_sites():
    """``pyro.plate("data")`` (no size, as Pyro's cvae and ss_vae examples write it): the guide sizes its plate on
    each call's data (Pyro records the plate with size -1, which failed as torch.arange(-1))."""
    def model(x):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1), scale), obs=x)

    pyro.clear_param_store()
    guide = AutoIterativeNormal(model, num_steps=2, hidden_size=8)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    for size in (6, 9):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pyro: the guide's sized plate differs from the model's
            assert math.isfinite(svi.step(torch.randn(size)))
    assert guide.median(torch.randn(4))["z"].shape == (4, 2)


def test_the_encoder_only_guide_takes_a_data_only_encoding():
    from learned_inference.encodings import Data

    def counts_model(x):
        with pyro.plate("data", len(x)):
            rate = pyro.sample("rate", dist.LogNormal(torch.zeros(len(x), 3), 1.0).to_event(1))
            pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)

    x = torch.poisson(torch.full((5, 3), 20.0))
    guide = AutoAmortizedNormal(counts_model, encoding=Data(log1p=True), hidden_size=8)
    assert guide.median(x)["rate"].shape == (5, 3)
    with pytest.raises(ValueError, match="reads more"):
        AutoAmortizedNormal(counts_model, encoding="gradient")


def test_latents_the_model_masks_are_masked_in_the_guide_too():
    """Padding (``poutine.mask`` around local latents, as Pyro's DMM example masks its sequences): the guide masks
    those sites as the model does, so the ELBO stays a lower bound on the exact log p(x) of the unmasked data
    (before, the masked latents' entropy counted and the ELBO rose far above it)."""
    torch.manual_seed(0)
    x = torch.randn(40) * 1.5
    mask = torch.arange(40) < 20

    def model(x, mask):
        with pyro.plate("data", len(x)), poutine.mask(mask=mask):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)[mask].sum().item()
    guide = AutoIterativeNormal(model, num_steps=3, hidden_size=16)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), IterativeTrace_ELBO())
    for _ in range(300):
        svi.step(x, mask)
    elbo = -Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, x, mask)
    assert exact - 1.0 < elbo < exact + 0.1, (elbo, exact)


def test_a_long_simplex_global_site_is_drawn_on_the_simplex_in_float32():
    """A global Dirichlet over 1,024 words (Pyro's LDA example's topics): float32 stick-breaking can miss Σ = 1 by
    more than the 1e-6 Pyro's validation allows (AutoNormal itself fails on that model at its fifth step); the guide
    renormalizes such draws, keeping their log-density (the transform's Jacobian)."""
    from learned_inference.integrations.pyro.guide import _OnTheSimplex

    value = torch.full((2, 1024), 1 / 1024) * torch.tensor([[1 + 3e-6], [1.0]])
    assert not dist.Dirichlet(torch.ones(1024)).support.check(value).all()
    with poutine.trace() as tape, _OnTheSimplex(frozenset({"topics"})):
        drawn = pyro.sample("topics", dist.Delta(value, log_density=torch.tensor([0.5, 1.5]), event_dim=1))
    assert dist.Dirichlet(torch.ones(1024)).support.check(drawn).all()
    torch.testing.assert_close(drawn, value / value.sum(-1, keepdim=True))
    torch.testing.assert_close(tape.trace.nodes["topics"]["fn"].log_density, torch.tensor([0.5, 1.5]))
    with _OnTheSimplex(frozenset({"other"})):
        assert torch.equal(pyro.sample("topics", dist.Delta(value, event_dim=1)), value)

    def model(docs):
        topics = pyro.sample("topics", dist.Dirichlet(torch.full((3, 1024), 1 / 1024)).to_event(1))
        with pyro.plate("docs", docs.shape[1]):
            mix = pyro.sample("mix", dist.Dirichlet(torch.ones(3)))
            with pyro.plate("words", docs.shape[0]):
                pyro.sample("w", dist.Categorical(mix @ topics), obs=docs)

    docs = torch.randint(1024, (16, 20))
    guide = AutoIterativeNormal(model, num_steps=1, hidden_size=16)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.01}), IterativeTrace_ELBO())
    for _ in range(30):
        assert math.isfinite(svi.step(docs))
    assert guide._on_the_simplex.names == {"topics"}


def test_a_global_guide_of_the_users_choice_guides_the_global_sites_and_conditions_the_refinement():
    """``global_guide=`` builds the global sites' guide from the model restricted to them: an autoguide (AutoDelta:
    its median joins ours) or a function; every model run of the refinement sees its draw, not a prior draw."""
    from pyro.infer.autoguide import AutoDelta

    seen: list[float] = []

    def model(x):
        with pyro.plate("pair", 2):  # a global plate: a function guide creates it itself
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        seen.append(float(mu.detach().sum()))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(mu.sum(), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.randn(6)
    delta = AutoIterativeNormal(model, amortized_plates="data", global_guide=AutoDelta, **SMALL)
    delta(x)
    assert isinstance(delta.globals, AutoDelta)
    assert set(delta.median(x)) == {"mu", "z"} and "AutoDelta" in type(delta.globals).__name__

    def fixed_mu(x):
        with pyro.plate("pair", 2):
            return {"mu": pyro.sample("mu", dist.Delta(torch.tensor([2.0, 3.0])))}

    fixed = AutoIterativeNormal(model, amortized_plates="data", global_guide=lambda restricted: fixed_mu, **SMALL)
    fixed(x)  # set-up runs draw mu from the model; every later run is conditioned on the guide's draw
    seen.clear()
    trace = poutine.trace(fixed).get_trace(x)
    # the first model run only sizes the plate on the data; the refinement's runs all see the guide's draw
    assert trace.nodes["mu"]["value"].tolist() == [2.0, 3.0] and len(seen) >= 3 and set(seen[1:]) == {5.0}
    with pytest.raises(AttributeError, match="has no median: pass an autoguide that has it"):
        fixed.median(x)

    def forgets_mu(x):
        return {}

    with pytest.raises(ValueError, match=r"did not sample \['mu'\]: it must sample every latent site outside"):
        AutoIterativeNormal(model, amortized_plates="data", global_guide=lambda restricted: forgets_mu, **SMALL)(x)


def test_a_local_simplex_site_stays_off_the_boundary_so_its_gradients_stay_finite():
    """An extreme unconstrained draw puts a stick-breaking coordinate below 1e-33 in float32, where a Dirichlet with
    concentration under 1 (LDA's document topics) has an overflowing gradient and the transform's backward gives
    NaN; the guide's value keeps every coordinate at least 1e6 / float32's largest number."""
    from torch.distributions import biject_to, constraints

    from learned_inference.integrations.pyro.layout import LocalSite

    transform = biject_to(constraints.simplex)
    site = LocalSite("topics", transform, event_dim=1, constrained_event_dim=1, inner_shape=(7,),
                     init_loc=torch.zeros(7))
    u = torch.tensor([[3.0, 30, 30, 30, 30, 30, 30], [0.1, -0.2, 0.3, 0, 0, 0, 0]], requires_grad=True)
    prior = dist.Dirichlet(torch.full((8,), 0.1), validate_args=False)
    raw = transform(u)
    assert raw.min() < 1e-33
    raw_grad = torch.autograd.grad(prior.log_prob(raw).sum(), u)[0]
    assert not torch.isfinite(raw_grad).all()
    value = site.value(u)
    assert value.min() >= 1e6 / torch.finfo(torch.float32).max
    torch.testing.assert_close(value[1], raw[1])  # coordinates away from the boundary are T(u) exactly
    assert torch.isfinite(torch.autograd.grad(prior.log_prob(value).sum(), u)[0]).all()


def test_a_label_observed_in_some_calls_only_is_scored_or_summed_out_but_never_read():
    """Semi-supervised (Pyro's ss_vae_M2): the update network reads the observations present at set-up (x); a
    label observed in other calls enters the refinement's log-joint there (the posterior of z moves with it) and
    is summed out where it is enumerated."""
    def model(x, y=None):
        with pyro.plate("data", len(x)):
            label = pyro.sample("y", dist.Categorical(torch.ones(2) / 2), obs=y)
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + 4.0 * label.float(), 0.5), obs=x)

    x = torch.full((3,), 2.0)
    guide = AutoIterativeNormal(config_enumerate(model, "parallel"), num_steps=3, hidden_size=16)
    guide(x)  # set up on unlabelled data: the label is enumerated
    assert guide._features == {"x"} and guide._enumerates
    as_zero = guide.median(x, torch.zeros(3, dtype=torch.long))["z"]
    as_one = guide.median(x, torch.ones(3, dtype=torch.long))["z"]
    assert (as_zero - as_one).abs().min() > 0.05  # the observed label moves the refined z


def label_model(x, y=None):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        label = pyro.sample("y", dist.Categorical(torch.ones(2) / 2), obs=y, infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(z + 4.0 * label.float(), 0.5), obs=x)


def label_first_guide(ours, probs=None):
    """q(y) first (enumerated by TraceEnum_ELBO where unobserved), then ``ours`` for z: an AutoGuideList."""
    guide = AutoGuideList(label_model, create_plates=lambda x, y=None: pyro.plate("data", len(x)))

    def label(x, y=None):
        if y is None:
            with guide.plates["data"]:
                pyro.sample("y", dist.Categorical(torch.tensor([0.5, 0.5]) if probs is None else probs),
                            infer={"enumerate": "parallel"})

    guide.append(label)
    guide.append(ours)
    return guide


def _unconstrained_loc(trace):
    fn = trace.nodes["z_unconstrained"]["fn"]
    return getattr(fn, "base_dist", fn).loc  # a scalar site's Normal has no event dims


def test_a_label_the_guide_enumerated_before_gets_a_refinement_of_its_own():
    """q(y | x) q(z | x, y): the label drawn (enumerated in parallel) by an earlier part is conditioned on, one
    refinement per value at the enumeration's dim; each equals the refinement with that label observed."""
    ours = AutoIterativeNormal(label_model, num_steps=1, hidden_size=16)
    guide = label_first_guide(ours)
    x = torch.tensor([0.5, 2.0, 4.5])
    guide(x, torch.zeros(3, dtype=torch.long))  # set up
    pyro.set_rng_seed(1)
    enumerated = _unconstrained_loc(poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(x))
    pyro.set_rng_seed(1)  # the same refinement noise for label 0 (the first of the enumerated rows)
    observed = _unconstrained_loc(poutine.trace(guide).get_trace(x, torch.zeros(3, dtype=torch.long)))
    assert enumerated.shape == (2, 3) and observed.shape == (3,)
    torch.testing.assert_close(enumerated[0], observed)
    assert (enumerated[1] - enumerated[0]).abs().min() > 1e-3  # label 1: the model's gradient moves z elsewhere


def test_per_label_refinement_learns_each_labels_exact_posterior():
    """z ~ N(0, 1), y ~ Cat(1/2, 1/2), x ~ N(z + 4y, 0.5²): p(z | x, y) = N(4(x − 4y)/5, 1/5), per label."""
    ours = AutoIterativeNormal(label_model, num_steps=3, hidden_size=32)
    guide = label_first_guide(ours)
    svi = SVI(label_model, guide, pyro.optim.Adam({"lr": 3e-3}), IterativeTraceEnum_ELBO(max_plate_nesting=1))
    for _ in range(600):
        y = torch.randint(2, (64,))
        svi.step(torch.randn(64) + 4.0 * y + 0.5 * torch.randn(64))
    x = torch.tensor([-0.5, 1.0, 2.0, 3.0, 4.5])
    locs = _unconstrained_loc(poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(x))
    exact = 4.0 * (x - 4.0 * torch.arange(2.0)[:, None]) / 5.0
    # within 0.25 (the posterior's s.d. is 0.45); one q(z | x) for both labels would be 1.6 off on one of them
    torch.testing.assert_close(locs.detach(), exact, atol=0.25, rtol=0.0)


def test_categorical_observations_are_read_as_counts_over_their_categories():
    """LDA-style: each document (plate at dim -1) observes word ids in an inner plate (dim -2); the update network
    reads the document's counts of each of the 4 words, so the order of its words does not matter."""
    def model(words):
        with pyro.plate("documents", words.shape[1]):
            logits = pyro.sample("logits", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
            with pyro.plate("words", words.shape[0]):
                pyro.sample("w", dist.Categorical(logits=logits), obs=words)

    words = torch.tensor([[0, 3], [1, 3], [1, 2], [3, 3], [0, 1]])  # 5 words of 2 documents
    guide = AutoIterativeNormal(model, amortized_plates="documents", num_steps=2, hidden_size=16)
    guide(words)
    assert guide._data_features == 4  # counts over the 4 words, not 5 word ids
    shuffled = words[torch.tensor([3, 0, 4, 2, 1])]
    torch.testing.assert_close(guide.median(shuffled)["logits"], guide.median(words)["logits"])
    assert not torch.allclose(guide.median(words.flip(1))["logits"], guide.median(words)["logits"])


@pytest.mark.parametrize("family", ["diagonal_gaussian", "low_rank"])
def test_a_replayed_guide_scores_its_draw_under_the_posterior_it_was_drawn_from(monkeypatch, family):
    """TraceEnum_ELBO's sequential enumeration of a site after ours re-runs the guide once per value, replaying
    the earlier draws: the refinement is random (its noise), so λ_T must be replayed with the draw, or the draw is
    scored under another posterior and the estimate is biased up (Pyro's scanvi example diverged so). A replayed
    run does not refine again (so reports no training surrogate)."""
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            pyro.sample("y", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    ours = AutoIterativeNormal(poutine.block(model, hide=["y"]), num_steps=3, hidden_size=16, family=family)

    def guide(x):
        ours(x)
        with ours.plates["data"]:
            pyro.sample("y", dist.Bernoulli(0.5), infer={"enumerate": "sequential"})

    def loc(trace):
        fn = trace.nodes["z_unconstrained" if family == "diagonal_gaussian" else "_AutoIterativeNormal_latent"]["fn"]
        return getattr(fn, "base_dist", fn).loc

    x = 2.0 * torch.randn(20, 3)
    first = poutine.trace(guide).get_trace(x)
    again = poutine.trace(poutine.replay(guide, trace=first)).get_trace(x)
    assert loc(first).shape == (20, 3)
    torch.testing.assert_close(loc(again), loc(first), rtol=0.0, atol=0.0)
    reports = []
    monkeypatch.setattr("learned_inference.integrations.pyro.guide.record_refinement_loss",
                        lambda loss, name: reports.append(name))
    IterativeTraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False).differentiable_loss(model, guide, x)
    assert len(reports) == 1  # the first run's (cut at y), not the two replays'


def test_a_replay_of_another_calls_trace_refines_anew():
    """Replaying a trace of other data (or one recorded without gradients) must not hand this call that call's
    posterior: the guide refines again, as Pyro's autoguides recompute their distributions under a replay."""
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    guide = AutoIterativeNormal(model, num_steps=2, hidden_size=8)
    xa, xb = torch.tensor([-3.0, 0.0, 3.0]), torch.tensor([5.0, 5.0, 5.0])
    guide(xa)  # set up
    of_a = poutine.trace(guide).get_trace(xa)
    on_b = poutine.trace(poutine.replay(guide, trace=of_a)).get_trace(xb)
    loc_of = {trace: trace.nodes["z_unconstrained"]["fn"].loc for trace in (of_a, on_b)}
    assert "_AutoIterativeNormal_loc" not in on_b.nodes  # its λ_T is not the replayed one
    assert not torch.allclose(loc_of[on_b], loc_of[of_a])
    with torch.no_grad():
        recorded = poutine.trace(guide).get_trace(xa)
    replayed = poutine.trace(poutine.replay(guide, trace=recorded)).get_trace(xa)
    assert replayed.nodes["z_unconstrained"]["fn"].loc.requires_grad  # refined again, with gradients


@pytest.mark.parametrize("words_dim", [-2, -1])
def test_padded_categorical_observations_count_only_their_words(words_dim):
    """Documents padded to one length (masked word ids, ``.mask()``), with the words' plate left (LDA's -2) or
    right of the documents' plate: the update network reads each document's counts of its real words; vectorized
    particles keep their own dim."""
    documents_dim = -1 if words_dim == -2 else -2

    def model(words, lengths):
        with pyro.plate("documents", words.shape[1], dim=documents_dim):
            logits = pyro.sample("logits", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
            real = torch.arange(words.shape[0])[:, None] < lengths  # [words, documents]
            with pyro.plate("words", words.shape[0], dim=words_dim):
                observed = words.T if words_dim == -1 else words  # [documents, words] when words are at -1
                real = real.T if words_dim == -1 else real
                pyro.sample("w", dist.Categorical(logits=logits).mask(real), obs=observed)

    guide = AutoIterativeNormal(model, amortized_plates="documents", num_steps=2, hidden_size=16)
    words, lengths = torch.tensor([[0, 3], [1, 3], [1, 2], [3, 0], [0, 0]]), torch.tensor([5, 3])
    guide(words, lengths)
    assert guide._data_features == 4
    padded_otherwise = words.clone()
    padded_otherwise[3:, 1] = 2  # the second document's padding, other ids: not read
    torch.testing.assert_close(guide.median(padded_otherwise, lengths)["logits"],
                               guide.median(words, lengths)["logits"])
    elbo = IterativeTrace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    assert torch.isfinite(elbo.differentiable_loss(model, guide, words, lengths))


@pytest.mark.parametrize("family", ["diagonal_gaussian", "low_rank"])
def test_an_amortized_plate_left_of_an_inner_plate_gets_its_shapes(family):
    """The plate of datapoints at dim -2, a plate inside each datapoint at -1: both families sample each local site
    with the model's shape (the low-rank draw of every local site at once keeps the inner plate's dim)."""
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(1))
            with pyro.plate("inner", x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)

    guide = AutoIterativeNormal(model, num_steps=2, hidden_size=8, family=family)
    x = torch.randn(5, 4)
    assert guide(x)["z"].shape == (5, 1, 2)
    assert math.isfinite(Trace_ELBO().loss(model, guide, x))


def test_observations_inside_an_inner_plate_left_of_the_datapoints_keep_the_particles_dim():
    """LDA's layout (words at dim -2, documents at -1) with a real-valued observation, under vectorized particles
    (their plate at dim -3): each document reads its words' values, and the particles keep their own dim."""
    def model(obs):
        with pyro.plate("documents", obs.shape[1], dim=-1):
            m = pyro.sample("m", dist.Normal(0.0, 1.0))
            with pyro.plate("words", obs.shape[0], dim=-2):
                pyro.sample("w", dist.Normal(m, 1.0), obs=obs)

    guide = AutoIterativeNormal(model, amortized_plates="documents", num_steps=2, hidden_size=8)
    obs = torch.randn(5, 2)
    guide(obs)
    assert guide._data_features == 5
    elbo = IterativeTrace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    assert torch.isfinite(elbo.differentiable_loss(model, guide, obs))
