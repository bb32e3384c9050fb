"""20 Newsgroups: perplexity of a standard VAE versus an iterative-inference VAE (paper App. D, Table 2 direction).

What is measured: two multinomial VAEs with the same decoder architecture (``zoo.multinomial_vae``: 2 ELU layers,
softmax over the 1,995-word vocabulary, N(0, I) prior) are trained with Adam for the same epochs on the same
bag-of-words training documents (seeded order, per-epoch checkpoints): one with its log(1 + counts) encoder (one
pass), one with an iterative inference model (gradient + log(1 + counts) + params encoding, T = 5 steps, no
encoder). On a fixed subset of the non-empty test documents, log p(x) is estimated by importance sampling with k
samples from each model's posterior, and the perplexity exp(−Σ log p(xᵢ) / Σ Nᵢ) is reported; since the estimate
of log p(x) is a lower bound, the perplexity is an upper bound. Lower is better.

Usage::

    python benchmarks/text_perplexity.py --scale smoke --out /tmp/bench   # functional test (< 1 min)
    python benchmarks/text_perplexity.py                                # full: writes benchmarks/results/
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from learned_inference.data import load_20news
from learned_inference.encodings import Data
from learned_inference.evaluation import perplexity
from learned_inference.likelihoods import multinomial_coefficient
from learned_inference.zoo import multinomial_vae

NAME = "text_perplexity"
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"num_train": 300, "num_test": 30, "epochs": 1, "hidden_size": 32, "latent_dim": 8, "batch_size": 50,
              "lr": 1e-3, "num_steps": 5, "iw_samples": 20},
    "full": {"num_train": 11258, "num_test": 1000, "epochs": 10, "hidden_size": 512, "latent_dim": 64,
             "batch_size": 100, "lr": 1e-3, "num_steps": 5, "iw_samples": 500},
}
REDUCTIONS = ("Trained on {num_train} of the 11,258 training documents for {epochs} epochs (Adam lr {lr}, batch "
              "{batch_size}; the paper trains far longer); {hidden_size} hidden units, z of size {latent_dim}. "
              "Perplexity from importance sampling with k = {iw_samples} on the first {num_test} non-empty test "
              "documents (of 7,487).")
CONVENTION = ("Perplexity exp(-Σ log p(x) / Σ N) with log p(x | z) = Σ counts · log softmax (the convention of "
              "NVDM, Miao et al. 2016, 836 on its 20 Newsgroups, and of the paper's App. D); 'normalized' adds the "
              "multinomial coefficient log N! - Σ log x! to log p(x), the normalised bag-of-words probability.")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring) and writes its results; returns the JSON content."""
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv=argv)
    started = common.setup(args)
    s = SETTINGS[args.scale]
    train_counts, test_counts = load_20news(args.data_path)
    train = train_counts[: s["num_train"]]
    test = test_counts[:]
    test = test[test.sum(1) > 0][: s["num_test"]]
    vocab, latent, hidden = train.shape[1], s["latent_dim"], s["hidden_size"]
    metrics: dict[str, dict[str, float]] = {}
    learning: dict[str, dict[str, list[float]]] = {}
    for kind in ("standard", "iterative"):
        torch.manual_seed(args.seed)
        model = multinomial_vae(vocab_size=vocab, latent_dim=latent, hidden_size=hidden)
        # The update network sees log(1 + counts), as the standard encoder does (raw counts reach the hundreds).
        method = common.make_method(model, kind=kind, latent_dim=latent, hidden_size=hidden,
                                    num_steps=s["num_steps"], encoding=("gradient", Data(log1p=True), "params"))
        learning[kind] = common.train_model(
            args, model, method, train, label=f"20news-{kind}",
            config={"kind": kind, "hidden_size": hidden, "latent_dim": latent, "num_steps": s["num_steps"],
                    "encoding": "gradient+log1p(data)+params"},
            epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"])
        log_px, elbo = common.importance_scores(model, method, test, samples=s["iw_samples"], seed=args.seed + 1,
                                                num_steps=0 if kind == "standard" else s["num_steps"])
        coefficient = multinomial_coefficient(test.double())
        metrics[kind] = {"perplexity": perplexity(log_px, test).item(),
                         "perplexity_elbo": perplexity(elbo, test).item(),
                         "perplexity_normalized": perplexity(log_px + coefficient, test).item(),
                         "nll_per_doc": -log_px.mean().item(),
                         "seconds_per_epoch": sum(learning[kind]["seconds"]) / len(learning[kind]["seconds"])}
    p_std, p_it = metrics["standard"]["perplexity"], metrics["iterative"]["perplexity"]
    result = {
        "settings": {**s, "vocab_size": vocab, "test_tokens": int(test.sum().item()),
                     "reductions": REDUCTIONS.format(**s)},
        "perplexity_standard": p_std,
        "perplexity_iterative": p_it,
        "perplexity_standard_normalized": metrics["standard"]["perplexity_normalized"],
        "perplexity_iterative_normalized": metrics["iterative"]["perplexity_normalized"],
        "convention": CONVENTION,
        "iterative_below_standard": p_it < p_std,
        "models": metrics,
        "learning_curves": learning,
    }
    body = [
        REDUCTIONS.format(**s),
        "",
        CONVENTION,
        "",
        *common.table(["model", "perplexity (IS bound)", "perplexity (ELBO bound)", "normalized (IS bound)",
                       "-log p(x) per doc", "s / epoch"],
                      [(k, m["perplexity"], m["perplexity_elbo"], m["perplexity_normalized"], m["nll_per_doc"],
                        m["seconds_per_epoch"]) for k, m in metrics.items()]),
        "",
        f"Iterative perplexity {p_it:.1f} vs standard {p_std:.1f}: target (iterative below standard) "
        f"**{'met' if p_it < p_std else 'not met'}**.",
    ]
    common.write_results(args, result, title="Text: perplexity on 20 Newsgroups", body=body, started=started)
    return result


if __name__ == "__main__":
    main()
