"""flux-gguf: FLUX.1 safetensors -> quantized GGUF, releases, LoRAs, Hub publishing."""
from __future__ import annotations

__version__ = "0.1.0"
