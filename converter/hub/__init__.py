"""The Hugging Face Hub: publish a release, check it remotely, download it verified.

- ``client``: the ``HfApi`` client, repo specs, Hub errors translated into ours, streamed reads.
- ``remote``: compare a repo's files (Hub metadata, LFS sha256) with a release manifest.
- ``upload``: verify locally, upload, read the Hub's metadata back.
- ``download``: fetch the manifest, then each file into a partial name, hashed as it arrives.
- ``source``: ``hf://OWNER/REPO[@REV][/PATH]`` checkpoints read by range requests, no local copy
  (``open_any_source`` turns any SRC string into an opened Source for the pipeline).

May import: the converter core, ``manifests``. Never: ``converter.release``, ``converter.quality``,
``converter.lora``, ``converter.cli`` (release and quality sit above it and may use it).
"""
