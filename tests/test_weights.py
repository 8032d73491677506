"""The one names-and-shapes check every weight format and workdir reader goes through."""

import re

import pytest

from common_jax import trees

TARGET = {"embedding/kernel": (2, 8), "embedding/bias": (8,), "block_2/mlp/kernel": (8, 8),
          "block_10/mlp/kernel": (8, 8), "norm/scale": (8,), "head/kernel": (8, 3),
          "head/bias": (3,)}
ORDER = trees.forward_order(r"^block_(\d+)/", early=("^embedding/",), late=("^norm/", "^head/"))


def check(stored, **options):
  with pytest.raises(ValueError) as error:
    trees.check_names_and_shapes(stored, TARGET, "the checkpoint at step 7 in /runs/a",
                                 fix="use the options of that run", order=ORDER, **options)
  message = str(error.value)
  assert "\n" not in message and message.endswith(".") and not re.search(r"\.\s+[A-Z]", message)
  return message


def test_the_first_key_in_forward_order_is_named_with_the_fix():
  # Blocks in numeric order (2 before 10), the head after the blocks, kernels before biases.
  stored = {k: v for k, v in TARGET.items() if k.startswith(("embedding/", "norm/"))}
  assert check(stored) == (
      "the checkpoint at step 7 in /runs/a has no `block_2/mlp/kernel` (8, 8), which the model "
      "needs; use the options of that run.")
  wider = {k: (v[0], 16) if len(v) == 2 else (16,) for k, v in TARGET.items()}
  assert check(wider, shape_fix="use its width") == (
      "`embedding/kernel` has shape (2, 16) in the checkpoint at step 7 in /runs/a but the model "
      "expects (2, 8); use its width.")
  deeper = dict(TARGET, **{"block_11/mlp/kernel": (8, 8)})
  assert check(deeper, expected_by=lambda key: f"a model of {key.count('/')} levels") == (
      "the checkpoint at step 7 in /runs/a holds `block_11/mlp/kernel` (8, 8), which a model of "
      "2 levels does not have; use the options of that run.")


def test_names_that_may_be_missing_are_skipped_and_equal_sets_pass():
  trees.check_names_and_shapes(dict(TARGET), TARGET, "x", fix="y")
  without_head = {k: v for k, v in TARGET.items() if not k.startswith("head/")}
  trees.check_names_and_shapes(without_head, TARGET, "x", fix="y",
                               may_be_missing=lambda key: key.startswith("head/"))
  assert "no `head/kernel` (8, 3)" in check(without_head)
