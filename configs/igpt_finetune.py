r"""iGPT fine-tuning (paper Sec. 3.4): average-pool the final normalised output, a zero-initialised
linear head, loss L_GEN + L_CLF, starting from a pre-training run.

  python run.py --config configs/igpt_finetune.py:cifar10 --workdir workdirs/igpt_ft \
      --config.init_from=workdirs/igpt_s --config.palette=workdirs/igpt_s/palette.npy \
      --config.model.variant=S

Argument: the labelled dataset (cifar10, cifar100). Adam (0.9, 0.95), batch 128, warm-up of one
epoch then cosine to 0, random crops and flips as the paper's fine-tuning augmentation.
Expected: the paper reports 99.0% on CIFAR-10 for a fine-tuned iGPT-L; not reproduced here.
"""

import ml_collections

from configs import common

DATASETS = {"cifar10": 10, "cifar100": 100}


def get_config(arg: str = "cifar10") -> ml_collections.ConfigDict:
  dataset = arg or "cifar10"
  if dataset not in DATASETS:
    raise ValueError(f"igpt_finetune.py: dataset {dataset!r} is unknown; use one of "
                     f"{sorted(DATASETS)}.")
  config = common.add_igpt_fields(common.base())
  config.task = "igpt_finetune_ar"  # igpt_finetune_bert after BERT pre-training
  config.model = ml_collections.ConfigDict(dict(
      variant="S", width=0, depth=0, num_heads=0, mlp_dim=0,  # 0: the variant's
      dropout_rate=0.0, dtype="float32", attention_implementation="",
      scan_layers=False, remat_policy="none"))
  config.dataset = dataset
  config.num_classes = DATASETS[dataset]
  config.image_size = 32
  config.preprocess_train = "decode|random_crop(32,pad=4)|flip_lr|value_range(-1,1)"
  config.preprocess_eval = "decode|value_range(-1,1)"
  config.batch_size = 128
  config.eval_batch_size = 256
  config.total_steps = 50_000
  config.optimizer.learning_rate = 3e-4
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95
  config.optimizer.warmup_steps = 390  # one epoch of CIFAR at batch 128
  config.optimizer.decay = "cosine"
  config.log_every = 100
  config.eval_every = 2000
  config.checkpoint_every = 2000
  return config
