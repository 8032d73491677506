r"""ViT supervised pre-training, the paper's recipe (Sec. 4.1 / Appendix B.1): Adam (0.9, 0.999),
batch 4096, linear warm-up of 10k steps, decoupled weight decay, gradient clipping at norm 1,
dropout 0.1, a representation (pre-logits) layer as wide as the model, resolution 224.

  python run.py --config configs/vit_pretrain.py:B/16,imagenet2012 --workdir workdirs/pt \
      --config.data_dir=/path/to/tensorflow_datasets --config.manual_dir=/path/to/imagenet
  python run.py --config configs/vit_pretrain.py:B/16,imagenet21k \
      --config.mesh.data=1 --config.mesh.fsdp=-1 ...

Argument: "<variant>,<dataset>" with dataset imagenet2012 (300 epochs, lr 3e-3, weight decay
0.3, cosine decay: the paper's ImageNet-1k setting) or imagenet21k (90 epochs, lr 1e-3, weight
decay 0.03, linear decay). imagenet21k is not in the tfds catalogue: prepare it as a tfds
dataset of that name in data_dir, or use "image_folder:<root>" as config.dataset.
Expected (paper, Table 5): ViT-B/16 pre-trained on ImageNet-21k and fine-tuned reaches
~84% on ImageNet; ImageNet-1k-only pre-training gives ~78% top-1 after fine-tuning. Pre-training
takes days on a TPU-v3 pod slice; nothing here is reproduced on a CPU.
"""

import ml_collections

from configs import common
from vit_jax import models as vit_models

# dataset -> (classes, train examples, epochs, lr, weight decay, decay)
DATASETS = {
    "imagenet2012": (1000, 1_281_167, 300, 3e-3, 0.3, "cosine"),
    "imagenet21k": (21843, 13_000_000, 90, 1e-3, 0.03, "linear"),
}


def get_config(arg: str = "B/16,imagenet2012") -> ml_collections.ConfigDict:
  variant, dataset = common.variant_and_dataset(arg, "B/16,imagenet2012", "vit_pretrain.py")
  if dataset not in DATASETS:
    raise ValueError(f"vit_pretrain.py: dataset {dataset!r} is unknown; use one of "
                     f"{sorted(DATASETS)}.")
  classes, examples, epochs, lr, weight_decay, decay = DATASETS[dataset]
  width = vit_models.parse_variant(variant)["width"]
  config = common.add_vit_fields(common.base())
  config.model = ml_collections.ConfigDict(dict(
      # Shape fields: 0 = the variant's number.
      variant=variant, width=0, depth=0, mlp_dim=0, num_heads=0, patch_size=0,
      # The paper's pre-training head: a pre-logits layer as wide as the model.
      classifier="token", posemb="learn", posemb_where="first", representation_size=width,
      dropout_rate=0.1, dtype="float32", gelu_approximate=True, attention_implementation="",
      scan_layers=False, remat_policy="none", stoch_depth=0.0))
  config.dataset = dataset
  config.num_classes = classes
  config.train_split = "train"
  config.eval_split = "validation"
  config.image_size = 224
  config.preprocess_train = "decode|inception_crop(224)|flip_lr|value_range(-1,1)"
  config.preprocess_eval = "decode|resize_small(256)|central_crop(224)|value_range(-1,1)"
  config.batch_size = 4096
  config.eval_batch_size = 1024
  config.total_steps = examples * epochs // config.batch_size
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = lr
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.weight_decay = weight_decay
  config.optimizer.warmup_steps = 10_000
  config.optimizer.decay = decay
  config.optimizer.grad_clip_norm = 1.0
  config.data_workers = 16
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 2000
  return config
