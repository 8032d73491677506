r"""iGPT on the bundled digits: palette, autoregressive pre-training, samples and a linear probe,
minutes on a CPU.

  python run.py --config configs/igpt_digits.py                  # fits the palette, then trains
  python run.py --config configs/igpt_digits.py --mode sample    # completions.png, samples.png
  python run.py --config configs/igpt_digits.py --mode probe     # accuracy per layer vs pixels

Data: scikit-learn's 8x8 digits (64-token sequences), a 16-colour palette (the digits have 17
grey levels). Model: 4 blocks of width 64. Adam (0.9, 0.95), warm-up then cosine to 0.
Expected: test bits per token far below the palette's unigram entropy (printed by the palette
step, written to <workdir>/palette.json); see README for the measured numbers.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  config = common.add_igpt_fields(common.base())
  config.task = "igpt_ar"
  config.model = ml_collections.ConfigDict(dict(
      variant="custom", width=64, depth=4, num_heads=4, mlp_dim=256, dropout_rate=0.0,
      dtype="float32", attention_implementation=""))
  config.dataset = "sklearn_digits"
  config.num_classes = 10
  config.image_size = 8
  config.preprocess_train = "decode|value_range(-1,1)"
  config.preprocess_eval = "decode|value_range(-1,1)"
  config.palette_clusters = 16
  config.batch_size = 64
  config.eval_batch_size = 120
  config.total_steps = 2000
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
