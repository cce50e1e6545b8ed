"""Quality and speed: how far a GGUF file is from its source, and how fast it runs.

- ``tensor_error``: per-tensor error (relative RMSE, max abs, cosine) and summaries.
- ``probes``: seeded Kontext-shaped transformer inputs; ``diffusers_model``: the diffusers glue
  (loading BF16/GGUF transformers, forward passes), imported lazily: converting needs neither.
- ``validate``: tensor error plus output drift; ``pipeline_check``: a rendered edit, SSIM/PSNR;
  ``bench``: load time, peak memory, seconds per step.

May import: the converter core, ``converter.hub`` and ``converter.lora`` (sources, merges),
``quant_kernels``, ``manifests``; torch and diffusers lazily. Never: ``converter.release``, ``converter.cli``.
"""
