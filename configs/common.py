"""Fields every recipe shares, with their defaults. Recipes start from `base()` and override."""

import ml_collections


def base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "vit_classification"
  config.seed = 0

  # Data: a tfds dataset name ("sklearn_digits", "cifar10", ...) or "image_folder:<root>".
  config.dataset = "sklearn_digits"
  config.data_dir = ""  # tfds data_dir; "" = tfds's default (~/tensorflow_datasets)
  config.manual_dir = ""  # for datasets that need manual download (imagenet2012)
  config.train_split = "train"
  config.eval_split = "test"
  config.num_classes = 10
  config.image_size = 8
  config.preprocess_train = "decode|value_range(-1,1)"
  config.preprocess_eval = "decode|value_range(-1,1)"
  config.data_workers = 0  # 0 = decode in threads of this process
  config.data_cache = False  # True: hold the train split in memory (small datasets only)
  config.skip_bad_images = False  # True: skip (and count) images that cannot be decoded

  config.batch_size = 128  # global, over all devices and processes
  config.eval_batch_size = 128
  config.accum_steps = 1  # gradient accumulation: microbatches of batch_size / accum_steps
  config.total_steps = 1000

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, warmup_steps=0, decay="cosine", end_learning_rate=0.0,
      weight_decay=0.0, b1=0.9, b2=0.999, momentum=0.9, grad_clip_norm=1.0,
      moment_dtype="float32",  # first moment (Adam's mu, SGD's momentum): float32 or bfloat16
      ema_decay=0.0))  # > 0: evaluate the parameters' moving average (Polyak), e.g. 0.9999

  # Mesh axis sizes; -1 = the remaining devices. Pure data parallel: data=-1.
  # FSDP: data=1, fsdp=-1. Both: e.g. data=2, fsdp=-1.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical-axis -> mesh-axis rules; empty = common_jax.sharding.DEFAULT_RULES.
  config.sharding_rules = ()

  # Pre-trained weights: the workdir of an earlier run (its latest checkpoint), or for ViT an
  # official .npz or a timm .safetensors file; "" = train from scratch.
  config.init_from = ""

  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 3  # >= 1; the newest K are kept
  # A non-finite loss or gradient norm: "stop" (exit status 3, nothing bad saved) or "skip" the
  # update and count it (train/skipped_steps).
  config.on_nonfinite = "stop"
  # A resumed run refuses a config that changes its trajectory (optimiser, data, model, seed,
  # batch) unless this is True; total_steps may grow.
  config.allow_config_change = False
  # --mode plan: memory of one accelerator in GiB to check the plan against (e.g. 80 for an
  # H100, 16 for a TPU v5e core); 0 = what the device reports (nothing on CPU).
  config.device_memory_gb = 0.0
  # --mode sweep: one run per entry "<name>: <field>=<value>, ..." (common_jax/sweep.py).
  config.sweep = ()
  return config


def add_vit_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fields only the ViT tasks read."""
  config.label_smoothing = 0.0  # training targets only; 0 = off (the paper uses none)
  # --mode fewshot: ridge regression on frozen pre-logit features with this many training
  # examples per class (drawn from train_split, config.fewshot_seeds draws), accuracy on eval_split.
  config.fewshot_shots = (1, 5, 10, 25)
  config.fewshot_seeds = 3
  config.fewshot_l2 = 1024.0  # 2**10, as big_vision
  config.eval_top5 = False  # evaluations also report top5_accuracy
  config.fewshot_in_eval = False  # every evaluation also runs the few-shot evaluation
  config.mask_prob = 0.5  # task vit_masked_patch: the fraction of patches corrupted
  config.loss = "softmax"  # "softmax" or "sigmoid" cross-entropy (AugReg pre-trains with sigmoid)
  config.mixup = 0.0  # mixup: p of Beta(p, p) (AugReg: 0.2 or 0.5); 0 = none
  config.predict_input = ""  # --mode predict: the folder of images to classify
  config.predict_output = ""  # --mode predict: the CSV written; "" = <workdir>/predictions.csv
  return config


def add_igpt_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fields of the iGPT tasks and of the palette, sample and probe modes."""
  config.palette = ""  # [k, 3] .npy colour centres; "" = <workdir>/palette.npy
  config.palette_clusters = 512  # k of the k-means palette
  config.palette_iterations = 20  # Lloyd iterations of the palette mode
  config.palette_max_pixels = 2**20  # pixels of the train split the palette is fitted on
  config.mask_prob = 0.15  # BERT: each position masked independently with this probability
  config.probe_layers = ()  # probe mode: layers in [0, depth]; () = all
  # probe mode: ridge penalties, chosen per layer (and for the pixels) by probe_folds-fold
  # cross-validation on the train split; probe_folds=0 needs a single penalty, e.g. (1e-3,).
  config.probe_l2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
  config.probe_folds = 5
  config.sample = ml_collections.ConfigDict(dict(
      num_images=8,  # test images whose top half is the prompt
      num_samples=4,  # completions per image
      prompt_fraction=0.5,  # share of the raster sequence given as prompt
      temperature=1.0,
      top_k=0,  # 0 = sample from all clusters
      seed=0))
  return config


def variant_and_dataset(arg: str, default: str, recipe: str):
  """Splits a recipe argument "<variant>,<dataset>" (e.g. "B/16,cifar10"), naming the fix."""
  parts = (arg or default).split(",")
  if len(parts) != 2 or not all(parts):
    raise ValueError(f"{recipe}: the argument {arg!r} is not '<variant>,<dataset>'; use e.g. "
                     f"--config configs/{recipe}:{default}.")
  return parts[0].strip(), parts[1].strip()
