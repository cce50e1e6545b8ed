"""Releases: a spec (``release.toml``) in, a verifiable folder out.

- ``spec``: parses and checks the TOML; knows nothing of LoRA: extension keys (``[[lora]]``) are
  parsed by hooks that other modules register.
- ``lora``: the ``[[lora]]`` entries (merge before quantizing, or a side-car file); registers its
  spec hook when imported, which this package does below so every entry point sees it.
- ``build``: converts every variant in one pass and writes the manifest, SHA256SUMS, model card.
- ``modelcard``: the Hub model card; ``rederive``: re-derives a release from its source weights.
- ``signing``: ``model.sig`` (OpenSSF model-signing): signs a built folder, checks a signature
  against a key, CA chain or Sigstore identity, and describes it for the manifest and model card.

May import: the converter core, ``converter.lora``, ``converter.hub`` (remote sources), ``quant_kernels``,
``manifests``. Never: ``converter.cli``, ``converter.quality``.
"""
from __future__ import annotations

from . import lora as _lora  # noqa: F401  (registers the [[lora]] spec hook before any spec is parsed)
