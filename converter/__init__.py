"""flux-gguf: FLUX.1 safetensors -> quantized GGUF, releases, LoRAs, Hub publishing.

This package's own modules are the conversion pipeline, read -> plan -> quantize -> write:
``layout`` (the FLUX tensor table), ``errors``, ``safetensors_io``, ``sources`` and
``diffusers_names`` (read BFL / ComfyUI / diffusers checkpoints), ``detect`` (which model),
``recipes`` (the plan: a type per tensor), ``writer`` (streamed GGUF), ``pipeline`` (all of it in
one pass), ``synthetic`` (generated checkpoints) and ``inspect_files``. They may import only each
other, ``quant_kernels`` and ``manifests``.

Above them, each in a subpackage that imports only downward (``tests/test_layers.py`` checks):
``lora`` and ``hub`` -> ``release`` and ``quality`` -> ``cli``.
"""
from __future__ import annotations

__version__ = "0.1.0"
