"""Signed releases: ``model.sig``, an OpenSSF model-signing bundle over every file of a release.

All cryptography is the ``model-signing`` library's (sigstore/model-transparency): it hashes the
files, builds the in-toto statement, signs it and checks signatures. This module decides *what*
is signed and turns the library's results into our verdicts:

- :func:`prepare_signer` checks the key (password, curve), certificate and chain before any
  conversion work, and says how the release will be signed (:class:`SignatureInfo`, recorded in
  the manifest and the model card).
- :func:`sign_release` signs a finished folder: the library hashes every file once (the only
  extra read signing costs), each digest must equal the one the build computed while writing
  (so the read doubles as the check that the folder on disk is the release we built), and only
  then is ``model.sig`` written; the signature is checked back before the caller renames the
  folder into place.
- :func:`check_signature` is what ``verify`` runs: the library checks the bundle against the
  trusted key, chain or identity, then every file of the folder is compared with the signed
  digests (sha256 that ``verify`` just computed, or the library's hashing), so a changed byte, a
  file added or removed, an edited ``model.sig`` or the wrong key each get a one-line reason. :func:`check_subset` does the same for the files an
  ``--include`` download fetched, naming those it did not.

The signature is written like ``model_signing sign`` writes it (sha256 per file, ``model.sig``
and git files ignored), so ``model_signing verify key DIR --signature DIR/model.sig --public_key
PUB.pem`` accepts our releases.
"""
from __future__ import annotations

import base64
import errno
import fnmatch
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from converter.errors import OutputError, ReleaseError
from manifests import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    format_sha256sums,
    hash_bytes,
)
from manifests.hashing import read_regular, write_bytes_atomic

METHODS = ("key", "certificate", "sigstore")
HASH_ALGORITHM = "sha256"  # model-signing's default, and what our manifest records: digests compare directly

VERIFIED, UNSIGNED, NOT_CHECKED, INVALID = "verified", "unsigned", "not-checked", "invalid"

KEY_FILE_LIMIT = 1 << 20
"""Keys, certificates, chains, passwords and identity tokens are read whole, up to 1 MiB (a PEM key
is a few hundred bytes, a chain a few KB): a sparse file, /dev/zero, a FIFO or a folder is refused
at once, never read."""
SIGNATURE_LIMIT = 1 << 20
"""``model.sig`` is read whole, up to 1 MiB, before it is parsed (a model-signing bundle is a few KB
even with a certificate chain and a transparency-log entry)."""


class SigningError(ReleaseError):
    """A key, certificate, chain or signature cannot be used, or a signature does not verify."""


SIGN_EXTRA = "pip install 'flux-gguf[sign]'"


def require_library() -> None:
    """Signing and checking signatures need the ``[sign]`` extra (model-signing, pyopenssl, which
    model-signing imports without declaring it); everything else, including an unchecked
    "signature present" verdict, works without it. One line, naming the install command."""
    try:
        import model_signing  # noqa: F401
        import OpenSSL  # noqa: F401
    except ImportError as e:
        raise SigningError(f"signatures need the model-signing library ({e.name} is not installed): {SIGN_EXTRA}") from None


# --------------------------------------------------------------------------------------------
# What signing records


@dataclass(frozen=True)
class SignatureInfo:
    """How a release is signed: the manifest's ``signature`` object."""

    method: str
    key_sha256: str | None = None
    certificate_subject: str | None = None
    certificate_issuer: str | None = None
    certificate_sha256: str | None = None
    oidc_issuer: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": SIGNATURE_NAME, "method": self.method}
        for key in ("key_sha256", "certificate_subject", "certificate_issuer", "certificate_sha256", "oidc_issuer"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> SignatureInfo | None:
        if doc is None:
            return None
        return cls(doc["method"], doc.get("key_sha256"), doc.get("certificate_subject"),
                   doc.get("certificate_issuer"), doc.get("certificate_sha256"), doc.get("oidc_issuer"))

    def describe(self) -> str:
        if self.method == "key":
            return f"signed with an EC key (public key sha256 {self.key_sha256})"
        if self.method == "certificate":
            return f"signed with the certificate {self.certificate_subject} (issued by {self.certificate_issuer})"
        return "signed with Sigstore (keyless)" + (f", OIDC issuer {self.oidc_issuer}" if self.oidc_issuer else "")


def verify_commands(info: SignatureInfo) -> list[str]:
    """What a user runs in the release folder to check the signature (ours, and the library's own CLI)."""
    if info.method == "key":
        return ["flux-gguf verify . --public-key PUBLIC_KEY.pem",
                f"model_signing verify key . --signature {SIGNATURE_NAME} --public_key PUBLIC_KEY.pem"]
    if info.method == "certificate":
        return ["flux-gguf verify . --certificate-chain CA_CHAIN.pem",
                f"model_signing verify certificate . --signature {SIGNATURE_NAME} --certificate_chain CA_CHAIN.pem"]
    issuer = info.oidc_issuer or "https://accounts.google.com"
    return [f"flux-gguf verify . --identity SIGNER_IDENTITY --issuer {issuer}",
            (f"model_signing verify sigstore . --signature {SIGNATURE_NAME} --identity SIGNER_IDENTITY "
            f"--identity_provider {issuer}")]


def card_section(info: SignatureInfo | Mapping[str, Any]) -> list[str]:
    """Model-card lines: the release is signed, by what, and the commands that check it."""
    if not isinstance(info, SignatureInfo):
        info = SignatureInfo.from_json(info)  # type: ignore[assignment]
    assert isinstance(info, SignatureInfo)
    what = {"key": f"with an elliptic-curve key; its public key's sha256 (the key hint in `{SIGNATURE_NAME}`) is "
                   f"`{info.key_sha256}`. Get the public key from the publisher, not from this repo",
            "certificate": f"with the certificate `{info.certificate_subject}` issued by `{info.certificate_issuer}` "
                           f"(sha256 `{info.certificate_sha256}`); check it against the publisher's CA chain",
            "sigstore": "with Sigstore (keyless: the signer's OIDC identity, Fulcio certificate, Rekor log entry)"}
    return ["## Signature", "",
            (f"`{SIGNATURE_NAME}` is an [OpenSSF model-signing](https://github.com/sigstore/model-transparency) "
            f"signature over every file of this release, made {what[info.method]}. `SHA256SUMS` proves the "
            "files are intact; the signature proves who published them:"), "",
            "```sh", *verify_commands(info), "```", ""]


# --------------------------------------------------------------------------------------------
# Signing


@dataclass(frozen=True)
class SigningRequest:
    """What ``release build --sign-*`` asked for; checked by :func:`prepare_signer`."""

    method: str
    private_key: Path | None = None
    password_file: Path | None = None
    certificate: Path | None = None
    chain: tuple[Path, ...] = ()
    oidc_issuer: str | None = None
    identity_token: str | None = None
    use_staging: bool = False


def signing_request(*, key: str | os.PathLike[str] | None = None, password_file: str | os.PathLike[str] | None = None,
                    certificate: str | os.PathLike[str] | None = None,
                    chain: Sequence[str | os.PathLike[str]] = (), sigstore: bool = False,
                    oidc_issuer: str | None = None, identity_token: str | None = None,
                    use_staging: bool = False) -> SigningRequest | None:
    """The options of ``release build`` as one request (None: unsigned); conflicting options are refused."""
    if sigstore:
        if key is not None or certificate is not None or chain or password_file is not None:
            raise SigningError("--sign-sigstore signs keyless (an OIDC identity); it cannot be combined with "
                               "--sign-key, --sign-password-file, --sign-certificate or --sign-chain")
        return SigningRequest("sigstore", oidc_issuer=oidc_issuer, identity_token=identity_token,
                              use_staging=use_staging)
    if oidc_issuer is not None or identity_token is not None or use_staging:
        raise SigningError("the OIDC issuer, identity token and staging options only apply with --sign-sigstore")
    if key is None:
        if certificate is not None or chain or password_file is not None:
            raise SigningError("--sign-certificate, --sign-chain and --sign-password-file need --sign-key "
                               "(the private key that signs)")
        return None
    if (certificate is None) != (not chain):
        raise SigningError("certificate signing needs both --sign-certificate (the signing certificate) and "
                           "--sign-chain (the CA certificates above it)")
    if certificate is not None:
        if password_file is not None:
            raise SigningError("--sign-password-file: model-signing's certificate signer takes an unencrypted key "
                               "only; decrypt it first (openssl ec -in KEY.pem -out PLAIN.pem)")
        return SigningRequest("certificate", Path(key), certificate=Path(certificate),
                              chain=tuple(Path(c) for c in chain))
    return SigningRequest("key", Path(key), password_file=Path(password_file) if password_file is not None else None)


@dataclass
class PreparedSigner:
    """A checked request: how the release will be signed, and what the self-check after signing trusts."""

    request: SigningRequest
    info: SignatureInfo
    password: bytes | None = None
    public_key_pem: bytes | None = None

    def library_config(self) -> Any:
        """A ``model_signing.signing.Config`` with our signer (built late: Sigstore's touches the network)."""
        from model_signing import signing

        r = self.request
        try:
            if r.method == "key":
                return signing.Config().use_elliptic_key_signer(private_key=r.private_key, password=self.password)
            if r.method == "certificate":
                return signing.Config().use_certificate_signer(private_key=r.private_key, signing_certificate=r.certificate,
                                                               certificate_chain=r.chain)
            return signing.Config().use_sigstore_signer(oidc_issuer=r.oidc_issuer, identity_token=r.identity_token,
                                                        use_staging=r.use_staging,
                                                        use_ambient_credentials=r.identity_token is None)
        except Exception as e:  # noqa: BLE001  (the library raises many kinds; each becomes one line)
            raise SigningError(f"cannot set up {r.method} signing: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def read_key_file(path: str | os.PathLike[str], what: str, option: str) -> bytes:
    """The bytes of a key, certificate, chain, password or token file given as ``option``: a regular
    file of at most :data:`KEY_FILE_LIMIT` bytes, or one line naming the option, the file and why not."""
    try:
        return read_regular(path, KEY_FILE_LIMIT)
    except OSError as e:
        raise SigningError(f"{option} {path}: cannot read the {what}: {_file_problem(path, e)}") from None


def _file_problem(path: str | os.PathLike[str], e: OSError) -> str:
    if e.errno == errno.EINVAL and e.strerror == "not a regular file":  # manifests.hashing.open_regular
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else None)
        return f"it is {kind}, not a regular file" if kind else "not a regular file"
    return e.strerror or str(e)


def _public_pem(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_ec(public_key: Any, path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SigningError(f"{path}: model-signing signs with elliptic-curve keys (P-256, P-384, P-521); this key is "
                           f"{type(public_key).__name__.lstrip('_').replace('PublicKey', '')}")
    if public_key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise SigningError(f"{path}: curve {public_key.curve.name} is not supported by model-signing "
                           "(P-256, P-384 or P-521)")


def _load_private_key(path: Path, password: bytes | None) -> Any:
    from cryptography.hazmat.primitives import serialization

    data = read_key_file(path, "private key", "--sign-key")
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as e:  # cryptography: encrypted key without a password, or a password for a plain key
        if password is None:
            raise SigningError(f"{path}: the private key is encrypted; give its password with --sign-password-file") from None
        raise SigningError(f"{path}: {_reason(e)}") from None
    except ValueError:
        hint = " or the password is wrong" if password is not None else ""
        raise SigningError(f"{path}: not a PEM private key{hint}") from None
    _check_ec(key.public_key(), path)
    return key


def prepare_signer(request: SigningRequest) -> PreparedSigner:
    """Check the key material up front (before hours of conversion) and say how the release will be signed."""
    require_library()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    if request.method == "sigstore":
        return PreparedSigner(request, SignatureInfo("sigstore", oidc_issuer=request.oidc_issuer))
    password = None
    if request.password_file is not None:
        raw = read_key_file(request.password_file, "password", "--sign-password-file")
        password = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
        if not password:
            raise SigningError(f"{request.password_file}: the password file is empty")
    assert request.private_key is not None
    key = _load_private_key(request.private_key, password)
    pem = _public_pem(key.public_key())
    if request.method == "key":
        return PreparedSigner(request, SignatureInfo("key", key_sha256=hashlib.sha256(pem).hexdigest()), password, pem)
    assert request.certificate is not None
    try:
        cert = x509.load_pem_x509_certificate(read_key_file(request.certificate, "signing certificate",
                                                            "--sign-certificate"))
    except ValueError:
        raise SigningError(f"{request.certificate}: not a PEM X.509 certificate") from None
    if _public_pem(cert.public_key()) != pem:
        raise SigningError(f"{request.certificate}: its public key is not the one of {request.private_key}")
    if not _can_sign(cert):
        raise SigningError(f"{request.certificate}: allows neither digitalSignature (KeyUsage) nor codeSigning "
                           "(ExtendedKeyUsage); model-signing refuses such a certificate when verifying")
    for path in request.chain:
        try:
            if not x509.load_pem_x509_certificates(read_key_file(path, "certificate chain", "--sign-chain")):
                raise ValueError
        except ValueError:
            raise SigningError(f"{path}: holds no PEM X.509 certificate (expected the CA chain)") from None
    info = SignatureInfo("certificate", certificate_subject=cert.subject.rfc4514_string(),
                         certificate_issuer=cert.issuer.rfc4514_string(),
                         certificate_sha256=cert.fingerprint(hashes.SHA256()).hex())
    return PreparedSigner(request, info, None, pem)


def _can_sign(cert: Any) -> bool:
    from cryptography import x509
    from cryptography.x509 import oid

    try:
        if cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature:
            return True
    except x509.ExtensionNotFound:
        pass
    try:
        return oid.ExtendedKeyUsageOID.CODE_SIGNING in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False


def _release_hashing(name: str, files: Sequence[str], expected: Mapping[str, str] | None) -> Any:
    """model-signing's default hashing (sha256 per file, model.sig and git files ignored), over exactly ``files``,
    with the model named ``name`` (the folder is still ``NAME.partial`` when it is signed). With ``expected``
    every digest must equal the one the build computed, or nothing is signed."""
    from model_signing import hashing, manifest

    class ReleaseHashing(hashing.Config):
        def hash(self, model_path: Any, *, files_to_hash: Iterable[Any] | None = None) -> Any:
            root = Path(model_path)
            got = super().hash(root, files_to_hash=[root / f for f in files])
            digests = {rd.identifier: rd.digest.digest_hex for rd in got.resource_descriptors()}
            if expected is not None:
                bad = sorted(p for p in expected if digests.get(p) != expected[p])
                if bad or set(digests) != set(expected):
                    raise SigningError(f"{root}: on disk, {', '.join(bad) or 'the file list'} differ(s) from what the "
                                       "build wrote; not signed")
            items = [manifest.FileManifestItem(path=PurePosixPath(rd.identifier), digest=rd.digest)
                     for rd in got.resource_descriptors()]
            return manifest.Manifest(name, items, manifest.SerializationType.from_args(got.serialization_type))

    return ReleaseHashing().set_ignored_paths(paths=[SIGNATURE_NAME])


def release_digests(manifest: Manifest, manifest_sha256: str) -> dict[str, str]:
    """Every file of a built release and the sha256 the build computed for it: what gets signed."""
    sums = {a.path: a.sha256 for a in manifest.artifacts} | {MANIFEST_NAME: manifest_sha256}
    return sums | {CHECKSUMS_NAME: hash_bytes(format_sha256sums(sums)).sha256}


@dataclass(frozen=True)
class SignResult:
    info: SignatureInfo
    files: int
    bytes_hashed: int
    seconds: float  # hashing + signing + the check back


def sign_release(folder: str | os.PathLike[str], signer: PreparedSigner, *, name: str,
                 expected: Mapping[str, str]) -> SignResult:
    """Write ``folder/model.sig`` over exactly the files ``expected`` lists (path -> sha256 the build computed).

    The library reads each file once; a digest that differs from ``expected`` fails before anything is
    signed. The written signature is then checked back with the matching public key or chain (Sigstore
    signatures are not: that needs the network and the signer's identity).
    """
    root = Path(folder)
    sig = root / SIGNATURE_NAME
    files = sorted(expected)
    total = sum((root / f).stat().st_size for f in files)
    hashing = _release_hashing(name, files, expected)
    config = signer.library_config().set_hashing_config(hashing)
    start = time.perf_counter()
    try:
        # What Config.sign does, minus its Path.write_text: model.sig is written here like every
        # other file of a release (a partial name, fsync, rename), so a full disk or an I/O error
        # while it is stored is an error of the build, never a short or unsynced signature.
        from model_signing._signing import signing as library_signing

        bundle = config._signer.sign(library_signing.Payload(hashing.hash(root))).bundle.to_json()
    except SigningError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SigningError(f"{root}: model-signing could not sign the release: {_reason(e)}") from None
    try:
        write_bytes_atomic(sig, bundle.encode("utf-8"))
    except OSError as e:
        raise OutputError(f"{sig} was not written: {e.strerror or e}") from None
    if signer.info.method != "sigstore":
        with tempfile.TemporaryDirectory(prefix="flux-gguf-sig-") as tmp:
            if signer.info.method == "key":
                pub = Path(tmp) / "public.pem"
                pub.write_bytes(signer.public_key_pem or b"")
                trust = Trust("key", public_key=pub)
            else:
                trust = Trust("certificate", chain=signer.request.chain)
            try:
                signed = read_signed(sig, trust)
            except SigningError as e:
                sig.unlink(missing_ok=True)
                raise SigningError(f"{sig}: the signature just written does not verify with the given "
                                   f"{'key' if trust.method == 'key' else '--sign-chain'}: {e}") from None
        if signed.digests != dict(expected):
            sig.unlink(missing_ok=True)
            raise SigningError(f"{sig}: the signed digests are not the release's; not signed")
    return SignResult(signer.info, len(files), total, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Verifying


@dataclass(frozen=True)
class Trust:
    """What the user trusts: a public key, a CA chain, or a Sigstore identity and issuer."""

    method: str
    public_key: Path | None = None
    chain: tuple[Path, ...] = ()
    identity: str | None = None
    issuer: str | None = None

    def describe(self) -> str:
        if self.method == "key":
            return f"the public key {self.public_key}"
        if self.method == "certificate":
            return "the certificate chain " + ", ".join(str(c) for c in self.chain)
        return f"the identity {self.identity} (issuer {self.issuer})"


def trust_from_options(*, public_key: str | os.PathLike[str] | None = None,
                       certificate_chain: Sequence[str | os.PathLike[str]] = (),
                       identity: str | None = None, issuer: str | None = None) -> Trust | None:
    """``--public-key`` / ``--certificate-chain`` / ``--identity --issuer`` as one :class:`Trust` (or None)."""
    given = [bool(public_key), bool(certificate_chain), identity is not None or issuer is not None]
    if any(given):
        require_library()
    if sum(given) > 1:
        raise SigningError("give one of --public-key, --certificate-chain or --identity/--issuer")
    if public_key is not None:
        read_key_file(public_key, "public key", "--public-key")  # a FIFO or a folder: one line now
        return Trust("key", public_key=Path(public_key))
    if certificate_chain:
        for c in certificate_chain:
            read_key_file(c, "certificate chain", "--certificate-chain")
        return Trust("certificate", chain=tuple(Path(c) for c in certificate_chain))
    if identity is not None or issuer is not None:
        if identity is None or issuer is None:
            raise SigningError("Sigstore verification needs both --identity (who signed) and --issuer (their OIDC issuer)")
        return Trust("sigstore", identity=identity, issuer=issuer)
    return None


@dataclass(frozen=True)
class SignedContent:
    """What a signature that verified says: the model name and every file's sha256."""

    name: str
    digests: dict[str, str]
    ignore_paths: tuple[str, ...]


def _verifier(trust: Trust) -> Any:
    from model_signing import verifying

    try:
        # The files are checked again here (the library reads them by name): one replaced by a FIFO
        # or a huge file since trust_from_options is refused, not read.
        if trust.method == "key":
            assert trust.public_key is not None
            read_key_file(trust.public_key, "public key", "--public-key")
            return verifying.Config().use_elliptic_key_verifier(public_key=trust.public_key)
        if trust.method == "certificate":
            for c in trust.chain:
                read_key_file(c, "certificate chain", "--certificate-chain")
            return verifying.Config().use_certificate_verifier(certificate_chain=trust.chain)
        return verifying.Config().use_sigstore_verifier(identity=str(trust.identity), oidc_issuer=str(trust.issuer))
    except SigningError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SigningError(f"cannot use {trust.describe()}: {_reason(e)}") from None


class _Checked:
    """Bytes already read and size-checked, for a library reader that takes a path and only calls
    ``read_text`` on it: a model.sig swapped for a FIFO or a huge file after the check is never read."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read_text(self, encoding: str = "utf-8") -> str:
        return self._data.decode(encoding)


def read_signed(signature: str | os.PathLike[str], trust: Trust) -> SignedContent:
    """Check the bundle against ``trust`` with the library (no model file is read) and return what it signs.

    Uses the library's verifier objects directly (``verifying.Config.verify`` would also re-hash the
    folder, and cannot check a subset); the checks are exactly those ``Config.verify`` runs first.
    """
    require_library()
    from model_signing._signing import sign_sigstore, sign_sigstore_pb

    path = Path(signature)
    config = _verifier(trust)
    try:
        data = read_regular(path, SIGNATURE_LIMIT)
    except OSError as e:
        hint = " (a model-signing bundle is a few KB)" if e.errno == errno.EFBIG else ""
        raise SigningError(f"{path}: cannot read: {_file_problem(path, e)}{hint}") from None
    try:
        reader = sign_sigstore.Signature if trust.method == "sigstore" else sign_sigstore_pb.Signature
        bundle = reader.read(_Checked(data))  # parsed from the bytes checked above, not read again
    except Exception as e:  # noqa: BLE001  (bad JSON, not a bundle)
        raise SigningError(f"{path}: not a model-signing bundle ({_reason(e)})") from None
    try:
        signed = config._verifier.verify(bundle)  # the library's signature and trust check
    except Exception as e:  # noqa: BLE001
        reason = _reason(e)
        if type(e).__name__ == "InvalidSignature":
            reason = "the signature does not match its content (model.sig was altered, or made with another key)"
        raise SigningError(f"does not verify with {trust.describe()}: {reason}") from None
    params = signed.serialization_type
    if params.get("method") != "files" or params.get("hash_type") != HASH_ALGORITHM:
        raise SigningError(f"{path}: signed with {params.get('method')}/{params.get('hash_type')} hashing; "
                           f"flux-gguf releases are signed per file with {HASH_ALGORITHM}")
    digests = {rd.identifier: rd.digest.digest_hex for rd in signed.resource_descriptors()}
    return SignedContent(signed.model_name, digests, tuple(str(p) for p in params.get("ignore_paths", ())))


@dataclass
class SignatureCheck:
    """The verdict on a release's signature."""

    status: str  # verified / unsigned / not-checked / invalid
    detail: str
    signed_by: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, what is wrong)
    not_fetched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != INVALID

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "ok": self.ok, "detail": self.detail, "signed_by": self.signed_by,
                "problems": [{"path": p, "reason": r} for p, r in self.problems], "not_fetched": self.not_fetched}


def _hash_files(root: Path, files: Sequence[str]) -> dict[str, str]:
    """The library's own hashing (sha256 per file) of ``files``: what its ``verify`` compares."""
    from model_signing import hashing

    got = hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME]).hash(root, files_to_hash=[root / f for f in files])
    return {rd.identifier: rd.digest.digest_hex for rd in got.resource_descriptors()}


def _walk(root: Path, ignore: Sequence[str]) -> list[str]:
    """Every file the library would sign under ``root`` (posix paths), minus ignored ones; symlinks too."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        entries = filenames + [d for d in dirnames if (base / d).is_symlink()]
        for name in entries:
            rel = (base / name).relative_to(root).as_posix()
            if not any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in ignore):
                out.append(rel)
    return sorted(out)


def _compare(signed: SignedContent, actual: Mapping[str, str], present: Iterable[str]) -> list[tuple[str, str]]:
    problems = []
    for path in sorted(set(signed.digests) | set(present)):
        if path not in signed.digests:
            problems.append((path, "not covered by the signature (added after signing)"))
        elif path not in actual:
            problems.append((path, "signed but missing"))
        elif actual[path] != signed.digests[path]:
            problems.append((path, "differs from its signed digest"))
    return problems


class _NotRead:
    def __repr__(self) -> str:
        return "NOT_READ"


NOT_READ: Any = _NotRead()
"""``check_signature(declared=...)`` when the caller has not read the manifest (nothing is known of what it says)."""


def check_signature(folder: str | os.PathLike[str], trust: Trust | None, *, require: bool = False,
                    declared: Mapping[str, Any] | None = NOT_READ, ignore: Sequence[str] = (),
                    known: Mapping[str, str] | None = None) -> SignatureCheck:
    """Verify ``folder/model.sig`` against ``trust`` and every file of the folder against what it signs.

    Without ``trust`` a present signature is reported ``not-checked`` (never ``verified``); an unsigned
    release is ``unsigned``, which ``require`` (or a ``trust``) turns into ``invalid``. ``declared``: the
    manifest's ``signature`` object (None: the manifest says unsigned; :data:`NOT_READ`: not known). The
    manifest and the folder must agree: a manifest that says signed with no model.sig is invalid, and so
    is a model.sig beside a manifest that says unsigned (valid or not, with or without ``trust``: the
    signature was added after the build, or the manifest's record of it removed).
    ``ignore``: glob patterns of unsigned extra files to tolerate (``verify --ignore``); signed files are
    always checked. ``known``: sha256 digests just computed for files of the folder (``verify`` passes
    its own per-file digests, so a signed release is read once); the others are hashed by model-signing.
    """
    root = Path(folder)
    sig = root / SIGNATURE_NAME
    if not os.path.lexists(sig):
        if declared is not None and declared is not NOT_READ:
            return SignatureCheck(INVALID, f"manifest.json says the release is signed, but {SIGNATURE_NAME} is missing")
        if trust is not None or require:
            return SignatureCheck(INVALID, f"unsigned: no {SIGNATURE_NAME}, and a signature is required")
        return SignatureCheck(UNSIGNED, f"no {SIGNATURE_NAME} in the folder")
    if declared is None:
        return SignatureCheck(INVALID, f"manifest.json says the release is unsigned, but the folder holds "
                                       f"{SIGNATURE_NAME}: the manifest and the folder disagree")
    if os.path.islink(sig) or not sig.is_file():
        return SignatureCheck(INVALID, f"{SIGNATURE_NAME} is not a regular file")
    if trust is None:
        how = SignatureInfo.from_json(None if declared is NOT_READ else declared)
        detail = ("signature present, not checked" + (f" (the manifest says: {how.describe()})" if how else "")
                  + "; give --public-key, --certificate-chain or --identity/--issuer to check it")
        if require:
            return SignatureCheck(INVALID, "signature present but not checked: --require-signature needs "
                                           "--public-key, --certificate-chain or --identity/--issuer")
        return SignatureCheck(NOT_CHECKED, detail, signed_by=how.describe() if how else None)
    try:
        signed = read_signed(sig, trust)
    except SigningError as e:
        return SignatureCheck(INVALID, f"{SIGNATURE_NAME} {e}")
    ignore_paths = list(signed.ignore_paths) + [SIGNATURE_NAME]
    present = [p for p in _walk(root, ignore_paths)
               if p in signed.digests or not any(fnmatch.fnmatchcase(p, g) for g in ignore)]
    regular = [p for p in present if p in signed.digests and (root / p).is_file() and not (root / p).is_symlink()]
    known = known or {}
    try:
        actual = {p: known[p] for p in regular if p in known} | _hash_files(root, [p for p in regular if p not in known])
    except Exception as e:  # noqa: BLE001  (unreadable file)
        return SignatureCheck(INVALID, f"cannot hash the release for the signature check: {_reason(e)}")
    problems = _compare(signed, actual, present)
    if problems:
        return SignatureCheck(INVALID, "the signature does not cover this folder: "
                              + "; ".join(f"{p} {r}" for p, r in problems), problems=problems)
    return SignatureCheck(VERIFIED, f"signature verified with {trust.describe()}: all {len(signed.digests)} files "
                          "match what was signed", signed_by=trust.describe())


def check_subset(folder: str | os.PathLike[str], trust: Trust, signed: SignedContent,
                 fetched: Mapping[str, str]) -> SignatureCheck:
    """After an ``--include`` download: every fetched file's sha256 (computed as it arrived) must equal its
    signed digest; the signed files that were not fetched are named, not failed."""
    problems = [(p, "not covered by the signature") for p in sorted(fetched) if p not in signed.digests]
    problems += [(p, "differs from its signed digest") for p in sorted(fetched)
                 if p in signed.digests and fetched[p] != signed.digests[p]]
    not_fetched = sorted(p for p in signed.digests if p not in fetched)
    if problems:
        return SignatureCheck(INVALID, f"{folder}: the files fetched do not match the signature: "
                              + "; ".join(f"{p} {r}" for p, r in problems), problems=problems, not_fetched=not_fetched)
    detail = f"signature verified with {trust.describe()}: {len(fetched)} files fetched match what was signed"
    if not_fetched:
        detail += f"; not fetched: {', '.join(not_fetched)}"
    return SignatureCheck(VERIFIED, detail, signed_by=trust.describe(), not_fetched=not_fetched)


def payload_statement(signature: str | os.PathLike[str]) -> dict[str, Any]:
    """The in-toto statement inside a bundle, unverified (for tests and diagnostics only)."""
    doc = json.loads(Path(signature).read_text(encoding="utf-8"))
    return json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))


# --------------------------------------------------------------------------------------------
# Hub downloads


def download_signed(repo_id: str, output_dir: str | os.PathLike[str], trust: Trust, *, revision: str | None = None,
                    include: Sequence[str] = (), api: Any = None, progress: Any = None,
                    force: bool = False) -> tuple[Any, SignatureCheck]:
    """``download --public-key``: check the repo's model.sig first, then download as usual, then check what came.

    Before any large transfer: model.sig must verify against ``trust`` and the repo's manifest.json
    (and SHA256SUMS) must equal their signed digests; every file is then checked against that
    manifest as it arrives, and afterwards each fetched file's sha256 against its signed digest.
    model.sig is saved beside the files. Everything comes from one commit.
    """
    import dataclasses

    from converter.hub.client import _fetch_bytes, hub_api
    from converter.hub.download import download_release
    from converter.hub.remote import _model_info
    from manifests.hashing import write_bytes_atomic

    api = api or hub_api()
    info = _model_info(api, repo_id, revision)
    commit = str(info.sha)
    at = f"{repo_id}@{commit[:12]}"
    names = {s.rfilename for s in info.siblings or []}
    if SIGNATURE_NAME not in names:
        raise SigningError(f"{at} has no {SIGNATURE_NAME}: the release is not signed (download without "
                           "--public-key/--certificate-chain/--identity to fetch it unverified)")
    sig_bytes = _fetch_bytes(api, repo_id, commit, SIGNATURE_NAME)
    with tempfile.TemporaryDirectory(prefix="flux-gguf-sig-") as tmp:
        (Path(tmp) / SIGNATURE_NAME).write_bytes(sig_bytes)
        try:
            signed = read_signed(Path(tmp) / SIGNATURE_NAME, trust)
        except SigningError as e:
            raise SigningError(f"{at}/{SIGNATURE_NAME} {e}; nothing was downloaded") from None
    records = {}
    for name in (MANIFEST_NAME, CHECKSUMS_NAME):
        if name in names or name in signed.digests:
            data = _fetch_bytes(api, repo_id, commit, name)
            if hashlib.sha256(data).hexdigest() != signed.digests.get(name):
                raise SigningError(f"{at}/{name} differs from its signed digest (replaced after signing?); "
                                   "nothing was downloaded")
            records[name] = hashlib.sha256(data).hexdigest()
    result = download_release(repo_id, output_dir, revision=commit, include=include, api=api, progress=progress,
                             force=force)
    fetched = {f.path: f.sha256 for f in result.files} | records
    check = check_subset(output_dir, trust, signed, fetched)
    if not check.ok:
        raise SigningError(check.detail)
    write_bytes_atomic(Path(output_dir) / SIGNATURE_NAME, sig_bytes)
    return dataclasses.replace(result, revision=revision), check
