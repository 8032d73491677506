"""Input pipeline: tfds builders read through Grain, deterministic and resumable by construction.

    from common_jax import data
    info = data.dataset_info("sklearn_digits", data_dir)  # num_classes, splits, image_shape
    train = data.train_iterator(dataset="sklearn_digits", split="train", seed=0,
                                preprocess="decode|random_crop(8,pad=1)|flip_lr|value_range(-1,1)",
                                global_batch_size=128, start_step=step, data_dir=data_dir,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    for batch in data.eval_iterator(dataset="sklearn_digits", split="test",
                                    preprocess="decode|value_range(-1,1)", global_batch_size=256,
                                    data_dir=data_dir, process_index=..., process_count=...):
      ...  # batch["mask"] marks the real rows

`builders`: which datasets exist and how they are prepared. `preprocess`: the op registry.
`pipeline`: the iterators. Importing this package does not import TensorFlow.
"""

from common_jax.data.builders import get_builder, ImageFolder, SklearnDigits
from common_jax.data.pipeline import (check_dataset, dataset_info, DatasetInfo, eval_iterator,
                                      train_iterator)
from common_jax.data.preprocess import OPS, parse as parse_preprocess
