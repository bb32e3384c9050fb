"""Pyro's own examples with their hand-written guides swapped for ``AutoIterativeNormal`` (issue 26).

Each example's model, networks and training loop come from a Pyro checkout outside this repository
(``--pyro-examples``, default ``$PYRO_EXAMPLES`` or ``/work/pyro_checkout/examples``), imported from its files;
only the guide is replaced (and the data loading, since nothing can be downloaded here). Every example is trained
three times from the same seed, for the same epochs, with the example's own optimizer and hyperparameters:

* ``own``: the example's hand-written guide and ELBO, as in its ``main``;
* ``iterative``: :class:`AutoIterativeNormal` (T = ``num_steps`` refinement steps, 256 hidden units), trained with
  ``IterativeTrace_ELBO`` where the example trains with ``Trace_ELBO`` and with the example's ``TraceEnum_ELBO``
  where it enumerates (there is no iterative ``TraceEnum_ELBO``: the update network then learns from the final step
  only);
* ``amortized``: :class:`AutoAmortizedNormal` (the encoder-only variant, same width) in the same place.

Our guides keep the example's optimizer and learning rate; the update network's parameters are stored with
``network_scale = min(1, 0.005 / lr)`` (docs/pyro.md, "Learning rates": 1.0 at the neural-network rates of every
example here except LDA's 0.01, where it is 0.5).

The guide swaps (``-`` the example, ``+`` here; ``ours`` is either of our guides)::

    vae/vae.py      - svi = SVI(vae.model, vae.guide, optimizer, loss=elbo)
                    + svi = SVI(vae.model, AutoIterativeNormal(vae.model), optimizer, loss=IterativeTrace_ELBO())
    cvae/cvae.py    - svi = SVI(cvae_net.model, cvae_net.guide, optimizer, loss=Trace_ELBO())
                    + ours = AutoIterativeNormal(cvae_net.model, create_plates=lambda xs, ys=None:
                    +                            pyro.plate("data", xs.shape[0]))
                    + svi = SVI(cvae_net.model, ours, optimizer, loss=IterativeTrace_ELBO())
    lda.py          - guide = functools.partial(parametrized_guide, predictor)
                    + guide = AutoIterativeNormal(model, amortized_plates="documents", network_scale=0.5,
                    +     global_guide=lambda restricted: dirichlet_topics,   # Gamma / Dirichlet, as the example
                    +     create_plates=lambda data, args, batch_size=None: pyro.plate("documents", args.num_docs,
                    +                                                                  batch_size))
                    - elbo = TraceEnum_ELBO(max_plate_nesting=2)
                    + elbo = IterativeTraceEnum_ELBO(max_plate_nesting=2)
    vae/ss_vae_M2   - guide = config_enumerate(ss_vae.guide, args.enum_discrete, expand=True)
                    + model = config_enumerate(ss_vae.model, "parallel", expand=True)
                    + guide = AutoGuideList(model, create_plates=lambda xs, ys=None: pyro.plate("data", xs.shape[0]))
                    + def label(xs, ys=None):          # q(y | x): the example's encoder_y, enumerated, drawn first
                    +     if ys is None:
                    +         with guide.plates["data"]:
                    +             pyro.sample("y", dist.OneHotCategorical(ss_vae.encoder_y(xs)),
                    +                         infer={"enumerate": "parallel", "expand": True})
                    + guide.append(label)
                    + guide.append(ours)                # q(z | x, y): one refinement per label value
                    - elbo = Elbo(max_plate_nesting=1, strict_enumeration_warning=False)
                    + elbo = IterativeTraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    scanvi.py       - guide = config_enumerate(scanvi.guide, "parallel", expand=True)
                    + ours = AutoIterativeNormal(poutine.block(scanvi.model, hide=["y"]))
                    + def guide(x, y=None):              # q(z1, z2, l | x) ours, q(y | z2) the example's classifier
                    +     z2 = ours(x, y)["z2"]
                    +     pyro.module("scanvi", scanvi)
                    +     with ours.plates["batch"], poutine.scale(scale=scanvi.scale_factor):
                    +         y_dist = dist.OneHotCategorical(logits=scanvi.classifier(z2))
                    +         if y is None:               # sequential: the model's torch.cat does not broadcast
                    +             pyro.sample("y", y_dist, infer={"enumerate": "sequential", "expand": True})
                    +         else:                       # the example's classification term, as in its guide
                    +             pyro.factor("classification_loss", -scanvi.alpha * y_dist.log_prob(y),
                    +                         has_rsample=False)
    dmm.py          - svi = SVI(dmm.model, dmm.guide, adam, loss=elbo)
                    + ours = AutoIterativeNormal(dmm.model)
                    + def guide(batch, reversed_batch, mask, lengths, annealing_factor=1.0):
                    +     # the example anneals its guide's z_t too (our refinement sees the unannealed model)
                    +     return poutine.scale(ours, scale=annealing_factor)(batch, reversed_batch, mask, lengths)
                    + svi = SVI(dmm.model, guide, adam, loss=IterativeTrace_ELBO())

Data (no downloads): vae, cvae and ss_vae_M2 read ``mnist.npz`` (grey levels / 255, as the examples' loaders
give; cvae masks quadrants with -1 as its ``MaskImages`` does, here re-implemented on tensors); lda generates its
documents from its own model as its ``main`` does (held-out documents from the same draw of the topics); scanvi's
PBMC download is replaced by synthetic counts of the same structure (cells x genes, four cell types with marker
genes, negative-binomial counts with dropout, 50 labelled cells per type as its seed labels); dmm's JSB chorales by
synthetic polyphonic piano rolls (88 keys, four voices on random walks, every sequence of one length, so every mask
is all ones: see docs/pyro.md for why variable lengths are not served). Optional dependencies of the examples'
plotting and download helpers that are not installed (torchvision, visdom) are replaced by empty stand-ins; the
code that uses them is never called.

Held-out ELBO, per datapoint, with the same estimator for every guide: ``particles`` independent draws of the
guide's continuous latents, discrete guide sites (ss_vae's and scanvi's label) summed exactly over their values,
the example's model and guide frozen (eval mode, no updates); per-datapoint values are paired over the same test
data and differences given with their standard errors (s.d. / sqrt(n)). LDA's ELBO is Pyro's
``TraceEnum_ELBO(num_particles=particles)`` on all held-out documents, divided by their number; its own guide is a
point mass on each document's topic proportions, so its value bounds log p(x, θ̂) rather than log p(x).
scanvi is run with ``scale_factor=1.0`` (the example normalises its loss by 1 / (batch x genes); Adam does not
see a constant factor), so its ELBO is in nats per cell. Training seconds per epoch exclude evaluation; test-time
seconds per datapoint time one call of the guide on the held-out set (no gradient). The reductions of each
example (data, epochs) are recorded in ``settings`` and the Markdown.

Usage::

    python benchmarks/pyro_examples.py --scale smoke --out /tmp/bench     # functional test (about a minute)
    python benchmarks/pyro_examples.py --threads 1                         # full: writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import math
import os
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoGuideList
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import constraints

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from learned_inference.data import find_data_file
from learned_inference.encodings import DEFAULT_ENCODING, Data
from learned_inference.integrations.pyro import (
    AutoAmortizedNormal,
    AutoIterativeNormal,
    IterativeTrace_ELBO,
    IterativeTraceEnum_ELBO,
)

NAME = "pyro_examples"
EXAMPLES = ("vae", "cvae", "lda", "scanvi", "ss_vae_M2", "dmm")
KINDS = ("own", "iterative", "amortized")
DEFAULT_CHECKOUT = Path(os.environ.get("PYRO_EXAMPLES", "/work/pyro_checkout/examples"))
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "common": {"particles": 2, "num_steps": 2, "hidden_size": 32},
        "vae": {"num_train": 128, "num_test": 16, "epochs": 1},
        "cvae": {"num_train": 128, "num_test": 16, "epochs": 1, "num_quadrant_inputs": 1},
        "lda": {"num_docs": 64, "num_test": 16, "epochs": 1, "num_words": 64, "num_words_per_doc": 16},
        "scanvi": {"num_train": 120, "num_test": 16, "epochs": 1, "num_genes": 20, "labelled_per_type": 5},
        "ss_vae_M2": {"num_train": 400, "num_test": 16, "epochs": 1, "sup_num": 200},
        "dmm": {"num_train": 20, "num_test": 8, "epochs": 1, "length": 4},
    },
    "full": {
        "common": {"particles": 10, "num_steps": 5, "hidden_size": 256},
        "vae": {"num_train": 5000, "num_test": 500, "epochs": 5},
        "cvae": {"num_train": 5000, "num_test": 500, "epochs": 5, "num_quadrant_inputs": 1},
        "lda": {"num_docs": 1000, "num_test": 200, "epochs": 32, "num_words": 1024, "num_words_per_doc": 64},
        "scanvi": {"num_train": 1000, "num_test": 300, "epochs": 10, "num_genes": 100, "labelled_per_type": 50},
        "ss_vae_M2": {"num_train": 6000, "num_test": 500, "epochs": 5, "sup_num": 400},
        "dmm": {"num_train": 200, "num_test": 100, "epochs": 10, "length": 16},
    },
}
#: what each example runs at instead of its defaults (formatted with the scale's settings)
REDUCTIONS = {
    "vae": "first {num_train} MNIST training images (the example: 60,000), {epochs} epochs (101), first {num_test} "
           "test images; batch 256 and Adam 1e-3 as the example",
    "cvae": "{num_quadrant_inputs} quadrant as input (the example runs 1, 2 and 3); first {num_train} MNIST training "
            "images (60,000), {epochs} epochs without early stopping (up to 101 with patience 3) for the baseline "
            "network and for each CVAE; first {num_test} test images; batch 128 and Adam 1e-3 as the example",
    "lda": "the example's defaults ({num_docs} documents of {num_words_per_doc} words over {num_words} words, 8 "
           "topics, ClippedAdam 0.01, batch 32) except {epochs} epochs of num_docs / 32 steps (the example: 1,000 "
           "steps); {num_test} held-out documents drawn with the same topics",
    "scanvi": "synthetic counts instead of PBMC: {num_train} training cells (the example: about 20,000), "
              "{num_genes} genes, 4 types, {labelled_per_type} labelled cells per type; {epochs} epochs (60) with the "
              "learning-rate drop (x0.2) after a third of them (epoch 20 of 60); {num_test} held-out unlabelled cells; "
              "batch 100 and Adam 0.005 as the example; scale_factor 1 (see above)",
    "ss_vae_M2": "first {num_train} MNIST training images (50,000) of which {sup_num} labelled (3,000), {epochs} "
                 "epochs (50), {num_test} test images (unlabelled); batch 200, Adam 4.2e-4 and no auxiliary loss as "
                 "the example's defaults",
    "dmm": "synthetic piano rolls instead of JSB chorales: {num_train} training and {num_test} test sequences of "
           "{length} steps (JSB: 229 and 77 of up to 160), {epochs} epochs (5,000) with KL annealing over the first "
           "fifth (1,000 of 5,000); mini-batch 20 and ClippedAdam (3e-4, betas 0.96/0.999, clip 10, decay 0.99996, "
           "weight decay 2) as the example",
}
#: why an example (or one of its guides) is not served, where a run fails or its number is not comparable
EXPLANATIONS = {
    "lda": "Our guide refines doc_topics (the words' plate at dim -2, left of the documents' at -1, counted inside "
           "each document; word_topics left unguided and summed out of the refinement by enumeration; "
           "IterativeTraceEnum_ELBO), and reads each document as its counts of each word (a categorical observation "
           "read one-hot, summed over the words' plate); the global topics get their conjugate Gamma and Dirichlet "
           "guide through global_guide= (the internal AutoNormal in stick-breaking coordinates does not fit the "
           "1,024-word Dirichlet topics: Pyro's own AutoNormal stops at its fifth step on this model). The example's"
           " own guide is a point mass (Delta) on doc_topics: its ELBO bounds log p(x, doc_topics) at that point, "
           "not log p(x), so the comparison favours it.",
    "scanvi": "Our guide refines z1, z2 and l; the example's classifier q(y | z2) follows it, enumerated "
              "sequentially (the model's torch.cat does not broadcast), so TraceEnum_ELBO re-runs the guide once "
              "per cell type and replays our draws with the posterior they were drawn from (before that replay "
              "was fixed, each re-run refined anew and scored the draw under another posterior: the estimate "
              "turned positive in the first epoch and training diverged). The example's own guide is far from "
              "trained at this scale: its q(l | x) ends in a BatchNorm layer whose shift must reach about 6.8 at "
              "Adam 0.005 then 0.001 in 100 steps (the example takes 12,000), so its ELBO falls over the epochs; "
              "the differences to it mostly measure that, not a better posterior.",
    "ss_vae_M2": "Ours guides z, after the example's q(y | x) (encoder_y) in an AutoGuideList: where the label "
                 "is unobserved, the guide enumerates it first and ours refines z once per label value, "
                 "q(z | x, y) as the example's guide; where it is observed, the refinement scores it. The update "
                 "network reads x only (the sites observed at set-up); the label enters through the model's "
                 "gradient.",
    "dmm": "At the example's learning rate 3e-4 (with weight decay 2 on every parameter, ours included) and 100 "
           "steps, the update network over 16 x 100 latent dimensions is behind the example's RNN guide; the "
           "sequences have one length because ours ignores the masks of padded steps (docs/pyro.md).",
}
MNIST_SIDE = 28


# -- loading the examples ------------------------------------------------------------------------------------------


def _stand_in(name: str, **attrs: Any) -> types.ModuleType:
    """An empty module ``name`` whose missing attributes are functions that raise when called (never called here)."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)

    def missing(attr: str) -> Callable[..., Any]:
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{name}.{attr} is a stand-in: {name} is not installed")

        return unavailable

    module.__getattr__ = missing  # type: ignore[method-assign]
    sys.modules[name] = module
    return module


def _install_stand_ins() -> None:
    """Stand-ins for the examples' optional plotting and download dependencies, where they are not installed."""
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        vision = _stand_in("torchvision")
        vision.datasets = _stand_in("torchvision.datasets", MNIST=type("MNIST", (), {}))  # type: ignore[attr-defined]
        vision.transforms = _stand_in("torchvision.transforms")  # type: ignore[attr-defined]
        vision.utils = _stand_in("torchvision.utils")  # type: ignore[attr-defined]
    if "visdom" not in sys.modules and importlib.util.find_spec("visdom") is None:
        _stand_in("visdom")


def load_example(checkout: Path, relative: str) -> types.ModuleType:
    """Imports ``checkout/relative`` as module ``pyro_example_<stem>`` (its folder on ``sys.path`` for its imports).

    Raises:
        FileNotFoundError: when the file is not in the checkout.
    """
    path = checkout / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --pyro-examples <pyro checkout>/examples")
    _install_stand_ins()
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"pyro_example_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- held-out ELBO per datapoint -----------------------------------------------------------------------------------


def _per_datapoint(trace: Any, plate: str, size: int, *, guide: bool) -> Tensor:
    """Σ over a trace's sample sites of log-density, per element of ``plate`` (sites outside it shared equally).

    In a guide trace, observed sites (conditioned discrete values, factors) are left out."""
    total = torch.zeros(size)
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site) or (guide and site["is_observed"]):
            continue
        log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        log_prob = torch.as_tensor(scale_and_mask(log_prob, site["scale"], site["mask"]))
        dims = [frame.dim for frame in site["cond_indep_stack"] if frame.name == plate]
        if not dims or log_prob.dim() < -dims[0] or log_prob.shape[dims[0]] != size:
            total = total + log_prob.sum() / size
            continue
        keep = log_prob.dim() + dims[0]
        others = [d for d in range(log_prob.dim()) if d != keep]
        total = total + (log_prob.sum(others) if others else log_prob)  # sum([]) would sum every dim
    return total


def _branch(model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict, plate: str,
            size: int, condition: dict[str, Tensor]) -> Tensor:
    """log p − log q per datapoint for one draw from the guide, with ``condition`` fixed in guide and model."""
    guide_trace = poutine.trace(poutine.condition(guide, data=condition)).get_trace(*args, **kwargs)
    model_trace = poutine.trace(
        poutine.replay(poutine.condition(model, data=condition), trace=guide_trace)
    ).get_trace(*args, **kwargs)
    return _per_datapoint(model_trace, plate, size, guide=False) - _per_datapoint(guide_trace, plate, size, guide=True)


@torch.no_grad()
def held_out_elbo(model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict, *, plate: str,
                  size: int, particles: int, discrete: tuple[str, int] | None = None) -> Tensor:
    """Per-datapoint ELBO ``[size]``: ``particles`` draws of the guide; a discrete guide site ``discrete = (name,
    classes)`` (one-hot) is summed over its values exactly, Σ_k q(k) (log p − log q | k) − Σ_k q(k) log q(k)."""
    total = torch.zeros(size)
    for _ in range(particles):
        if discrete is None:
            total += _branch(model, guide, args, kwargs, plate, size, {})
            continue
        name, classes = discrete
        for k in range(classes):
            value = torch.nn.functional.one_hot(torch.full((size,), k), classes).float()
            # q(k) in the same guide run as the continuous draws it is paired with
            guide_trace = poutine.trace(poutine.condition(guide, data={name: value})).get_trace(*args, **kwargs)
            node = guide_trace.nodes[name]
            log_q = node["fn"].log_prob(node["value"])
            model_trace = poutine.trace(
                poutine.replay(poutine.condition(model, data={name: value}), trace=guide_trace)
            ).get_trace(*args, **kwargs)
            term = _per_datapoint(model_trace, plate, size, guide=False) - _per_datapoint(
                guide_trace, plate, size, guide=True)
            total += log_q.exp() * (term - log_q)
    return total / particles


# -- the runs ------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One guide on one example: its SVI, its epochs, and how to evaluate it."""

    model: Callable[..., Any]
    guide: Callable[..., Any]
    svi: SVI
    epoch: Callable[[SVI, int], None]
    modules: list[torch.nn.Module]
    test_args: tuple
    test_kwargs: dict = field(default_factory=dict)
    plate: str = "data"
    discrete: tuple[str, int] | None = None


@dataclass
class Context:
    """What every example's builder needs."""

    checkout: Path
    settings: dict[str, Any]
    particles: int
    num_steps: int
    hidden_size: int
    seed: int
    data_path: str | None


def _ours(kind: str, model: Callable[..., Any], ctx: Context, lr: float, *, counts: bool = False,
          **options: Any) -> AutoIterativeNormal:
    """Our guide of ``kind`` (iterative or amortized); ``counts``: the network reads log(1 + x) (count data)."""
    scale = min(1.0, 0.005 / lr)
    if kind == "iterative":
        encoding = ("gradient", Data(log1p=True), "params") if counts else DEFAULT_ENCODING
        return AutoIterativeNormal(model, num_steps=ctx.num_steps, hidden_size=ctx.hidden_size, network_scale=scale,
                                   encoding=encoding, **options)
    if counts:  # AutoAmortizedNormal is this guide with encoding "data"; with log(1 + x) it is spelled out
        return AutoIterativeNormal(model, num_steps=0, encoding=Data(log1p=True), hidden_size=ctx.hidden_size,
                                   network_scale=scale, **options)
    return AutoAmortizedNormal(model, hidden_size=ctx.hidden_size, network_scale=scale, **options)


def _trace_elbo(kind: str) -> Trace_ELBO:
    return IterativeTrace_ELBO() if kind == "iterative" else Trace_ELBO()


def _mnist(ctx: Context) -> dict[str, np.ndarray]:
    return dict(np.load(find_data_file("mnist.npz", ctx.data_path)))


def _batches(n: int, size: int, generator: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=generator).split(size))


def build_vae(kind: str, ctx: Context) -> Run:
    s = ctx.settings
    example = load_example(ctx.checkout, "vae/vae.py")
    data = _mnist(ctx)
    x = torch.from_numpy(data["x_train"][: s["num_train"]]).float().div(255).reshape(-1, 784)
    x_test = torch.from_numpy(data["x_test"][: s["num_test"]]).float().div(255).reshape(-1, 784)
    vae = example.VAE()
    guide = vae.guide if kind == "own" else _ours(kind, vae.model, ctx, 1e-3)
    svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": 1e-3}), _trace_elbo(kind))

    def epoch(svi: SVI, number: int) -> None:
        for idx in _batches(len(x), 256, torch.Generator().manual_seed(ctx.seed + number)):
            svi.step(x[idx])

    return Run(vae.model, guide, svi, epoch, [vae], (x_test,))


def _quadrants(images: Tensor, num_inputs: int) -> tuple[Tensor, Tensor]:
    """cvae's inputs and targets: the target keeps the quadrants that are not inputs, -1 elsewhere (and vice versa)
    (bottom-left is always a target; with 2 inputs the left half is, with 3 the top half too)."""
    half = MNIST_SIDE // 2
    target = images.clone()
    target[:, half:, :half] = -1
    if num_inputs == 2:
        target[:, :, :half] = -1
    if num_inputs == 3:
        target[:, :half, :] = -1
    inputs = images.clone()
    inputs[target != -1] = -1
    return inputs, target


def build_cvae(kind: str, ctx: Context) -> Run:
    s = ctx.settings
    cvae = load_example(ctx.checkout, "cvae/cvae.py")
    baseline = load_example(ctx.checkout, "cvae/baseline.py")
    data = _mnist(ctx)
    images = torch.from_numpy(data["x_train"][: s["num_train"]]).float().div(255)
    test_images = torch.from_numpy(data["x_test"][: s["num_test"]]).float().div(255)
    inputs, targets = _quadrants(images, s["num_quadrant_inputs"])
    test_inputs, test_targets = _quadrants(test_images, s["num_quadrant_inputs"])
    # the baseline network, trained as the example's baseline.train does (masked BCE, Adam 1e-3), same epochs
    net = baseline.BaselineNet(500, 500)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    criterion = baseline.MaskedBCELoss()
    for number in range(s["epochs"]):
        for idx in _batches(len(inputs), 128, torch.Generator().manual_seed(ctx.seed + 1000 + number)):
            optimizer.zero_grad()
            loss = criterion(net(inputs[idx]), targets[idx]) / len(idx)
            loss.backward()
            optimizer.step()
    net.eval()
    cvae_net = cvae.CVAE(200, 500, 500, net)
    if kind == "own":
        guide = cvae_net.guide
    else:
        guide = _ours(kind, cvae_net.model, ctx, 1e-3,
                      create_plates=lambda xs, ys=None: pyro.plate("data", xs.shape[0]))
    svi = SVI(cvae_net.model, guide, pyro.optim.Adam({"lr": 1e-3}), _trace_elbo(kind))

    def epoch(svi: SVI, number: int) -> None:
        for idx in _batches(len(inputs), 128, torch.Generator().manual_seed(ctx.seed + number)):
            svi.step(inputs[idx], targets[idx])

    return Run(cvae_net.model, guide, svi, epoch, [cvae_net], (test_inputs, test_targets))


def dirichlet_topics(data: Tensor | None = None, args: Any = None, batch_size: int | None = None) -> None:
    """LDA's global sites under their conjugate families, Gamma topic weights and Dirichlet topics (concentrations
    kept above 0.5, as the example's guide keeps them): the guide of the sites our guide leaves global."""
    with pyro.plate("topics", args.num_topics):
        rate = pyro.param("topic_weights_concentration", lambda: torch.ones(args.num_topics),
                          constraint=constraints.positive)
        pyro.sample("topic_weights", dist.Gamma(rate, 1.0))
        concentration = pyro.param("topic_words_concentration", lambda: torch.ones(args.num_topics, args.num_words),
                                   constraint=constraints.greater_than(0.5))
        pyro.sample("topic_words", dist.Dirichlet(concentration))


def build_lda(kind: str, ctx: Context) -> Run:
    s = ctx.settings
    example = load_example(ctx.checkout, "lda.py")
    logging.getLogger().setLevel(logging.WARNING)  # the example logs every step at INFO
    args = argparse.Namespace(num_topics=8, num_words=s["num_words"], num_docs=s["num_docs"] + s["num_test"],
                              num_words_per_doc=s["num_words_per_doc"], layer_sizes="100-100", learning_rate=0.01,
                              batch_size=32)
    pyro.set_rng_seed(0)  # the example's main: data from the model, seed 0
    _, _, data = example.model(args=args)
    pyro.set_rng_seed(ctx.seed)
    train_args = argparse.Namespace(**{**vars(args), "num_docs": s["num_docs"]})
    test_args = argparse.Namespace(**{**vars(args), "num_docs": s["num_test"]})
    train, test = data[:, : s["num_docs"]], data[:, s["num_docs"]:]
    if kind == "own":
        predictor = example.make_predictor(args)
        guide = functools.partial(example.parametrized_guide, predictor)
        modules = [predictor]
    else:
        guide = _ours(kind, example.model, ctx, 0.01, counts=True, amortized_plates="documents",
                      global_guide=lambda restricted: dirichlet_topics,
                      create_plates=lambda data=None, args=None, batch_size=None: pyro.plate(
                          "documents", args.num_docs, batch_size))
        modules = []
    elbo = (IterativeTraceEnum_ELBO if kind == "iterative" else TraceEnum_ELBO)(max_plate_nesting=2)
    svi = SVI(example.model, guide, pyro.optim.ClippedAdam({"lr": 0.01}), elbo)

    def epoch(svi: SVI, number: int) -> None:
        for _ in range(math.ceil(s["num_docs"] / 32)):  # the example subsamples 32 documents per step
            svi.step(train, args=train_args, batch_size=32)

    return Run(example.model, guide, svi, epoch, modules, (test,), {"args": test_args}, plate="documents")


def synthetic_counts(num_cells: int, num_genes: int, *, labelled_per_type: int, seed: int,
                     num_types: int = 4) -> tuple[Tensor, Tensor]:
    """Synthetic single-cell counts with scanvi's PBMC structure: (counts ``[cells, genes]``, labels, -1 unlabelled).

    Each of ``num_types`` cell types has a Dirichlet expression profile with a few up-regulated marker genes; a
    cell's counts are negative-binomial (inverse dispersion 5) around its library size (log-normal, median 1,000)
    times its type's profile, with 10% of the entries dropped to zero; the first ``labelled_per_type`` cells of each
    type keep their label (the example's seed labels: 50 per type)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.distributions.Dirichlet(torch.full((num_genes,), 0.5)).sample()
    profiles = []
    for _ in range(num_types):
        up = torch.ones(num_genes)
        up[torch.randperm(num_genes, generator=generator)[: max(2, num_genes // 10)]] = 6.0
        profile = base * up * torch.exp(0.3 * torch.randn(num_genes, generator=generator))
        profiles.append(profile / profile.sum())
    types_ = torch.randint(num_types, (num_cells,), generator=generator)
    library = torch.exp(math.log(1000.0) + 0.3 * torch.randn(num_cells, generator=generator))
    mean = library[:, None] * torch.stack(profiles)[types_]
    rate = torch._standard_gamma(torch.full_like(mean, 5.0), generator=generator) * mean / 5.0
    counts = torch.poisson(rate, generator=generator)
    counts[torch.rand(counts.shape, generator=generator) < 0.1] = 0.0
    labels = torch.full((num_cells,), -1)
    for k in range(num_types):
        labels[torch.nonzero(types_ == k).flatten()[:labelled_per_type]] = k
    return counts, labels


def build_scanvi(kind: str, ctx: Context) -> Run:
    from pyro.contrib.examples.scanvi_data import BatchDataLoader

    s = ctx.settings
    example = load_example(ctx.checkout, "scanvi/scanvi.py")
    counts, labels = synthetic_counts(s["num_train"] + s["num_test"], s["num_genes"],
                                      labelled_per_type=s["labelled_per_type"], seed=ctx.seed)
    labels[s["num_train"]:] = -1
    x, y = counts[: s["num_train"]], labels[: s["num_train"]]
    log_counts = x.sum(-1).log()
    scanvi = example.SCANVI(num_genes=s["num_genes"], num_labels=4, l_loc=log_counts.mean().item(),
                            l_scale=log_counts.std().item(), scale_factor=1.0)
    loader = BatchDataLoader(x, y, 100)
    scheduler = pyro.optim.MultiStepLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.005},
                                        "milestones": [max(1, round(s["epochs"] / 3))], "gamma": 0.2})
    elbo = TraceEnum_ELBO(strict_enumeration_warning=False)
    if kind == "own":
        guide = config_enumerate(scanvi.guide, "parallel", expand=True)
        eval_guide = scanvi.guide
    else:
        ours = _ours(kind, poutine.block(scanvi.model, hide=["y"]), ctx, 0.005, counts=True)

        def guide(x: Tensor, y: Tensor | None = None) -> None:
            z2 = ours(x, y)["z2"]
            pyro.module("scanvi", scanvi)
            with ours.plates["batch"], poutine.scale(scale=scanvi.scale_factor):
                y_dist = dist.OneHotCategorical(logits=scanvi.classifier(z2))
                if y is None:
                    pyro.sample("y", y_dist, infer={"enumerate": "sequential", "expand": True})
                else:
                    pyro.factor("classification_loss", -scanvi.alpha * y_dist.log_prob(y), has_rsample=False)

        eval_guide = guide
    svi = SVI(scanvi.model, guide, scheduler, elbo)

    def epoch(svi: SVI, number: int) -> None:
        torch.manual_seed(ctx.seed + number)  # the loader shuffles with the global generator
        for batch_x, batch_y in loader:
            svi.step(batch_x, None if batch_y is None else batch_y.type_as(batch_x))
        scheduler.step()

    return Run(scanvi.model, eval_guide, svi, epoch, [scanvi], (counts[s["num_train"]:],), plate="batch",
               discrete=("y", 4))


def build_ss_vae(kind: str, ctx: Context) -> Run:
    s = ctx.settings
    example = load_example(ctx.checkout, "vae/ss_vae_M2.py")
    data = _mnist(ctx)
    x = torch.from_numpy(data["x_train"][: s["num_train"]]).float().div(255).reshape(-1, 784)
    labels = torch.from_numpy(data["y_train"][: s["num_train"]]).long()
    y = torch.nn.functional.one_hot(labels, 10).float()
    x_test = torch.from_numpy(data["x_test"][: s["num_test"]]).float().div(255).reshape(-1, 784)
    supervised = torch.cat([torch.nonzero(labels == k).flatten()[: s["sup_num"] // 10] for k in range(10)])
    unsupervised = torch.ones(len(x), dtype=torch.bool)
    unsupervised[supervised] = False
    unsupervised = torch.nonzero(unsupervised).flatten()
    ss_vae = example.SSVAE(z_dim=50, hidden_layers=[500], config_enum="parallel", aux_loss_multiplier=46.0)
    optimizer = pyro.optim.Adam({"lr": 0.00042, "betas": (0.9, 0.999)})
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    if kind == "own":
        guide = config_enumerate(ss_vae.guide, "parallel", expand=True)
        eval_guide = ss_vae.guide
    else:
        # the label enumerated in the model our guide refines with: where the label is not drawn first, its
        # refinement sums y out exactly
        model = config_enumerate(ss_vae.model, "parallel", expand=True)
        guide = AutoGuideList(model, create_plates=lambda xs, ys=None: pyro.plate("data", xs.shape[0]))

        def label(xs: Tensor, ys: Tensor | None = None) -> None:
            if ys is None:  # q(y | x), the example's, enumerated: ours then refines z once per label value
                with guide.plates["data"]:
                    pyro.sample("y", dist.OneHotCategorical(ss_vae.encoder_y(xs)),
                                infer={"enumerate": "parallel", "expand": True})

        guide.append(label)
        guide.append(_ours(kind, model, ctx, 0.00042))
        eval_guide = guide
        if kind == "iterative":
            elbo = IterativeTraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    svi = SVI(ss_vae.model, guide, optimizer, elbo)
    period = int(len(x) / s["sup_num"])

    def epoch(svi: SVI, number: int) -> None:
        generator = torch.Generator().manual_seed(ctx.seed + number)
        sup = [supervised[i] for i in _batches(len(supervised), 200, generator)]
        unsup = [unsupervised[i] for i in _batches(len(unsupervised), 200, generator)]
        count = 0
        for i in range(len(sup) + len(unsup)):  # the example's interleaving (run_inference_for_epoch)
            if (i % period == 1 and count < len(sup)) or not unsup:
                idx = sup[count]
                count += 1
                svi.step(x[idx], y[idx])
            else:
                svi.step(x[unsup.pop()])

    return Run(ss_vae.model, eval_guide, svi, epoch, [ss_vae], (x_test,), discrete=("y", 10))


def piano_rolls(num: int, length: int, *, seed: int, voices: int = 4) -> Tensor:
    """Synthetic polyphonic sequences ``[num, length, 88]``: ``voices`` notes that move by -2..2 keys per step (a
    leap of up to an octave with probability 0.1), in a band around middle C, plus rare stray notes (0.2%)."""
    generator = torch.Generator().manual_seed(seed)
    rolls = torch.zeros(num, length, 88)
    pitch = 30 + 6 * torch.arange(voices) + torch.randint(-3, 4, (num, voices), generator=generator)
    for t in range(length):
        step = torch.randint(-2, 3, (num, voices), generator=generator)
        leap = torch.randint(-12, 13, (num, voices), generator=generator)
        jump = torch.rand(num, voices, generator=generator) < 0.1
        pitch = (pitch + torch.where(jump, leap, step)).clamp(15, 72)
        rolls[:, t].scatter_(1, pitch, 1.0)
    stray = torch.rand(rolls.shape, generator=generator) < 0.002
    return torch.maximum(rolls, stray.float())


def build_dmm(kind: str, ctx: Context) -> Run:
    s = ctx.settings
    example = load_example(ctx.checkout, "dmm.py")  # first: its stand-ins serve the loader's imports too
    import pyro.contrib.examples.polyphonic_data_loader as poly

    sequences = piano_rolls(s["num_train"] + s["num_test"], s["length"], seed=ctx.seed)
    lengths = torch.full((len(sequences),), s["length"])
    train, test = sequences[: s["num_train"]], sequences[s["num_train"]:]
    dmm = example.DMM(rnn_dropout_rate=0.1, num_iafs=0, iaf_dim=100)
    adam = pyro.optim.ClippedAdam({"lr": 0.0003, "betas": (0.96, 0.999), "clip_norm": 10.0, "lrd": 0.99996,
                                   "weight_decay": 2.0})
    if kind == "own":
        guide = dmm.guide
    else:
        ours = _ours(kind, dmm.model, ctx, 0.0003)

        def guide(mini_batch: Tensor, reversed_batch: Any, mask: Tensor, lengths: Tensor,
                  annealing_factor: float = 1.0) -> Any:
            # the example scales its guide's z_t by the annealing factor too; the refinement sees the model
            # without annealing (the ELBO it refines is the unannealed one)
            return poutine.scale(ours, scale=annealing_factor)(mini_batch, reversed_batch, mask, lengths)

    svi = SVI(dmm.model, guide, adam, _trace_elbo(kind))
    batches_per_epoch = math.ceil(len(train) / 20)
    annealing_epochs = max(1, s["epochs"] // 5)

    def epoch(svi: SVI, number: int) -> None:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(ctx.seed + number))
        for which in range(batches_per_epoch):
            if number < annealing_epochs:  # the example's annealing schedule, minimum factor 0.2
                annealing = 0.2 + 0.8 * (which + number * batches_per_epoch + 1) / (annealing_epochs *
                                                                                 batches_per_epoch)
            else:
                annealing = 1.0
            batch = poly.get_mini_batch(order[which * 20: (which + 1) * 20], train, lengths[: len(train)])
            svi.step(*batch, annealing)

    test_batch = poly.get_mini_batch(torch.arange(len(test)), test, lengths[: len(test)])
    return Run(dmm.model, guide, svi, epoch, [dmm], tuple(test_batch), plate="z_minibatch")


BUILDERS: dict[str, Callable[[str, Context], Run]] = {
    "vae": build_vae, "cvae": build_cvae, "lda": build_lda, "scanvi": build_scanvi, "ss_vae_M2": build_ss_vae,
    "dmm": build_dmm,
}


def _error(error: BaseException) -> str:
    lines = [line for line in traceback.format_exception_only(type(error), error)[-1].splitlines() if line.strip()]
    return lines[0][:400] if lines else type(error).__name__


def run_guide(name: str, kind: str, ctx: Context, epochs: int) -> dict[str, Any]:
    """Trains one guide on one example and evaluates it; a failure is recorded (``status``), not raised."""
    pyro.clear_param_store()
    pyro.set_rng_seed(ctx.seed)
    record: dict[str, Any] = {"status": "ok"}
    try:
        run = BUILDERS[name](kind, ctx)
        seconds = []
        for number in range(epochs):
            for module in run.modules:
                module.train()
            start = time.perf_counter()
            run.epoch(run.svi, number)
            seconds.append(time.perf_counter() - start)
        record["seconds_per_epoch"] = sum(seconds) / len(seconds)
        for module in run.modules:
            module.eval()
        pyro.set_rng_seed(ctx.seed + 1)
        if name == "lda":
            loss = TraceEnum_ELBO(max_plate_nesting=2, num_particles=ctx.particles).loss(
                run.model, run.guide, *run.test_args, **run.test_kwargs)
            size = run.test_args[0].shape[1]
            record["elbo"] = -loss / size
            values = None
        else:
            size = len(run.test_args[0])
            values = held_out_elbo(run.model, run.guide, run.test_args, run.test_kwargs, plate=run.plate,
                                   size=size, particles=ctx.particles, discrete=run.discrete)
            record["elbo"] = values.mean().item()
            record["elbo_se"] = common.standard_error(values)
        with torch.no_grad():
            start = time.perf_counter()
            run.guide(*run.test_args, **run.test_kwargs)
            record["test_seconds_per_datapoint"] = (time.perf_counter() - start) / size
        record["per_datapoint"] = values
    except Exception as error:  # recorded as the example's status
        record = {"status": _error(error)}
    return record


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float] | None:
    """Mean and standard error of the per-datapoint difference a − b, where both have per-datapoint values."""
    if a.get("per_datapoint") is None or b.get("per_datapoint") is None:
        return None
    difference = a["per_datapoint"] - b["per_datapoint"]
    return {"mean": difference.mean().item(), "se": common.standard_error(difference)}


def summarize(name: str, records: dict[str, dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The example's entry of the results' ``examples``."""
    statuses = {kind: record["status"] for kind, record in records.items()}
    status = "ok" if all(s == "ok" for s in statuses.values()) else "; ".join(
        f"{kind}: {s}" for kind, s in statuses.items() if s != "ok")
    own, iterative, amortized = (records[kind] for kind in KINDS)
    entry: dict[str, Any] = {
        "elbo_own_guide": own.get("elbo"),
        "elbo_iterative": iterative.get("elbo"),
        "elbo_amortized": amortized.get("elbo"),
        "elbo_se": {kind: records[kind].get("elbo_se") for kind in KINDS},
        "seconds_per_epoch_own": own.get("seconds_per_epoch"),
        "seconds_per_epoch_iterative": iterative.get("seconds_per_epoch"),
        "seconds_per_epoch_amortized": amortized.get("seconds_per_epoch"),
        "test_seconds_per_datapoint": {kind: records[kind].get("test_seconds_per_datapoint") for kind in KINDS},
        "iterative_minus_own": _paired(iterative, own),
        "amortized_minus_own": _paired(amortized, own),
        "iterative_minus_amortized": _paired(iterative, amortized),
        "status": status,
        "status_by_guide": statuses,
        "settings": settings,
        "reductions": REDUCTIONS[name].format(**settings),
    }
    difference = entry["iterative_minus_own"]
    entry["iterative_ahead_of_own"] = bool(difference is not None and difference["mean"] > 2 * difference["se"])
    if name in EXPLANATIONS:
        entry["explanation"] = EXPLANATIONS[name]
    return entry


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _diff(value: dict[str, float] | None) -> str:
    return "n/a" if value is None else f"{value['mean']:+.2f} ± {value['se']:.2f}"


def render(examples: dict[str, dict[str, Any]], particles: int) -> list[str]:
    """The Markdown body: the results table, the per-example status and reductions."""
    rows = []
    for name, e in examples.items():
        rows.append((name, _fmt(e["elbo_own_guide"]), _fmt(e["elbo_iterative"]), _fmt(e["elbo_amortized"]),
                     _diff(e["iterative_minus_own"]), _diff(e["amortized_minus_own"]),
                     _fmt(e["seconds_per_epoch_own"], 1), _fmt(e["seconds_per_epoch_iterative"], 1),
                     _fmt(e["seconds_per_epoch_amortized"], 1),
                     "ok" if e["status"] == "ok" else "see below"))
    served = [n for n, e in examples.items() if e["status_by_guide"]["iterative"] == "ok"]
    ahead = [n for n, e in examples.items() if e["iterative_ahead_of_own"]]
    lines = [
        f"Held-out ELBO per datapoint (nats, higher is better; {particles} draws of each guide, discrete guide sites "
        "summed exactly), each guide trained for the same epochs with the example's optimizer; differences paired "
        "over the same held-out data (± standard error). Seconds per training epoch on a shared CPU (indicative).",
        "",
        "| example | own guide | iterative | amortized | iterative - own | amortized - own | s/epoch own | "
        "s/epoch iterative | s/epoch amortized | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"AutoIterativeNormal runs on {len(served)} of {len(examples)} examples ({', '.join(served) or 'none'}); "
        f"its held-out ELBO is ahead of the example's own guide by more than two standard errors on {len(ahead)} "
        f"({', '.join(ahead) or 'none'}).",
        "",
        "Test-time seconds per datapoint (one guide call on the held-out set, no gradient):",
        "",
        "| example | own | iterative | amortized |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {n} | " + " | ".join(_fmt(e["test_seconds_per_datapoint"][k], 5) for k in KINDS) + " |"
          for n, e in examples.items()),
        "",
        "Status and reductions:",
        "",
    ]
    for name, e in examples.items():
        lines.append(f"* **{name}**: {'ok' if e['status'] == 'ok' else '`' + e['status'] + '`'}. "
                     f"{e.get('explanation', '')} Reductions: {e['reductions']}.".replace("  ", " "))
    return lines


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pyro-examples", type=Path, default=DEFAULT_CHECKOUT,
                        help=f"the examples folder of a Pyro checkout (default $PYRO_EXAMPLES or {DEFAULT_CHECKOUT})")
    parser.add_argument("--examples", nargs="+", choices=EXAMPLES, default=list(EXAMPLES),
                        help="which examples to run (default all)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring) and writes its results; returns the JSON content."""
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv=argv, extra=_options)
    started = common.setup(args)
    if not args.pyro_examples.is_dir():
        raise SystemExit(f"no Pyro examples at {args.pyro_examples}: pass --pyro-examples <checkout>/examples")
    scale = SETTINGS[args.scale]
    examples: dict[str, dict[str, Any]] = {}
    for name in args.examples:
        settings = scale[name]
        ctx = Context(checkout=args.pyro_examples, settings=settings, seed=args.seed, data_path=args.data_path,
                      **scale["common"])
        epochs = settings["epochs"]
        records = {}
        for kind in KINDS:
            records[kind] = run_guide(name, kind, ctx, epochs)
            if not args.quiet:
                print(f"{name:>10} {kind:>9}: {records[kind].get('elbo', float('nan')):10.2f}  "
                      f"{records[kind].get('seconds_per_epoch', float('nan')):7.1f} s/epoch  "
                      f"{records[kind]['status'][:100]}", flush=True)
        examples[name] = summarize(name, records, settings)
    result = {
        "settings": {**scale["common"], "pyro_examples": str(args.pyro_examples), "examples": args.examples},
        "commit": _git_commit(),
        "pyro_version": pyro.__version__,
        "torch_version": torch.__version__,
        "examples": examples,
        "served_by_iterative": sum(e["status_by_guide"]["iterative"] == "ok" for e in examples.values()),
        "iterative_ahead_of_own": sum(e["iterative_ahead_of_own"] for e in examples.values()),
    }
    body = render(examples, scale["common"]["particles"])
    common.write_results(args, result, title="Pyro's examples with AutoIterativeNormal in place of their guides",
                         body=body, started=started)
    return result


if __name__ == "__main__":
    main()
