r"""The README's plan table: per-device memory of the paper's models under data parallelism and
FSDP over 8 devices, from `--mode plan`'s compiled step (shapes only; simulated CPU devices).

  JAX_NUM_CPU_DEVICES=8 .venv/bin/python benchmarks/plan_table.py [--device_memory_gb 80]
  JAX_NUM_CPU_DEVICES=8 .venv/bin/python benchmarks/plan_table.py --only iGPT --meshes fsdp \
      --set model.remat_policy=full --set model.scan_layers=true --set model.dtype=bfloat16

`--set field=value` overrides a config field of every recipe (values as on run.py's command
line); `--only` keeps the models whose name contains it.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run  # pylint: disable=g-import-not-at-top,wrong-import-position
from common_jax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

MODELS = (("configs/vit_pretrain.py:B/16,imagenet2012", "ViT-B/16"),
          ("configs/vit_pretrain.py:L/16,imagenet2012", "ViT-L/16"),
          ("configs/vit_pretrain.py:H/14,imagenet2012", "ViT-H/14"),
          ("configs/igpt_pretrain.py:S,imagenet32", "iGPT-S"),
          ("configs/igpt_pretrain.py:M,imagenet32", "iGPT-M"),
          ("configs/igpt_pretrain.py:L,imagenet32", "iGPT-L"))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--device_memory_gb", type=float, default=80.0)
  parser.add_argument("--batch_per_device", type=int, default=0,
                      help="0: the recipe's global batch")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--only", default="", help="models whose name contains this")
  parser.add_argument("--meshes", default="data,fsdp")
  args = parser.parse_args()
  gib = lambda n: f"{n / 2**30:.2f}"
  print("| model | mesh | global batch | params | params + Adam / device (GiB) | step "
        "temporaries / device (GiB) | fits 80 GiB | TFLOPs / example (XLA, formula) |")
  print("|---|---|---|---|---|---|---|---|")
  for recipe, name in MODELS:
    if args.only not in name:
      continue
    for mesh in args.meshes.split(","):
      config = config_lib.load_recipe(recipe)
      for assignment in args.set:
        field, _, value = assignment.partition("=")
        node = config
        *parents, leaf = field.split(".")
        for parent in parents:
          node = node[parent]
        node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else (
            value.lower() in ("1", "true", "yes"))
      config.mesh.data, config.mesh.fsdp = (-1, 1) if mesh == "data" else (1, -1)
      config.device_memory_gb = args.device_memory_gb
      if args.batch_per_device:
        config.batch_size = args.batch_per_device * 8
      family, prepared = run.prepare(config, "/nonexistent/plan_table", "plan")
      report, _ = family.plan_report(prepared)
      per_example = report.xla_flops_per_step / report.batch_size
      print(f"| {name} | {mesh} x8 | {report.batch_size} | {report.parameters / 1e6:.1f}M | "
            f"{gib(report.param_bytes_per_device + report.opt_bytes_per_device)} | "
            f"{gib(report.temp_bytes_per_device)} | {'yes' if report.fits else 'no'} | "
            f"{per_example / 1e12:.3f}, {report.formula_flops_per_example / 1e12:.3f} |",
            flush=True)


if __name__ == "__main__":
  main()
