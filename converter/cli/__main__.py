"""``python -m converter.cli``: the flux-gguf command (what ``torchrun -m converter.cli imatrix ...`` runs)."""
from converter.cli import main

if __name__ == "__main__":
    main(prog_name="flux-gguf")
