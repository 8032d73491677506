"""--mode predict: a folder of images classified into a CSV of top-5 labels and probabilities."""

import csv

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

import run
import vit_jax
from configs import vit_digits
from vit_jax import npz


def _config(tmp_path, **extra):
  config = vit_digits.get_config()
  config.update(dict(data_dir=str(tmp_path / "data"), **extra))
  config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  return config


def test_a_folder_is_classified_into_a_csv_with_an_npz(tmp_path, capsys):
  config = _config(tmp_path)
  family, prepared = run.prepare(config, str(tmp_path / "plan"), "plan")
  model = family.model(prepared)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(  # random weights, the head too: the logits differ
      lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32),
      nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3)))["params"]))
  weights = npz.export_npz({"params": params}, str(tmp_path / "vit.npz"))
  folder = tmp_path / "images" / "nested"
  folder.mkdir(parents=True)
  for name in ("b.png", "a.png", "c.jpg"):
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / name)
  (folder / "notes.txt").write_text("not an image")
  config = _config(tmp_path, init_from=weights, predict_input=str(tmp_path / "images"))
  assert run.dispatch(config, str(tmp_path / "w"), "predict") == 0
  assert "classified 3 images" in capsys.readouterr().out
  with open(tmp_path / "w" / "predictions.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["path"] + [f"{what}_{i}" for i in range(1, 6)
                                for what in ("label", "probability")]
  assert [row[0].rsplit("/", 1)[1] for row in rows[1:]] == ["a.png", "b.png", "c.jpg"]
  for row in rows[1:]:
    probabilities = [float(p) for p in row[2::2]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
    assert len(set(row[1::2])) == 5  # five different labels
  # The first label is the model's own prediction on the preprocessed image.
  image = np.asarray(Image.open(folder / "a.png"), np.float32) / 127.5 - 1
  logits = vit_jax.create_model("custom", num_classes=10, image_size=8, **dict(
      width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=2, classifier="gap")).apply(
          {"params": params}, image[None])
  assert rows[1][1] == str(int(np.argmax(logits)))


def test_bad_input_is_one_sentence(tmp_path, capsys):
  config = _config(tmp_path, predict_input=str(tmp_path / "missing"))
  assert run.dispatch(config, str(tmp_path / "w"), "predict") == 2
  assert "config.predict_input=" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  config = _config(tmp_path, predict_input=str(tmp_path / "empty"))
  assert run.dispatch(config, str(tmp_path / "w"), "predict") == 2
  assert "holds no image file" in capsys.readouterr().err
  (tmp_path / "empty" / "x.png").write_bytes(b"")
  assert run.dispatch(config, str(tmp_path / "w"), "predict") == 2
  assert "holds no checkpoint and config.init_from is empty" in capsys.readouterr().err


def test_a_workdir_checkpoint_is_used_when_there_is_one(tmp_path, capsys):
  from common_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config = _config(tmp_path)
  family, prepared = run.read(config, str(tmp_path / "w"), "predict")
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(lambda leaf: rng.normal(0, 0.5, leaf.shape).astype(leaf.dtype),
                                  nn.meta.unbox(family.abstract_params(prepared)))
  writer = checkpoint.Checkpointer(str(tmp_path / "w"), asynchronous=False)
  writer.save(7, {"step": np.int32(7), "params": params})
  writer.close()
  folder = tmp_path / "images"
  folder.mkdir()
  Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / "x.png")
  config = _config(tmp_path, predict_input=str(folder))
  assert run.dispatch(config, str(tmp_path / "w"), "predict") == 0
  assert f"with step 7 of {tmp_path / 'w'}" in capsys.readouterr().out
  with open(tmp_path / "w" / "predictions.csv") as f:
    assert len(list(csv.reader(f))) == 2
