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

Before any compute, `check_dataset(dataset, split, ...)` and `check_preprocess(spec, field, ...)`
raise one sentence (a ValueError) for each bad input; images that cannot be decoded are
`BadImageError` sentences naming the file, or are skipped with `skip_bad_images=True`.

`builders`: which datasets exist and how they are prepared. `preprocess`: the op registry.
`pipeline`: the iterators. Importing this package does not import TensorFlow.
"""

from common_jax.data.builders import get_builder, ImageFolder, SklearnDigits
from common_jax.data.pipeline import (Batches, check_dataset, check_preprocess, dataset_info,
                                      DatasetInfo, eval_iterator, train_iterator)
from common_jax.data.preprocess import BadImageError, OPS, parse as parse_preprocess
