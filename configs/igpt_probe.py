r"""Linear probe of a pre-trained iGPT (paper Sec. 3.4): features are the average over positions
of the normalised input of block l; a linear classifier is fitted on frozen features by
closed-form ridge regression (penalty chosen by 5-fold cross-validation on the train split), for
every layer, and compared with the same probe on raw pixels.

  python run.py --config configs/igpt_probe.py:cifar10 --workdir workdirs/igpt_probe \
      --config.init_from=workdirs/igpt_s --config.palette=workdirs/igpt_s/palette.npy \
      --config.model.variant=S --mode probe

Argument: the labelled dataset (cifar10, cifar100). The model options must be those of the
pre-training run named by init_from. Expected: the paper reports 96.3% on CIFAR-10 for
iGPT-L's best layer (near the middle of the network; logistic regression there, ridge here).
Writes <workdir>/probe.json.
"""

import ml_collections

from configs import common

DATASETS = {"cifar10": 10, "cifar100": 100}


def get_config(arg: str = "cifar10") -> ml_collections.ConfigDict:
  dataset = arg or "cifar10"
  if dataset not in DATASETS:
    raise ValueError(f"igpt_probe.py: dataset {dataset!r} is unknown; use one of "
                     f"{sorted(DATASETS)}.")
  config = common.add_igpt_fields(common.base())
  config.task = "igpt_ar"
  config.model = ml_collections.ConfigDict(dict(
      variant="S", width=0, depth=0, num_heads=0, mlp_dim=0,  # 0: the variant's
      dropout_rate=0.0, dtype="float32", attention_implementation="",
      scan_layers=False, remat_policy="none"))
  config.dataset = dataset
  config.num_classes = DATASETS[dataset]
  config.image_size = 32
  config.preprocess_train = "decode|value_range(-1,1)"
  config.preprocess_eval = "decode|value_range(-1,1)"
  config.eval_batch_size = 128
  return config
