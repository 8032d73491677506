r"""ViT masked patch prediction pre-training, the paper's self-supervision recipe (Sec. 4.6,
Appendix B.1.2): 50% of the patch embeddings corrupted (80% a learned mask embedding, 10% another
patch's embedding, 10% unchanged), the 3-bit mean colour (512 classes) of each corrupted patch
predicted; 1M steps of batch 4096, Adam with a base learning rate of 2e-4, 10k warm-up steps,
cosine decay. Then fine-tune with configs/vit_finetune.py and init_from this workdir.

  python run.py --config configs/vit_mpp.py:B/16,imagenet2012 --workdir workdirs/mpp \
      --config.data_dir=/path/to/tensorflow_datasets --config.manual_dir=/path/to/imagenet
  python run.py --config configs/vit_finetune.py:B/16,imagenet2012 --workdir workdirs/mpp_ft \
      --config.init_from=workdirs/mpp

Argument: "<variant>,<dataset>" with dataset imagenet2012 or imagenet21k (the paper used JFT,
which is not public). Expected (paper): ViT-B/16 pre-trained this way on JFT and fine-tuned
reaches 79.9% on ImageNet, 2% above training from scratch and 4% below supervised
pre-training; days of a TPU pod slice, not reproduced here (configs/vit_digits_mpp.py runs the
same task on the bundled digits).
"""

import ml_collections

from configs import common
from configs import vit_pretrain


def get_config(arg: str = "B/16,imagenet2012") -> ml_collections.ConfigDict:
  config = vit_pretrain.get_config(arg)
  config.task = "vit_masked_patch"
  config.model.representation_size = 0  # no classifier: the head predicts per patch
  config.model.dropout_rate = 0.0
  config.mask_prob = 0.5
  config.total_steps = 1_000_000
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 2e-4
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_steps = 10_000
  config.optimizer.decay = "cosine"
  return config
