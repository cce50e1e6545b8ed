"""The signing options ``release build``, ``verify``, ``upload`` and ``download`` share, and their output.

The work is in :mod:`converter.release.signing` (OpenSSF model-signing); this module only turns
options into a :class:`~converter.release.signing.SigningRequest` or
:class:`~converter.release.signing.Trust`, and verdicts into lines.
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

import click

from converter.release.signing import (
    SignatureCheck,
    SigningError,
    SigningRequest,
    Trust,
    read_key_file,
    signing_request,
    trust_from_options,
)

from .output import printable

F = TypeVar("F", bound=Callable[..., Any])
# No exists/dir_okay checks here: click would answer a folder with a usage error (exit 2). Every file
# is checked when read (converter.release.signing.read_key_file): regular files of at most 1 MiB,
# a folder, FIFO or device refused in one Error: line naming the option.
_FILE = click.Path(path_type=pathlib.Path)


def sign_options(fn: F) -> F:
    """``release build``: --sign-key [--sign-password-file], --sign-certificate/--sign-chain, --sign-sigstore."""
    options = [
        click.option("--sign-key", type=_FILE, default=None, metavar="KEY.pem",
                     help="Sign the release (model.sig, OpenSSF model-signing) with this EC private key (PEM)."),
        click.option("--sign-password-file", type=_FILE, default=None, metavar="FILE",
                     help="The private key's password, read from FILE (one trailing newline is dropped)."),
        click.option("--sign-certificate", type=_FILE, default=None, metavar="CERT.pem",
                     help="Certificate signing: the signing certificate of --sign-key (needs --sign-chain)."),
        click.option("--sign-chain", type=_FILE, multiple=True, metavar="CHAIN.pem",
                     help="Certificate signing: the CA certificates above --sign-certificate (repeatable)."),
        click.option("--sign-sigstore", is_flag=True,
                     help="Sign keyless with Sigstore (OIDC login or ambient credentials; needs the network)."),
        click.option("--sign-oidc-issuer", default=None, metavar="URL",
                     help="With --sign-sigstore: the OIDC issuer to log in with (default: Sigstore's)."),
        click.option("--sign-identity-token-file", type=_FILE, default=None, metavar="FILE",
                     help="With --sign-sigstore: an OIDC identity token read from FILE (CI), instead of a login."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def request_from(sign_key: pathlib.Path | None, sign_password_file: pathlib.Path | None,
                 sign_certificate: pathlib.Path | None, sign_chain: tuple[pathlib.Path, ...], sign_sigstore: bool,
                 sign_oidc_issuer: str | None, sign_identity_token_file: pathlib.Path | None) -> SigningRequest | None:
    token = None
    if sign_identity_token_file is not None:
        raw = read_key_file(sign_identity_token_file, "identity token", "--sign-identity-token-file")
        try:
            token = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SigningError(f"{sign_identity_token_file}: the identity token is not UTF-8 text") from None
        if not token:
            raise SigningError(f"{sign_identity_token_file}: the identity token file is empty")
    return signing_request(key=sign_key, password_file=sign_password_file, certificate=sign_certificate,
                           chain=sign_chain, sigstore=sign_sigstore, oidc_issuer=sign_oidc_issuer, identity_token=token)


def trust_options(fn: F) -> F:
    """``verify``, ``upload``, ``download``: what the signature must verify against."""
    options = [
        click.option("--public-key", type=_FILE, default=None, metavar="PUB.pem",
                     help="model.sig must verify with this EC public key (PEM)."),
        click.option("--certificate-chain", type=_FILE, multiple=True, metavar="CHAIN.pem",
                     help="model.sig must verify through this CA chain (repeatable)."),
        click.option("--identity", default=None, metavar="ID",
                     help="Sigstore: the signer's identity (e.g. an e-mail address); needs --issuer."),
        click.option("--issuer", default=None, metavar="URL", help="Sigstore: the signer's OIDC issuer."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def trust_from(public_key: pathlib.Path | None, certificate_chain: tuple[pathlib.Path, ...],
               identity: str | None, issuer: str | None) -> Trust | None:
    return trust_from_options(public_key=public_key, certificate_chain=certificate_chain, identity=identity,
                              issuer=issuer)


def signature_line(check: SignatureCheck) -> str:
    return f"{'signature':<10}  {check.status}: {printable(check.detail)}"  # names identities and files: escaped
