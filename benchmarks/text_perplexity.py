"""20 Newsgroups: perplexity of a standard VAE versus an iterative-inference VAE (paper App. D, Table 2 direction).

What is measured, in the well-trained tier: two multinomial VAEs with the same decoder architecture
(``zoo.multinomial_vae``: 2 ELU layers, softmax over the 1,995-word vocabulary, N(0, I) prior) are trained with
Adam for the same epochs on the same bag-of-words training documents (seeded order, per-epoch checkpoints,
resumable): one with its log(1 + counts) encoder (one pass), one with an iterative inference model (gradient +
log(1 + counts) + params encoding, the library's defaults otherwise, T = 5 steps, no encoder). The last
``num_valid`` training documents are held out for early stopping, as text VAEs are trained: every ``eval_every``
epochs each model is scored on them and on a fixed subset of the non-empty test documents, and each model is
reported at its epoch with the best validation perplexity (every evaluation is in the JSON). log p(x) is estimated
by importance sampling with k samples from each model's posterior, and the perplexity exp(−Σ log p(xᵢ) / Σ Nᵢ) is
reported; since the estimate of log p(x) is a lower bound, the perplexity is an upper bound. Lower is better.

Usage::

    python benchmarks/text_perplexity.py --scale smoke --out /tmp/bench   # functional test (< 1 min)
    python benchmarks/text_perplexity.py                                # full: writes benchmarks/results/
"""

from __future__ import annotations

import json
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
    "smoke": {"num_train": 250, "num_valid": 50, "num_test": 30, "epochs": 2, "eval_every": 1, "hidden_size": 32,
              "latent_dim": 8, "batch_size": 50, "lr": 1e-3, "num_steps": 5, "iw_samples": 20, "valid_samples": 10},
    "full": {"num_train": 10258, "num_valid": 1000, "num_test": 1000, "epochs": 50, "eval_every": 10,
             "hidden_size": 512, "latent_dim": 64, "batch_size": 100, "lr": 1e-3, "num_steps": 5, "iw_samples": 500,
             "valid_samples": 50},
}
REDUCTIONS = ("Trained on the first {num_train} of the 11,258 training documents for up to {epochs} epochs (Adam lr "
              "{lr}, batch {batch_size}), each model reported at the evaluation (every {eval_every} epochs) with the "
              "best perplexity on the last {num_valid} training documents (k = {valid_samples}); {hidden_size} "
              "hidden units, z of size {latent_dim}. Test perplexity from importance sampling with k = {iw_samples} "
              "on the first {num_test} non-empty test documents (of 7,487).")
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
    valid = train_counts[s["num_train"]: s["num_train"] + s["num_valid"]]
    valid = valid[valid.sum(1) > 0]
    test = test_counts[:]  # dense
    test = test[test.sum(1) > 0][: s["num_test"]]
    vocab, latent, hidden = train.shape[1], s["latent_dim"], s["hidden_size"]
    metrics: dict[str, dict[str, float]] = {}
    evaluations: dict[str, dict[str, dict[str, float]]] = {}
    learning: dict[str, dict[str, list[float]]] = {}
    for kind in ("standard", "iterative"):
        torch.manual_seed(args.seed)
        model = multinomial_vae(vocab_size=vocab, latent_dim=latent, hidden_size=hidden)
        # The update network sees log(1 + counts), as the standard encoder does (raw counts reach the hundreds).
        method = common.make_method(model, kind=kind, latent_dim=latent, hidden_size=hidden,
                                    num_steps=s["num_steps"], encoding=("gradient", Data(log1p=True), "params"))
        config = {"kind": kind, "hidden_size": hidden, "latent_dim": latent, "num_steps": s["num_steps"],
                  "encoding": "gradient+log1p(data)+params"}
        # The evaluations travel beside the training checkpoint: an interrupted run resumes both.
        record = common.checkpoint_file(args, f"20news-{kind}-evaluations", {**config, **s}).with_suffix(".json")
        evaluations[kind] = json.loads(record.read_text()) if record.is_file() else {}
        steps = 0 if kind == "standard" else s["num_steps"]
        for epoch in range(s["eval_every"], s["epochs"] + 1, s["eval_every"]):
            if str(epoch) in evaluations[kind]:
                continue
            learning[kind] = common.train_model(args, model, method, train, label=f"20news-{kind}", config=config,
                                                epochs=epoch, batch_size=s["batch_size"], lr=s["lr"])
            if len(learning[kind]["seconds"]) != epoch:
                raise RuntimeError(f"the checkpoint of 20news-{kind} is past epoch {epoch}, which was not evaluated: "
                                   f"delete it and {record} to start afresh")
            valid_log_px, _ = common.importance_scores(model, method, valid, samples=s["valid_samples"],
                                                       seed=args.seed + 2, num_steps=steps)
            log_px, elbo = common.importance_scores(model, method, test, samples=s["iw_samples"], seed=args.seed + 1,
                                                    num_steps=steps)
            evaluations[kind][str(epoch)] = {
                "valid_perplexity": perplexity(valid_log_px, valid).item(),
                "perplexity": perplexity(log_px, test).item(), "perplexity_elbo": perplexity(elbo, test).item(),
                "perplexity_normalized": perplexity(log_px + multinomial_coefficient(test.double()), test).item(),
                "nll_per_doc": -log_px.mean().item(), "train_elbo": learning[kind]["train_elbo"][-1]}
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(evaluations[kind], indent=2))
        learning[kind] = common.train_model(args, model, method, train, label=f"20news-{kind}", config=config,
                                            epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"])
        chosen = min(evaluations[kind], key=lambda e, k=kind: evaluations[k][e]["valid_perplexity"])
        metrics[kind] = {**evaluations[kind][chosen], "epoch": int(chosen),
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
        "evaluations": evaluations,
        "learning_curves": learning,
    }
    body = [
        REDUCTIONS.format(**s),
        "",
        CONVENTION,
        "",
        *common.table(["model", "epoch (best validation)", "perplexity (IS bound)", "perplexity (ELBO bound)",
                       "normalized (IS bound)", "-log p(x) per doc", "s / epoch"],
                      [(k, m["epoch"], m["perplexity"], m["perplexity_elbo"], m["perplexity_normalized"],
                        m["nll_per_doc"], m["seconds_per_epoch"]) for k, m in metrics.items()]),
        "",
        "Every evaluation (validation perplexity with k = {valid_samples} / test perplexity, IS bound):".format(**s),
        "",
        *common.table(["epoch", *[f"{k} valid / test" for k in evaluations]],
                      [(e, *[f"{evaluations[k][e]['valid_perplexity']:.1f} / {evaluations[k][e]['perplexity']:.1f}"
                             for k in evaluations]) for e in evaluations["standard"]]),
        "",
        f"Iterative perplexity {p_it:.1f} vs standard {p_std:.1f}: target (iterative below standard) "
        f"**{'met' if p_it < p_std else 'not met'}**.",
    ]
    common.write_results(args, result, title="Text: perplexity on 20 Newsgroups", body=body, started=started)
    return result


if __name__ == "__main__":
    main()
