r"""The ViT paper's ablations (Appendix D.3, D.4) at digits scale: how position information is
given, and class token versus global average pooling, each a sweep of short runs of the default
job's model on the bundled digits.

  python run.py --config configs/vit_digits_ablation.py:posemb --mode sweep
  python run.py --config configs/vit_digits_ablation.py:classifier --mode sweep

`posemb`: no position embedding, learned 1-D (added once, before every block with one shared
table, or a table per block), learned 2-D, fixed 2-D sine-cosine, and a learned relative bias.
`classifier`: class token and global average pooling, each at two learning rates (the paper
finds each works with its own). Each run trains 600 steps (the default job trains 2,000) in
`<workdir>/<name>`; the table of test accuracies is printed and written to
`<workdir>/sweep.md`. Expected (measured on 2 CPU cores): posemb 9m25s, from 47.3% without
position information to 86-92% with an absolute embedding (relative bias: 73.0%); classifier
3m12s, token 87.3% and gap 88.2% at lr 3e-3 (65.9% and 69.3% at 1e-3). The README shows both
tables. The 8x8 digits have 16 patches of 2x2 pixels: these are digits-scale numbers, not the
paper's.
"""

import ml_collections

from configs import vit_digits

SWEEPS = {
    "posemb": (
        "none: model.posemb=none",
        "learn: model.posemb=learn",
        "learn_every_layer: model.posemb=learn, model.posemb_where=every_layer",
        "learn_shared: model.posemb=learn, model.posemb_where=every_layer_shared",
        "learn2d: model.posemb=learn2d",
        "sincos2d: model.posemb=sincos2d",
        "relative: model.posemb=relative",
    ),
    "classifier": (
        "token_lr1e-3: model.classifier=token, optimizer.learning_rate=1e-3",
        "token_lr3e-3: model.classifier=token, optimizer.learning_rate=3e-3",
        "gap_lr1e-3: model.classifier=gap, optimizer.learning_rate=1e-3",
        "gap_lr3e-3: model.classifier=gap, optimizer.learning_rate=3e-3",
    ),
}


def get_config(arg: str = "posemb") -> ml_collections.ConfigDict:
  sweep = arg or "posemb"
  if sweep not in SWEEPS:
    raise ValueError(f"vit_digits_ablation.py: sweep {sweep!r} is unknown; use one of "
                     f"{sorted(SWEEPS)}.")
  config = vit_digits.get_config()
  config.total_steps = 600
  config.optimizer.warmup_steps = 50
  config.eval_every = 0  # at the end only
  config.checkpoint_every = 0
  config.sweep = SWEEPS[sweep]
  return config
