"""Preprocessing ops named in a config string, big_vision style.

    "decode|random_crop(8,pad=1)|flip_lr|value_range(-1,1)"             small images, train
    "decode|inception_crop(224)|flip_lr|value_range(-1,1)"               ImageNet-like, train
    "decode|resize_small(256)|central_crop(224)|value_range(-1,1)"       ImageNet-like, eval

`parse` turns such a string into one function `(example, rng) -> example`; `check` also makes
sure a whole config string starts with `decode` (`pipeline.check_preprocess` is the full check,
every error one sentence naming the config field). Each op name maps, in the `OPS` dict below
(the whole registry), to a factory (in `common_jax.data.ops`): called with the op's literal
arguments it checks them and returns `op(example, rng) -> example`. An example is a dict
of numpy values; "image" is encoded bytes or an array before `decode`, uint8 [height, width, 3]
after it, float32 [height, width, 3] after `value_range`. Random ops draw only from the
`np.random.Generator` they are handed, which the pipeline seeds from (seed, position of the example
in the stream): augmentation is then reproducible and independent of threads or resumption.
Adding an op is a factory in ops.py plus one line in `OPS`; the loop never changes.

The pipeline stops each example before a final `value_range` (`parse_for_batches`), keeping it
uint8, and writes that value_range straight into the example's row of the float32 batch: the
same bits (tests/test_data.py checks), a quarter of the bytes per example, no float32 copy.
"""

import ast
import inspect
from typing import Callable, Optional, Sequence

import numpy as np

# The ops (common_jax/data/ops.py); their names here are what the pipeline and tests use.
from common_jax.data.ops import (  # pylint: disable=unused-import
    BadImageError, Example, Op, central_crop, decode, flip_lr, image_error_reason,
    inception_crop, random_crop, resize, resize_small, value_range)
from common_jax.data.randaugment import randaugment


OPS: dict[str, Callable[..., Op]] = {
    "decode": decode,
    "resize": resize,
    "resize_small": resize_small,
    "central_crop": central_crop,
    "random_crop": random_crop,
    "inception_crop": inception_crop,
    "flip_lr": flip_lr,
    "randaugment": randaugment,
    "value_range": value_range,
}


def usage(name: str) -> str:
  """"random_crop(size, pad=0)": an op's arguments as a config string writes them."""
  parameters = inspect.signature(OPS[name]).parameters.values()
  arguments = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in parameters]
  return f"{name}({', '.join(arguments)})"


def _parse_op(text: str, spec: str, field: str) -> tuple[str, Op]:
  """One op string, `name` or `name(literal args)`, -> (name, the op the factory returns)."""
  where = f"{field}={spec!r} has the op {text!r}"
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError:
    node = None
  if isinstance(node, ast.Name):
    name, call = node.id, ast.Call(func=node, args=[], keywords=[])
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name, call = node.func.id, node
  else:
    raise ValueError(f"{where}, which is not of the form name or name(args) (ops are separated "
                     "by '|'); write for example 'decode|resize(224)|value_range(-1,1)'.")
  if name not in OPS:
    raise ValueError(f"{where}, which is unknown; known ops are {', '.join(OPS)}.")
  try:
    args = [ast.literal_eval(arg) for arg in call.args]
    kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
  except ValueError:
    raise ValueError(f"{where}, with an argument that is not a plain number or list; the op "
                     f"is {usage(name)}.") from None
  try:
    inspect.signature(OPS[name]).bind(*args, **kwargs)
  except TypeError as error:
    raise ValueError(f"{where}, whose arguments do not fit: {error}; the op is "
                     f"{usage(name)}.") from None
  try:
    return name, OPS[name](*args, **kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{where}, with a bad argument: {error}; the op is {usage(name)}.") from None


def parse_ops(spec: str, field: str = "preprocess") -> list[tuple[str, Op]]:
  """"op1|op2(args)|..." -> [(op name, op)], each op checked; errors name `field`."""
  if not isinstance(spec, str):
    raise ValueError(f"{field}={spec!r} is not a string; write ops separated by '|', such as "
                     "'decode|value_range(-1,1)'.")
  if not spec.strip():
    raise ValueError(f"{field} is empty; start it with 'decode', as in "
                     "'decode|value_range(-1,1)'.")
  return [_parse_op(text.strip(), spec, field) for text in spec.split("|")]


def _compose(ops: Sequence[Op]) -> Op:
  def preprocess(example: Example, rng: np.random.Generator) -> Example:
    for op in ops:
      example = op(example, rng)
    return example
  return preprocess


def output_size(spec: str, field: str = "preprocess") -> Optional[tuple[int, int]]:
  """The (height, width) of the images `spec` leaves, from the string alone: that of its last op
  that sets the size (resize, the crops), or None where that depends on the images (none such,
  or resize_small last)."""
  size = None
  for _, op in parse_ops(spec, field):
    size = getattr(op, "output_size", size)
  return size


def parse(spec: str, field: str = "preprocess") -> Op:
  """"op1|op2(args)|..." -> one function (example, rng) -> example applying the ops in order.

  Only the ops themselves are checked (a single op such as "inception_crop(224)" parses);
  `check` adds what a whole pipeline string needs.

  Raises:
    ValueError naming `field` and the op string, for an unknown op, a syntax error or bad
    arguments.
  """
  return _compose([op for _, op in parse_ops(spec, field)])


def parse_for_batches(spec: str, field: str = "preprocess"
                      ) -> tuple[Op, Callable[[np.ndarray, np.ndarray], None]]:
  """`parse`, split for a pipeline that stacks examples into float32 batches:
  (per_example, finish).

  per_example(example, rng) applies every op but a final `value_range`, so "image" is still
  uint8 after `decode` and the geometric ops; finish(image, out) writes that final value_range of
  `image` (without one: `image` as float32) into `out`, a float32 row of the batch. Then
  finish(per_example(example, rng)["image"], out) puts `parse(spec)(example, rng)["image"]` into
  `out`, bit for bit (tests/test_data.py checks), with no float32 image per example: the
  examples travel and are stacked as uint8, a quarter of the bytes.
  """
  ops = [op for _, op in parse_ops(spec, field)]
  finish = getattr(ops[-1], "into", None)
  if finish is not None:
    ops = ops[:-1]
  else:
    finish = _cast_into
  return _compose(ops), finish


def _cast_into(image: np.ndarray, out: np.ndarray) -> None:
  out[...] = image  # as image.astype(np.float32)


def check(spec: str, field: str) -> list[str]:
  """Checks a pipeline string as `config.preprocess_*` holds it; returns the op names.

  Besides `parse`'s checks: it starts with `decode` (which turns what a dataset stores, encoded
  bytes or an array, into uint8 RGB), and `decode` appears only there.

  Raises:
    ValueError, one sentence naming `field`, the op and the fix.
  """
  names = [name for name, _ in parse_ops(spec, field)]
  if names[0] != "decode":
    raise ValueError(f"{field}={spec!r} starts with {spec.split('|')[0].strip()!r}; start it "
                     f"with 'decode', which turns the stored image into uint8 RGB, as in "
                     f"'decode|{spec.strip()}'.")
  if "decode" in names[1:]:
    raise ValueError(f"{field}={spec!r} decodes twice; keep only the first 'decode' (a later one "
                     "would cast processed pixels back to uint8).")
  return names
