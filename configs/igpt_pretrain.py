r"""iGPT generative pre-training, the paper's recipe (Chen et al., 2020, Sec. 3-4): a 512-colour
palette, sequences of 32x32 = 1024 cluster ids, Adam (0.9, 0.95), batch 128, learning rate warmed
up for one epoch then cosine decay to 0, no dropout, no weight decay.

  python run.py --config configs/igpt_pretrain.py:S,imagenet32 --workdir workdirs/igpt_s --mode palette
  python run.py --config configs/igpt_pretrain.py:S,imagenet32 --workdir workdirs/igpt_s
  python run.py --config configs/igpt_pretrain.py:L,imagenet32 --workdir workdirs/igpt_l \
      --config.mesh.data=1 --config.mesh.fsdp=-1 --config.model.dtype=bfloat16

Argument: "<variant>,<dataset>" with variant S/M/L/XL and dataset imagenet32
(tfds `imagenet_resized/32x32`, prepared in data_dir) or any 32x32 tfds dataset (cifar10).
The paper trains for 1M steps (2M at batch 64 for XL) and tunes the learning rate over
{0.01, 0.003, 0.001, 0.0003}, keeping the first local minimum; 1e-3 is the default here.
Expected: the paper's iGPT-L reaches 96.3% CIFAR-10 linear-probe accuracy after this
pre-training (on ImageNet); a run takes weeks of accelerator time and is not reproduced here.
"""

import ml_collections

from configs import common

DATASETS = {
    "imagenet32": ("imagenet_resized/32x32", 1_281_167, "train", "validation", 1000),
    "cifar10": ("cifar10", 50_000, "train", "test", 10),
}


def get_config(arg: str = "S,imagenet32") -> ml_collections.ConfigDict:
  variant, dataset = common.variant_and_dataset(arg, "S,imagenet32", "igpt_pretrain.py")
  if dataset not in DATASETS:
    raise ValueError(f"igpt_pretrain.py: dataset {dataset!r} is unknown; use one of "
                     f"{sorted(DATASETS)}.")
  name, examples, train_split, eval_split, classes = DATASETS[dataset]
  config = common.add_igpt_fields(common.base())
  config.task = "igpt_ar"
  config.model = ml_collections.ConfigDict(dict(
      variant=variant, width=0, depth=0, num_heads=0, mlp_dim=0,  # 0: the variant's
      dropout_rate=0.0, dtype="float32", attention_implementation="",
      scan_layers=False, remat_policy="none"))
  config.dataset = name
  config.train_split = train_split
  config.eval_split = eval_split
  config.num_classes = classes
  config.image_size = 32
  config.preprocess_train = "decode|resize(32)|value_range(-1,1)"
  config.preprocess_eval = "decode|resize(32)|value_range(-1,1)"
  config.palette_clusters = 512
  config.batch_size = 64 if variant == "XL" else 128
  config.eval_batch_size = 128
  config.total_steps = 2_000_000 if variant == "XL" else 1_000_000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95
  config.optimizer.warmup_steps = examples // config.batch_size  # one epoch
  config.optimizer.decay = "cosine"
  config.optimizer.weight_decay = 0.0
  config.data_workers = 8
  config.log_every = 100
  config.eval_every = 10_000
  config.checkpoint_every = 5000
  return config
