"""Image GPT (Chen et al., 2020): palette, models, tasks, KV-cache sampling, linear probes,
weights in and out (Hugging Face, OpenAI); its family for run.py is `igpt_jax.family`."""
from igpt_jax.models import ImageGPT, SIZES, abstract_variables, create_model
from igpt_jax.palette import dequantize, fit_palette, load_palette, quantize, save_palette
from igpt_jax.probe import cross_validate, extract_features, linear_probe, pixel_probe, probe_layers
from igpt_jax.sampling import sample, sample_without_cache, save_sample_grid
from igpt_jax.tasks import AutoregressiveTask, BertTask, FineTuneTask
from igpt_jax.hf import export_hf, export_hf_from_checkpoint, load_hf
from igpt_jax.openai import load_openai
from igpt_jax.pretrained import pretrained_initializer
