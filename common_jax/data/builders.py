"""Dataset builders and the one function that turns a `config.dataset` string into a tfds builder.

Names accepted in `config.dataset`:
- `sklearn_digits`: the 1,797 real 8x8 digits shipped inside scikit-learn (no download).
- `image_folder:/path/to/root`: `<root>/<split>/<class>/*.png|jpg|jpeg`.
- any tfds catalogue name (`cifar10`, `imagenet2012`, `oxford_iiit_pet`, `oxford_flowers102`,
  `name:version`, `name/config`), prepared beforehand in array_record format.

Our two builders are built into `data_dir` on first use (digits: about a second). Catalogue
datasets are never downloaded here: `tfds build` (with TensorFlow, and the network or, for
ImageNet, `manual_dir`) prepares them once, and a missing one raises the command to run.

Reading without TensorFlow (checked with tfds 4.9.10, TensorFlow not installed):
- `tfds.builder(name)` loads cifar10, cifar100, imagenet2012, oxford_iiit_pet, oxford_flowers102
  and mnist; a name tfds cannot load (unknown, or a builder that imports TensorFlow) still loads
  if it is prepared in data_dir, from its dataset_info.json.
- `as_data_source()` of an array_record dataset parses each example with numpy. A
  `tfds.features.Image` is read with `SkipDecoding` (`sources.as_data_source`): its file's bytes
  reach the `decode` op, as an image folder's do, which decodes them (simplejpeg, PIL) and says
  why a file cannot be read. tests/test_data.py checks this with a stand-in builder whose Image
  feature is written from PNG bytes: encoding bytes, paths or PIL images needs no TensorFlow
  either, only encoding numpy arrays does.
- A dataset prepared as tfrecord has no random-access source; it must be rebuilt as array_record.
"""

import contextlib
import difflib
import hashlib
import io
import logging
import os
import re
from typing import Any, Iterator, Optional

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from common_jax.data.preprocess import image_error_reason

IMAGE_FOLDER_PREFIX = "image_folder:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of local data: no download checksums, no bold banners around a build of seconds."""

  # tfds looks for a checksums file next to a builder's code, and for a builder in a package that
  # lookup imports `importlib_resources`, which tfds does not declare; we download nothing.
  code_path = None

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


class SklearnDigits(_LocalBuilder):
  """The 1,797 8x8 handwritten digits of `sklearn.datasets.load_digits()`, 10 classes.

  Features: "image" uint8 [8, 8, 3] (grey levels 0..16 scaled to 0..255, replicated to RGB so
  that every dataset yields RGB), "label" int64 in [0, 10).
  Split rule (fixed, no randomness): within each class, taken in scikit-learn's order, every fifth
  example (rank % 5 == 4) is "test", the rest "train": 1,442 train / 355 test, stratified.
  """
  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {"train": self._generate_examples(is_test=False),
            "test": self._generate_examples(is_test=True)}

  def _generate_examples(self, is_test: bool):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target
    rank_in_class = np.zeros(len(labels), np.int64)
    for label in range(10):
      members = np.flatnonzero(labels == label)
      rank_in_class[members] = np.arange(len(members))
    for index in np.flatnonzero((rank_in_class % 5 == 4) == is_test):
      image = np.repeat(images[index][:, :, None], 3, axis=2)
      yield int(index), {"image": image, "label": int(labels[index])}


class ImageFolder(_LocalBuilder, skip_registration=True):
  """Images in `<root>/<split>/<class>/*.png|jpg|jpeg`; class names sorted alphabetically -> ids.

  Features: "image" the encoded file bytes (object scalar; the `decode` op turns them into uint8
  [height, width, 3]), "label" int64, "path" the file's path below the root (utf-8 bytes), so
  that an image that cannot be decoded is named by its file. Storing the bytes keeps TensorFlow
  out of the build. Records are in listing order (split, class, file name sorted): example i of a
  split is its i-th file.
  The builder config is named after the root and a hash of its file listing (paths, sizes and
  modification times), so editing the folder makes a fresh build instead of reading a stale one.
  The build reads each file's header (not its pixels) and records, per split, in
  `info.metadata["image_folder"]` (see `folder_report`): the files whose header no image reader
  understands (text, empty or cut-short files), and one example of each of the first few image
  sizes, which lets the pipeline refuse such a folder, or a preprocessing that leaves sizes
  varying, before any compute.
  """
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "a 'path' feature, listing order, header report in the metadata"}

  def __init__(self, *, root: str, **kwargs):
    if not root.strip():
      raise ValueError(f"config.dataset={IMAGE_FOLDER_PREFIX!r} names no folder; write "
                       f"config.dataset='{IMAGE_FOLDER_PREFIX}/path/to/root' with images in "
                       "root/<split>/<class>/.")
    self.root = os.path.abspath(os.path.expanduser(root.strip()))
    self.files = _list_image_folder(self.root)  # {split: [(relative path, class name)]}
    self.class_names = sorted({name for files in self.files.values() for _, name in files})
    listing = hashlib.sha256()
    listing.update(self.root.encode())
    for split in sorted(self.files):
      for relative_path, _ in self.files[split]:
        stat = _os_call(os.stat, self.root, relative_path)
        listing.update(f"{relative_path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    basename = re.sub(r"[^a-zA-Z0-9_]", "_", os.path.basename(self.root)) or "root"
    config = tfds.core.BuilderConfig(name=f"{basename}_{listing.hexdigest()[:12]}")
    super().__init__(config=config, **kwargs)
    # tfds pickles a builder as `_original_state` and unpickles it by calling `__init__` with it;
    # the base class records only its own arguments, which lack `root`. (The pipeline does not
    # pickle builders: its sources reopen the prepared directory, see sources.SplitSource.)
    self._original_state = dict(root=self.root, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Images under {self.root}.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.ClassLabel(names=self.class_names),
            "path": tfds.features.Tensor(shape=(), dtype=np.object_),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # records in listing order: example i is file i of the split
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # The images are local.
    return {split: self._generate_examples(split, files) for split, files in self.files.items()}

  def _generate_examples(self, split, files):
    unreadable, num_unreadable, sizes = [], 0, {}
    for index, (relative_path, class_name) in enumerate(files):
      image = _os_call(_read_bytes, self.root, relative_path)
      try:
        with PIL.Image.open(io.BytesIO(image)) as header:  # reads the header only
          width, height = header.size
        sizes.setdefault((height, width), index)
      except Exception as error:  # pylint: disable=broad-except  # any reader failure
        num_unreadable += 1
        if len(unreadable) < MAX_REPORTED:
          unreadable.append([index, relative_path, image_error_reason(error)])
      yield index, {"image": image, "label": class_name, "path": relative_path.encode()}
    report = self.info.metadata.setdefault(FOLDER_REPORT, {})
    report[split] = {
        "unreadable": unreadable, "num_unreadable": num_unreadable,
        "sizes": [[height, width, index] for (height, width), index in list(sizes.items())[:4]],
        "num_sizes": len(sizes)}


FOLDER_REPORT = "image_folder"
MAX_REPORTED = 100  # unreadable files listed by name per split (all are counted)


def folder_report(builder: tfds.core.DatasetBuilder, split: str) -> Optional[dict[str, Any]]:
  """What an image folder's build found in `split` (a plain split name), or None for other
  builders: {"unreadable": [[index, path, reason], ...] (the first 100), "num_unreadable": int,
  "sizes": [[height, width, index of an example of that size], ...] (the first 4 sizes),
  "num_sizes": int}."""
  metadata = builder.info.metadata
  if metadata is None or FOLDER_REPORT not in metadata:
    return None
  return metadata[FOLDER_REPORT].get(split)


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _os_call(function, root: str, relative_path: str = ""):
  """function(root/relative_path), an OSError (permissions, a vanishing file) in one sentence."""
  path = os.path.join(root, relative_path) if relative_path else root
  try:
    return function(path)
  except OSError as error:
    raise ValueError(
        f"config.dataset='{IMAGE_FOLDER_PREFIX}{root}' cannot be read: {path} gives "
        f"{error.strerror or error}; make the folder readable or fix the path.") from None


def _list_image_folder(root: str) -> dict[str, list[tuple[str, str]]]:
  """{split: sorted [(path relative to root, class name)]} for `<root>/<split>/<class>/<image>`.

  Names starting with "." (e.g. .ipynb_checkpoints, .DS_Store) are ignored; a class folder
  without images, or images directly in a split folder, are errors (a class would be lost, or the
  layout lacks its class level).
  """
  layout = (f"config.dataset='{IMAGE_FOLDER_PREFIX}PATH' expects "
            "PATH/<split>/<class>/<image>.png|jpg|jpeg")
  if not os.path.isdir(root):
    what = "is a file" if os.path.exists(root) else "does not exist"
    raise ValueError(f"{layout}, but {root} {what}; fix the path.")
  visible = lambda names: sorted(name for name in names if not name.startswith("."))
  is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS)
  files = {}
  for split in visible(_os_call(os.listdir, root)):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      continue
    split_files = []
    for class_name in visible(_os_call(os.listdir, split_dir)):
      class_dir = os.path.join(split_dir, class_name)
      if not os.path.isdir(class_dir):
        if is_image(class_name):
          raise ValueError(
              f"{layout}, but the image {class_dir} sits directly in the split folder {split}; "
              f"move each image into a folder named after its class, as in {split}/<class>/"
              f"{class_name}, or point PATH one level up if {split} is a class.")
        continue
      images = [name for name in visible(_os_call(os.listdir, class_dir)) if is_image(name)]
      if not images:
        raise ValueError(
            f"{layout}, but the class folder {class_dir} holds no .png, .jpg or .jpeg file; add "
            "its images or remove the folder.")
      split_files.extend((os.path.join(split, class_name, name), class_name) for name in images)
    if split_files:
      files[split] = split_files
  if not files:
    raise ValueError(f"{layout}, but no such images were found under {root}; fix the path.")
  return files


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Hides tfds progress bars and info/warning logs (e.g. 'Using custom data configuration')."""
  # tfds has a setter for its progress bars but no getter; read the flag to restore it after.
  progress_bar_was_on = tqdm_utils._active  # pylint: disable=protected-access
  absl_logger = logging.getLogger("absl")
  previous_level = absl_logger.level
  tfds.display_progress_bar(False)
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    tfds.display_progress_bar(progress_bar_was_on)
    absl_logger.setLevel(previous_level)


def _prepare_hint(name: str, data_dir: Optional[str], manual_dir: Optional[str]) -> str:
  command = (f"tfds build {name} --file_format=array_record "
             f"--data_dir={data_dir or '~/tensorflow_datasets'}")
  if manual_dir or name.startswith("imagenet"):
    command += f" --manual_dir={manual_dir or 'DIR_WITH_THE_ILSVRC2012_TARS'}"
  return (f"prepare it once where TensorFlow is installed, `pip install tensorflow && {command}`, "
          "and point config.data_dir at that directory.")


def get_builder(dataset: str, data_dir: Optional[str] = None,
                manual_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """Returns a prepared builder readable with `as_data_source()`; builds our own sets on first use.

  Args:
    dataset: the `config.dataset` string (see the module docstring).
    data_dir: where prepared datasets live (None: tfds' default, `$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`).
    manual_dir: only quoted in the preparation hint of manually downloaded sets (ImageNet).

  Raises:
    ValueError (one sentence naming config.dataset or config.data_dir): unknown or malformed
      name, image folder without images or laid out wrongly, catalogue dataset not prepared or
      prepared in a format without random access, a data_dir where our sets cannot be built.
  """
  if not isinstance(dataset, str) or not dataset.strip():
    raise ValueError(f"config.dataset={dataset!r} names no dataset; use 'sklearn_digits', "
                     f"'{IMAGE_FOLDER_PREFIX}/path/to/root' or a catalogue name such as 'cifar10'.")
  with quiet_tfds():
    if dataset == "sklearn_digits":
      builder = SklearnDigits(data_dir=data_dir, file_format=ARRAY_RECORD)
    elif dataset.startswith(IMAGE_FOLDER_PREFIX):
      builder = ImageFolder(root=dataset[len(IMAGE_FOLDER_PREFIX):], data_dir=data_dir,
                            file_format=ARRAY_RECORD)
    else:
      try:
        builder = tfds.builder(dataset, data_dir=data_dir)
      except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(_unknown_dataset(dataset, data_dir)) from None
      except Exception as error:  # pylint: disable=broad-except  # ValueError, AssertionError
        # A malformed name ('image-folder:/x'), or a version or config the dataset lacks.
        if not re.fullmatch(r"[a-z0-9_]+(/[\w.-]+)?(:[\d*]+\.[\d*]+\.[\d*]+)?", dataset.strip()):
          raise ValueError(_unknown_dataset(dataset, data_dir)) from None
        reason = re.split(r"\.\s", " ".join(str(error).split('": ')[-1].split()) + " ")[0]
        raise ValueError(f"config.dataset={dataset!r} cannot be loaded by tfds ({reason}); fix "
                         "the version or config after the name, or use the plain name.") from None
      if not builder.is_prepared():
        raise ValueError(f"config.dataset={dataset!r} is not prepared in {builder.data_dir}; "
                         + _prepare_hint(dataset, data_dir, manual_dir))
      if ARRAY_RECORD not in builder.info.available_file_formats():
        raise ValueError(
            f"config.dataset={dataset!r} is prepared in {builder.data_dir} as "
            f"{builder.info.file_format.value}, which has no random access; re-"
            + _prepare_hint(dataset, data_dir, manual_dir))
      return builder
    if not builder.is_prepared():
      try:
        builder.download_and_prepare(file_format=ARRAY_RECORD)
      except OSError as error:
        # Processes sharing a data_dir may build at once: tfds writes to a temporary directory
        # and renames it into place, so the loser of the race finds the winner's build there.
        if builder.is_prepared():
          return get_builder(dataset, data_dir, manual_dir)
        raise ValueError(
            f"config.dataset={dataset!r} cannot be built into config.data_dir="
            f"{data_dir or '(the tfds default)'!s}: {error.strerror or error} "
            f"({getattr(error, 'filename', None) or builder.data_dir}); point config.data_dir at "
            "a writable directory.") from None
  return builder


def _unknown_dataset(dataset: str, data_dir: Optional[str]) -> str:
  names = ["sklearn_digits"] + list(tfds.list_builders(with_community_datasets=False))
  close = difflib.get_close_matches(dataset.strip().split(":")[0].split("/")[0].lower(), names, n=1)
  if dataset.lower().replace("-", "_").startswith(("image_folder", "imagefolder")):
    hint = f"; for a folder of images write '{IMAGE_FOLDER_PREFIX}/path/to/root' exactly"
  elif close:
    hint = f"; the closest name is {close[0]!r}"
  else:
    hint = ("; use 'sklearn_digits', 'image_folder:/path/to/root' or a catalogue name such as "
            "'cifar10'")
  return (f"config.dataset={dataset!r} is neither ours nor a tfds dataset in the catalogue or "
          f"prepared in config.data_dir ({data_dir or 'the tfds default'}){hint}.")
