"""Vision Transformer models, tasks and checkpoint interop."""
from vit_jax.models import VisionTransformer, create_model, parse_variant, SIZES
