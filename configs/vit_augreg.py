r"""ViT pre-training with AugReg's augmentation and regularisation ("How to train your ViT?",
Steiner et al. 2021, as big_vision's vit_i1k config sets it): sigmoid cross-entropy, Adam
(0.9, 0.999) at lr 1e-3 with decoupled weight decay 0.1, 10k warm-up steps then cosine decay,
batch 4096 for 300 epochs, inception crop and flip, then the named amount of augmentation:

  aug      mixup p   RandAugment
  none     0         -
  light1   0         randaugment(2,0)   (not nothing: see common_jax/data/randaugment.py)
  light2   0.2       randaugment(2,10)
  medium1  0.2       randaugment(2,15)
  medium2  0.5       randaugment(2,15)
  strong1  0.5       randaugment(2,20)
  strong2  0.8       randaugment(2,20)

and with ",reg" dropout 0.1 and stochastic depth 0.1 (AugReg's "do_0.1-sd_0.1" runs).

  python run.py --config configs/vit_augreg.py:B/16,imagenet2012,medium2 --workdir workdirs/augreg \
      --config.data_dir=/path/to/tensorflow_datasets --config.manual_dir=/path/to/imagenet
  python run.py --config configs/vit_augreg.py:S/16,imagenet2012,medium2,reg ...

Argument: "<variant>,<dataset>,<aug>[,reg]", dataset imagenet2012 or imagenet21k. Expected
(AugReg, ImageNet-1k only, 300 epochs): ViT-B/16 about 79-80% top-1 with medium augmentation;
days of a TPU pod slice, not reproduced here.
"""

import ml_collections

from configs import vit_pretrain

AUGMENTATION = {  # aug -> (mixup p, RandAugment op or "")
    "none": (0.0, ""),
    "light1": (0.0, "randaugment(2,0)"),
    "light2": (0.2, "randaugment(2,10)"),
    "medium1": (0.2, "randaugment(2,15)"),
    "medium2": (0.5, "randaugment(2,15)"),
    "strong1": (0.5, "randaugment(2,20)"),
    "strong2": (0.8, "randaugment(2,20)"),
}


def get_config(arg: str = "B/16,imagenet2012,medium2") -> ml_collections.ConfigDict:
  parts = [part.strip() for part in (arg or "B/16,imagenet2012,medium2").split(",")]
  reg = parts[3:] == ["reg"]
  if len(parts) not in (3, 4) or (len(parts) == 4 and not reg):
    raise ValueError(f"vit_augreg.py: the argument {arg!r} is not '<variant>,<dataset>,<aug>' "
                     "or '<variant>,<dataset>,<aug>,reg'; use e.g. "
                     "--config configs/vit_augreg.py:B/16,imagenet2012,medium2.")
  variant, dataset, aug = parts[:3]
  if aug not in AUGMENTATION:
    raise ValueError(f"vit_augreg.py: aug {aug!r} is unknown; use one of {list(AUGMENTATION)}.")
  config = vit_pretrain.get_config(f"{variant},{dataset}")
  examples = vit_pretrain.DATASETS[dataset][1]
  mixup, randaugment = AUGMENTATION[aug]
  config.loss = "sigmoid"
  config.mixup = mixup
  config.preprocess_train = "|".join(
      ["decode", "inception_crop(224)", "flip_lr"] + ([randaugment] if randaugment else [])
      + ["value_range(-1,1)"])
  config.model.representation_size = 0  # AugReg's ViTs have no pre-logits layer
  config.model.dropout_rate = 0.1 if reg else 0.0
  config.model.stoch_depth = 0.1 if reg else 0.0
  config.batch_size = 4096
  config.total_steps = examples * 300 // config.batch_size
  config.optimizer.update(name="adam", learning_rate=1e-3, b1=0.9, b2=0.999, weight_decay=0.1,
                          warmup_steps=10_000, decay="cosine", grad_clip_norm=1.0)
  return config
