"""``flux-gguf inspect``: what a checkpoint or GGUF file holds (headers only)."""
from __future__ import annotations


import click

from converter.hub.source import is_hub_spec, open_any_source
from converter.inspect_files import inspect_path, inspect_source

from .output import GB, echo_json, printable


@click.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def inspect(path: str, as_json: bool) -> None:
    """Show a safetensors file/folder or GGUF file: model, variant, tensor table, type histogram, size.

    PATH may be on the Hub: hf://OWNER/REPO[@REVISION][/PATH.safetensors] (headers by range requests).

    \b
    Example:
      flux-gguf inspect out/flux1-kontext-dev-Q4_K_M.gguf
    """
    if is_hub_spec(path):  # hf://OWNER/REPO[@REV][/PATH]: the headers by range requests
        with open_any_source(path) as source:
            report = inspect_source(source, path)
    else:
        report = inspect_path(path)
    if as_json:
        echo_json(report.to_dict(), default=str)
        return
    # every string below may come from the file (names, metadata, the detector's message): escaped
    click.echo(f"path:         {printable(report.path)}")
    layout = f" ({printable(report.layout)} layout)" if report.layout else ""
    click.echo(f"kind:         {report.kind}{layout}")
    click.echo(f"size:         {report.size / GB:.3f} GB ({report.size:,} bytes)")
    click.echo(f"architecture: {printable(report.architecture or 'unknown')}")
    click.echo(f"family:       {printable(report.family or 'unknown')}")
    if report.kind == "gguf":
        click.echo(f"variant:      {printable(report.variant or 'unknown')} (general.file_type "
                   f"{printable(report.file_type)})")
        listed = ("general.name", "flux_gguf.tool_version", "flux_gguf.recipe", "flux_gguf.model_family",
                 "flux_gguf.overrides", "flux_gguf.source")
        extra = sorted(k for k in report.metadata if k.startswith("flux_gguf.") and k not in listed)
        for key in (*listed, *extra):  # every flux_gguf.* key; extra: e.g. flux_gguf.loras (merged LoRAs)
            if key in report.metadata:
                click.echo(f"{printable(key)}: {printable(report.metadata[key])}")
    if report.problem:
        click.echo(f"problem:      {printable(report.problem)}")
    click.echo(f"tensors:      {len(report.tensors)} ({report.n_params:,} parameters)")
    click.echo("types:        " + " ".join(f"{printable(k)}:{v}" for k, v in report.type_counts.items()))
    names = [printable(t.name) for t in report.tensors]
    width = max(map(len, names), default=4)
    click.echo("")
    click.echo(f"{'name':<{width}}  {'type':<7} {'shape':<16} {'bytes':>12}")
    for t, name in zip(report.tensors, names):
        shape = "[" + ", ".join(str(d) for d in t.shape) + "]"
        click.echo(f"{name:<{width}}  {printable(t.type):<7} {shape:<16} {t.nbytes:>12,}")
