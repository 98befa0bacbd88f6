"""NAR recipe: the bundled GPT's trunk plus a vertical head, trained with NAR's objective (train_c2i.py).

Initialisation: every trunk weight from the bundled GPT; the extra block ``layers.{n_layer}`` is a copy of
the GPT's last block, ``medusa_norm`` / ``medusa_output`` copies of its ``norm`` / ``output``, so training
starts from a model whose right head already predicts the raster-next token.

Objective (shared/reference/parallel.md §2.3): all n*n tokens are inputs, one forward under the proximity
mask, per-cell logits from ``NARModel.teacher_forced`` (heads averaged before the cross-entropy), class
dropout for CFG. Optimiser as NAR: AdamW betas (0.9, 0.95), weight decay 0.05, grad clip 1.0, a step LR
schedule with milestones at 1/2, 2/3, 5/6 of the run and gamma 0.2. Deviation: the base LR is 5e-4
instead of 1e-4 (a 1-hour CPU fine-tune of a 6M-parameter model at batch 32, not 300 epochs at batch 256),
and the milestones are in steps, not epochs.
"""

from __future__ import annotations

import json
import time

from genaccel.models import BUNDLED
from genaccel.models.llamagen import LlamaGenGPT, ModelArgs
from genaccel.models.nar import NARModel
from genaccel.train.common import export_weights, float16_state, llamagen_adamw, load_gpt_for_tokens, start_run
from genaccel.train.gpt import cached_tokens, heldout_nll, token_ce, train_on_tokens

DEFAULTS = dict(
    out_dir="checkpoints/nar", gpt_path=str(BUNDLED["gpt"]), vq_path=str(BUNDLED["vq"]), seed=0, steps=600,
    batch_size=32, lr=5e-4, milestones=(0.5, 2 / 3, 5 / 6), gamma=0.2, weight_decay=0.05, threads=2, bf16=False,
    train_per_class=1024, heldout_per_class=64, class_dropout_prob=0.1, ckpt_every=50, log_every=25,
    stop_at=None, max_minutes=55.0, export_path="",
)


def nar_from_gpt(gpt: LlamaGenGPT) -> NARModel:
    """A NAR model whose trunk is ``gpt`` and whose vertical head starts as a copy of its last block and head."""
    model = NARModel(ModelArgs(**{k: getattr(gpt.args, k) for k in ModelArgs.field_names()}))
    sd = dict(gpt.state_dict())
    n = gpt.args.n_layer
    for key, value in gpt.state_dict().items():
        if key.startswith(f"layers.{n - 1}."):
            sd[f"layers.{n}." + key[len(f"layers.{n - 1}.") :]] = value.clone()
    sd["medusa_norm.weight"] = gpt.norm.weight.detach().clone()
    sd["medusa_output.weight"] = gpt.output.weight.detach().clone()
    model.load_state_dict(sd, strict=True)
    return model


def step_lr(step: int, total: int, base: float, milestones, gamma: float) -> float:
    """NAR's MultiStepLR: ``base * gamma**k`` after k of the milestones (fractions of the run)."""
    return base * gamma ** sum(step >= round(m * total) for m in milestones)


def main(argv: list[str] | None = None) -> dict:
    cfg, out, log = start_run(argv, DEFAULTS, "nar")
    train = cached_tokens(out, cfg, "train", cfg["train_per_class"])
    heldout = cached_tokens(out, cfg, "heldout", cfg["heldout_per_class"])
    gpt = load_gpt_for_tokens(cfg["gpt_path"], train["tokens"])
    if (cfg["class_dropout_prob"] > 0) != (gpt.args.class_dropout_prob > 0):
        raise SystemExit("class_dropout_prob must be > 0 exactly when the GPT has a null-class row (CFG)")
    model = nar_from_gpt(gpt)
    nll_start = heldout_nll(model, heldout)
    log.info(f"NAR params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M; held-out NLL at init {nll_start:.4f}")
    opt = llamagen_adamw(model, cfg)
    step, start = train_on_tokens(model, opt, train, cfg, out / "last.pt", log, "nar", token_ce,
                                  lambda step: step_lr(step, cfg["steps"], cfg["lr"], cfg["milestones"], cfg["gamma"]))
    metrics = {"heldout_nll_nats": heldout_nll(model, heldout), "heldout_nll_at_init": nll_start, "steps": step,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "minutes": (time.time() - start) / 60}
    log.info(f"final {json.dumps(metrics)}")
    config = {k: getattr(model.args, k) for k in ModelArgs.field_names()}
    meta = {"config": json.dumps(config), "stored_dtype": "float16", "family": "nar"}
    record = {"config": config, "metrics": metrics, "recipe": cfg}
    export_weights(float16_state(model), meta, record, out, "nar", cfg["export_path"])
    return metrics


if __name__ == "__main__":
    main()
