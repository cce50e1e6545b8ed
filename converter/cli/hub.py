"""``flux-gguf upload`` and ``flux-gguf download``, and the ``--remote`` check ``flux-gguf verify`` runs.

A thin layer over converter/hub/: parse and reject conflicting flags up front, show progress
on stderr, print results (or ``--json`` on stdout), and turn every library error into one line.
The Hub token is never accepted on the command line or printed: huggingface_hub finds it.
"""
from __future__ import annotations

import pathlib
from typing import Any, Iterator

import click

from converter.hub.download import download_release
from converter.hub.remote import UNEXPECTED, RemoteReport, verify_remote_release
from converter.hub.upload import plan_upload, upload_release
from manifests import ManifestError

from .output import GB, echo_json, errors_as_click, increment_bar, one_line, printable
from .signing_options import trust_from, trust_options


@click.command("upload")
@click.argument("release_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.argument("repo_id")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created from main if missing), or refs/pr/N.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--message", "-m", help="Commit message (default: 'Upload <release name> (flux-gguf <version>)').")
@click.option("--dry-run", is_flag=True, help="Verify the folder and list what would be sent; contact nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@trust_options
@errors_as_click
def upload(release_dir: pathlib.Path, repo_id: str, revision: str | None, private: bool, create_pr: bool,
           message: str | None, dry_run: bool, as_json: bool, **trust_opts: Any) -> None:
    """Verify a release folder, publish it to a Hub model repo, and check the Hub's copy against its manifest.

    The folder must verify (every file re-hashed against manifest.json) or nothing is sent. An
    interrupted upload resumes when re-run: files the Hub already holds are not sent again. The
    token comes from HF_TOKEN or `hf auth login`.

    \b
    Example:
      flux-gguf upload out/release me/FLUX.1-Kontext-dev-GGUF --create-pr
    """
    if create_pr and revision is not None:
        raise click.UsageError(f"--create-pr and --revision {revision} cannot be used together: a pull request is "
                               "always opened against main (to add to an open one, use --revision refs/pr/N alone)")
    _check_signature_before_upload(release_dir, trust_from(**trust_opts))  # signed releases: model.sig (#13)
    with increment_bar("verifying") as progress:
        plan = plan_upload(release_dir, repo_id, revision=revision, create_pr=create_pr, private=private,
                               progress=progress)
    target = f"{plan.repo_id} ({'pull request against main' if create_pr else 'branch ' + (revision or 'main')})"
    if dry_run:
        if as_json:
            return echo_json({"dry_run": True, **plan.to_json()})
        click.echo(f"Would upload {len(plan.files)} files ({plan.total_bytes / GB:.3f} GB) from {release_dir} "
                   f"to {target} via {plan.transfer.upper()}:")
        for f in plan.files:
            click.echo(f"  {f.size:>15,}  {f.sha256}  {printable(f.path)}")
        return
    if not as_json:
        click.echo(f"Verified {len(plan.files)} files ({plan.total_bytes / GB:.3f} GB); uploading to {target}")
    result = upload_release(plan, message=message)
    if as_json:
        return echo_json(result.to_json())
    click.echo(f"URL:    {printable(result.url)}")  # what the Hub answered, and file names: escaped
    click.echo(f"Commit: {printable(result.commit_url)}")
    if result.pr_url:
        click.echo(f"Pull request: {printable(result.pr_url)}")
    counts = result.report.counts()
    line = f"Hub copy verified: {counts['ok']} files match the manifest (size and sha256)"
    if counts["unexpected"]:
        extra = ", ".join(printable(f.path) for f in result.report.files if f.status == UNEXPECTED)
        line += f"; the repo also holds files outside this release: {extra}"
    click.echo(line)


@click.command("download")
@click.argument("repo_id")
@click.option("--revision", metavar="REV", help="Branch, tag or commit (default: main).")
@click.option("--include", "include", multiple=True, metavar="PATTERN",
              help="Only artifacts matching this glob (repeatable); default: all.")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Folder to download into (created if missing).")
@click.option("--force", is_flag=True, help="Replace files already in the folder that differ from the release "
              "(by default the command refuses, naming the file, before downloading anything).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@trust_options
@errors_as_click
def download(repo_id: str, revision: str | None, include: tuple[str, ...], output: pathlib.Path, as_json: bool,
             force: bool = False, **trust_opts: Any) -> None:
    """Download a release from the Hub, checking every file's size and sha256 against its manifest.

    Files arrive under a hidden partial name (.NAME.flux-gguf.partial) and get their name only
    once verified; files already present with the right bytes are kept. A file already there with
    other bytes is never replaced unless --force is given. On a mismatch the command fails naming
    the file, and nothing you already had is deleted.

    The release's manifest.json and SHA256SUMS (the whole release's, also with --include) are
    written last. If the folder already holds a different manifest.json or SHA256SUMS (another
    release, or another commit), the command fails naming it before downloading anything and
    leaves it as it is: give each release a folder of its own.

    \b
    Example:
      flux-gguf download me/FLUX.1-Kontext-dev-GGUF --include '*Q4_K_M*' -o models/
    """
    trust = trust_from(**trust_opts)
    signature = None
    with increment_bar("downloading") as progress:
        if trust is not None:  # signed releases (#13): model.sig checked before and after the transfer
            from converter.release.signing import download_signed
            result, signature = download_signed(repo_id, output, trust, revision=revision, include=include,
                                                progress=progress, force=force)
        else:
            result = download_release(repo_id, output, revision=revision, include=include, progress=progress,
                                      force=force)
    if as_json:
        return echo_json(result.to_json() | ({"signature": signature.to_json()} if signature else {}))
    if signature is not None:
        click.echo(f"signature   {printable(signature.detail)}")
    for f in result.files:  # names from the release's manifest: escaped
        click.echo(f"{f.action:<10}  {f.size:>15,}  {printable(f.path)}")
    click.echo(f"{len(result.files)} files verified against the manifest of {printable(repo_id)} at commit "
               f"{printable(result.commit)} in {printable(output)}")


def _remote_report_lines(report: RemoteReport) -> Iterator[str]:
    paths = [printable(f.path) for f in report.files]  # names and details from the Hub: escaped
    width = max(map(len, paths), default=4)
    for f, path in zip(report.files, paths):
        how = {"lfs": "sha256 from the Hub's LFS metadata", "content": "small file fetched and hashed"}.get(f.source or "", "")
        yield f"{f.status:<10}  {path:<{width}}  {printable(f.detail) if not f.ok else how}".rstrip()
    counts = ", ".join(f"{n} {s}" for s, n in report.counts().items() if n)
    yield printable(f"{report.repo_id}@{report.revision or 'main'} (commit {report.commit})") + f": {counts}"


@errors_as_click
def run_remote_verify(release_dir: pathlib.Path, remote: str, as_json: bool = False) -> None:
    """What ``flux-gguf verify DIR --remote REPO_ID[@REV]`` does: compare DIR's manifest with the Hub's
    metadata (no large file is downloaded), print one line per file, fail if anything differs."""
    report = verify_remote_release(release_dir, remote)
    if as_json:
        echo_json(report.to_json())
    else:
        for line in _remote_report_lines(report):
            click.echo(line)
    if not report.ok:
        names = ", ".join(f"{f.path} ({f.status})" for f in report.problems)
        raise click.ClickException(one_line(f"{report.repo_id} does not match the manifest of {release_dir}: {names}"))


remote_option = click.option(
    "--remote", metavar="REPO_ID[@REV]",
    help="Instead of re-hashing local files, check the Hub repo's files against DIR's manifest "
         "(sizes and LFS sha256; nothing large is downloaded).")
"""Decorator the ``verify`` command adds; when given, it calls :func:`run_remote_verify`."""


def _check_signature_before_upload(release_dir: pathlib.Path, trust: Any) -> None:
    """With a key (chain, identity): model.sig must verify over the folder, or nothing is sent. Either way
    the manifest and the folder must agree on whether the release is signed (model.sig present)."""
    from converter.release.signing import NOT_READ, SigningError, check_signature
    from manifests import MANIFEST_NAME, load_manifest

    try:
        declared = load_manifest(release_dir / MANIFEST_NAME).signature
    except (OSError, ManifestError):
        if trust is None:
            return  # plan_upload reports an unreadable manifest in its own words
        declared = NOT_READ
    check = check_signature(release_dir, trust, declared=declared)
    if not check.ok:
        raise SigningError(f"{release_dir}: {check.detail}; refusing to upload")
