r"""iGPT on the bundled digits: palette, pre-training, samples and a linear probe, minutes on a CPU.

  python run.py --config configs/igpt_digits.py                  # fits the palette, then trains
  python run.py --config configs/igpt_digits.py --mode sample    # completions.png, samples.png
  python run.py --config configs/igpt_digits.py --mode probe     # accuracy per layer vs pixels
  python run.py --config configs/igpt_digits.py:bert             # the BERT objective instead
  python run.py --config configs/igpt_digits.py:bert --mode probe

Argument: "ar" (default; autoregressive; workdir workdirs/igpt_digits) or "bert" (each position
masked with probability 0.15, no causal mask; workdir workdirs/igpt_digits_bert).
Data: scikit-learn's 8x8 digits (64-token sequences), a 16-colour palette (the digits have 17
grey levels). Model: 2 blocks of width 128. Adam (0.9, 0.95), warm-up one epoch, cosine to 0.
Expected (2-core CPU, README): test bits per token far below the palette's unigram entropy of
2.86 bits (printed by the palette step, written to <workdir>/palette.json). Linear probe: see the
README for the measured accuracy per layer against the same probe on raw pixels.
"""

import ml_collections

from configs import common

OBJECTIVES = {"ar": "igpt_ar", "bert": "igpt_bert"}


def get_config(arg: str = "ar") -> ml_collections.ConfigDict:
  objective = arg or "ar"
  if objective not in OBJECTIVES:
    raise ValueError(f"igpt_digits.py: the argument {arg!r} is unknown; use "
                     "configs/igpt_digits.py:ar or configs/igpt_digits.py:bert.")
  config = common.add_igpt_fields(common.base())
  config.task = OBJECTIVES[objective]
  config.model = ml_collections.ConfigDict(dict(
      variant="custom", width=128, depth=2, num_heads=4, mlp_dim=512, dropout_rate=0.1,
      dtype="float32", attention_implementation=""))
  config.dataset = "sklearn_digits"
  config.num_classes = 10
  config.image_size = 8
  config.preprocess_train = "decode|value_range(-1,1)"
  config.data_cache = True  # 1,442 images of 8x8: read once
  config.preprocess_eval = "decode|value_range(-1,1)"
  config.palette_clusters = 16
  config.batch_size = 64
  config.eval_batch_size = 120
  config.total_steps = 1000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95
  config.optimizer.warmup_steps = 23  # one epoch of 1,442 images at batch 64
  config.optimizer.decay = "cosine"
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.sample.num_images = 8
  config.sample.num_samples = 4
  return config
