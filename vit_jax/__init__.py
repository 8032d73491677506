"""Vision Transformer models, tasks and checkpoint interop."""
from vit_jax.models import VisionTransformer, create_model, parse_variant, SIZES
from vit_jax.interop import (export_from_checkpoint, export_npz, export_safetensors, load_npz,
                             load_safetensors, pretrained_initializer)
