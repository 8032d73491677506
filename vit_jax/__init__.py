"""Vision Transformer models, tasks and weights in and out (official .npz, timm .safetensors);
its family (tasks, config fields, checks, modes for run.py) is `vit_jax.family`."""
from vit_jax.models import VisionTransformer, create_model, parse_variant, SIZES
from vit_jax.npz import export_npz, load_npz
from vit_jax.pretrained import export_from_checkpoint, pretrained_initializer
from vit_jax.timm import export_safetensors, load_safetensors
