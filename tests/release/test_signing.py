"""Signed releases (issue 13): model.sig written by OpenSSF model-signing, checked by ``verify``.

Keys and certificates are generated here with ``cryptography`` (EC P-256; a self-signed CA and a
leaf for the certificate mode). The real consumer is the library's own CLI,
``python -m model_signing verify ...``, run on our releases next to our ``verify``.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from test_release import SPEC, write_project

from converter.cli import main
from converter.release import build as build_module
from converter.release.build import build_release
from converter.release.signing import (
    SigningError,
    check_signature,
    prepare_signer,
    sign_release,
    signing_request,
    trust_from_options,
)
from manifests import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    format_sha256sums,
    load_manifest,
)

ONE_VARIANT_SPEC = SPEC.replace('variants = ["Q3_K_S", "Q4_K_M", "BF16"]', 'variants = ["Q8_0"]')


# ---- keys ------------------------------------------------------------------------------------
def _pem_private(key, password: bytes | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(1000 + len(subject))
               .not_valid_before(now).not_valid_after(now + dt.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    key, other, ca_key, rsa_key = (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1()),
                                   ec.generate_private_key(ec.SECP256R1()),
                                   rsa.generate_private_key(public_exponent=65537, key_size=2048))
    files = {"key": _pem_private(key), "pub": _pem_public(key), "other_pub": _pem_public(other),
             "encrypted": _pem_private(key, b"s3cret pass"), "password": b"s3cret pass\n",
             "wrong_password": b"not it\n", "rsa": _pem_private(rsa_key), "other_key": _pem_private(other)}
    ca = _cert("flux-gguf test CA", ca_key, "flux-gguf test CA", ca_key, ca=True)
    leaf = _cert("release signer", key, "flux-gguf test CA", ca_key, ca=False)
    files["ca"] = ca.public_bytes(serialization.Encoding.PEM)
    files["leaf"] = leaf.public_bytes(serialization.Encoding.PEM)
    out = {}
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
        out[name] = d / f"{name}.pem"
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_project(tmp_path_factory.mktemp("project"), spec=ONE_VARIANT_SPEC)


@pytest.fixture(scope="module")
def signed(project, keys, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signed") / "tiny-kontext"
    res = CliRunner().invoke(main, ["release", "build", str(project), "-o", str(out), "--sign-key", str(keys["key"])])
    assert res.exit_code == 0, res.output
    return out


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def library_verify(folder: Path, *args: object) -> subprocess.CompletedProcess:
    """The real consumer: model-signing's own CLI."""
    mode, *rest = args
    return subprocess.run([sys.executable, "-m", "model_signing", "verify", str(mode), str(folder),
                           "--signature", str(folder / SIGNATURE_NAME), *map(str, rest)],
                          capture_output=True, text=True, timeout=300, check=False)


def verify_json(folder: Path, *args: object) -> tuple[int, dict]:
    res = run("verify", folder, "--json", *args)
    return res.exit_code, json.loads(res.stdout)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != SIGNATURE_NAME}


# ---- a signed build ------------------------------------------------------------------------------
def test_signed_release_records_how_and_verifies(signed, keys):
    manifest = load_manifest(signed / MANIFEST_NAME)
    key_sha = hashlib.sha256(keys["pub"].read_bytes()).hexdigest()
    assert manifest.signature == {"file": SIGNATURE_NAME, "method": "key", "key_sha256": key_sha}
    card = (signed / "README.md").read_text()
    assert "## Signature" in card and key_sha in card
    assert f"model_signing verify key . --signature {SIGNATURE_NAME} --public_key PUBLIC_KEY.pem" in card
    assert "flux-gguf verify . --public-key PUBLIC_KEY.pem" in card
    # model.sig is the library's bundle, signing exactly the release's files under the release's name
    doc = json.loads((signed / SIGNATURE_NAME).read_text())
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert doc["verificationMaterial"]["publicKey"]["hint"] == key_sha
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    assert statement["subject"][0]["name"] == signed.name
    assert {r["name"]: r["digest"] for r in statement["predicate"]["resources"]} == _digests(signed)
    code, out = verify_json(signed, "--public-key", keys["pub"], "--require-signature")
    assert code == 0 and out["ok"] and out["signature"]["status"] == "verified"
    res = run("verify", signed, "--public-key", keys["pub"])
    assert res.exit_code == 0 and res.output.splitlines()[0].startswith("signature   verified: ")


def test_model_signing_cli_accepts_our_release(signed, keys):
    res = library_verify(signed, "key", "--public_key", keys["pub"])
    assert res.returncode == 0 and "Verification succeeded" in res.stdout, res.stdout + res.stderr


def test_without_a_key_the_signature_is_present_not_checked(signed):
    code, out = verify_json(signed)
    assert code == 0 and out["signature"]["status"] == "not-checked"
    assert "signature present, not checked" in out["signature"]["detail"]
    code, out = verify_json(signed, "--require-signature")
    assert code == 1 and out["signature"]["status"] == "invalid"


def test_sha256sums_still_passes_on_a_signed_release(signed):
    res = subprocess.run(["sha256sum", "-c", "--strict", CHECKSUMS_NAME], cwd=signed, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- tampering -------------------------------------------------------------------------------------
def _replace_gguf_and_rewrite_listings(rel: Path) -> None:
    """The attack hashes cannot catch: swap a GGUF and rewrite manifest.json and SHA256SUMS to match it."""
    gguf = next(rel.glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    doc = json.loads((rel / MANIFEST_NAME).read_text())
    for a in doc["artifacts"]:
        if a["path"] == gguf.name:
            a["sha256"] = hashlib.sha256(data).hexdigest()
            for t in a["tensors"]:  # the last tensor's range holds the changed byte
                if t["offset"] + t["nbytes"] == len(data):
                    t["sha256"] = hashlib.sha256(bytes(data[t["offset"]:])).hexdigest()
    manifest_bytes = (json.dumps(doc, indent=2) + "\n").encode()
    (rel / MANIFEST_NAME).write_bytes(manifest_bytes)
    sums = {a["path"]: a["sha256"] for a in doc["artifacts"]} | {MANIFEST_NAME: hashlib.sha256(manifest_bytes).hexdigest()}
    (rel / CHECKSUMS_NAME).write_bytes(format_sha256sums(sums))


def _edit_signature(rel: Path) -> None:
    """Change one signed digest inside model.sig's payload (valid JSON, valid bundle, broken signature)."""
    doc = json.loads((rel / SIGNATURE_NAME).read_text())
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (rel / SIGNATURE_NAME).write_text(json.dumps(doc))


def _flip_byte(rel: Path) -> None:
    gguf = next(rel.glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf.write_bytes(bytes(data))


TAMPERING = {
    "one byte of a GGUF": (_flip_byte, "differs from its signed digest", False),
    "GGUF replaced, manifest.json and SHA256SUMS rewritten": (_replace_gguf_and_rewrite_listings,
                                                              "differs from its signed digest", True),
    "a file added": (lambda rel: (rel / "extra.safetensors").write_bytes(b"not part of the release"),
                     "extra.safetensors not covered by the signature", False),
    "a file removed": (lambda rel: (rel / "LICENSE.md").unlink(), "LICENSE.md signed but missing", False),
    "model.sig edited": (_edit_signature, "the signature does not match its content", True),
    "the wrong public key": (lambda rel: None, "Key mismatch", True),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_caught_by_verify_and_by_model_signing(case, signed, keys, tmp_path):
    tamper, reason, hash_only_passes = TAMPERING[case]
    rel = tmp_path / signed.name
    shutil.copytree(signed, rel)
    tamper(rel)
    pub = keys["other_pub"] if case == "the wrong public key" else keys["pub"]
    code, out = verify_json(rel, "--public-key", pub)
    assert code == 1 and not out["ok"]
    assert out["signature"]["status"] == "invalid" and reason in out["signature"]["detail"], out["signature"]
    text = run("verify", rel, "--public-key", pub)
    first = text.output.splitlines()[0]
    assert text.exit_code == 1 and first.startswith("signature   invalid: ") and reason in first
    # the hash-only check: passes exactly where only a signature can tell (listings rewritten to agree,
    # a signature edited or checked with the wrong key)
    assert (run("verify", rel).exit_code == 0) is hash_only_passes
    lib = library_verify(rel, "key", "--public_key", pub)
    assert lib.returncode == 1 and "Verification failed" in lib.stderr, lib.stdout + lib.stderr


def test_a_removed_signature_is_caught_when_the_manifest_says_signed(signed, tmp_path):
    rel = tmp_path / signed.name
    shutil.copytree(signed, rel)
    (rel / SIGNATURE_NAME).unlink()
    code, out = verify_json(rel)
    assert code == 1 and out["signature"]["status"] == "invalid"
    assert out["signature"]["detail"] == "manifest.json says the release is signed, but model.sig is missing"


def test_two_builds_with_the_same_key_verify_and_differ_only_in_model_sig(signed, project, keys, tmp_path):
    again = tmp_path / signed.name
    build_release(project, again, sign=signing_request(key=keys["key"]))
    a, b = _files(signed), _files(again)
    assert a.keys() == b.keys()
    assert {n: d for n, d in a.items() if n != SIGNATURE_NAME} == {n: d for n, d in b.items() if n != SIGNATURE_NAME}
    for rel in (signed, again):
        assert check_signature(rel, trust_from_options(public_key=keys["pub"])).status == "verified"


def test_a_release_that_cannot_be_signed_never_gets_its_name(project, keys, tmp_path, monkeypatch):
    """model-signing's read of the folder must give the digests the build computed, or nothing is signed."""
    real = build_module.release_digests
    monkeypatch.setattr(build_module, "release_digests",
                        lambda m, sha: real(m, sha) | {"README.md": "0" * 64})
    out = tmp_path / "rel"
    with pytest.raises(SigningError, match=r"README\.md differ\(s\) from what the build wrote; not signed"):
        build_release(project, out, sign=signing_request(key=keys["key"]))
    assert not out.exists() and not (tmp_path / "rel.partial").exists()


# ---- other modes, passwords, argument handling -----------------------------------------------------
def _plain_release(root: Path) -> Path:
    """A folder of a few files (signing covers any folder; no conversion needed)."""
    root.mkdir()
    for name, data in {"a.gguf": b"GGUF" + bytes(range(200)), "README.md": b"# card\n", "sub/b.txt": b"b\n"}.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _expected(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def test_certificate_signing_verifies_with_the_chain(keys, tmp_path):
    rel = _plain_release(tmp_path / "rel")
    signer = prepare_signer(signing_request(key=keys["key"], certificate=keys["leaf"], chain=[keys["ca"]]))
    assert signer.info.method == "certificate" and signer.info.certificate_subject == "CN=release signer"
    assert signer.info.certificate_issuer == "CN=flux-gguf test CA"
    sign_release(rel, signer, name="rel", expected=_expected(rel))
    trust = trust_from_options(certificate_chain=[keys["ca"]])
    assert check_signature(rel, trust).status == "verified"
    lib = library_verify(rel, "certificate", "--certificate_chain", keys["ca"])
    assert lib.returncode == 0, lib.stdout + lib.stderr
    # a chain that did not issue the leaf is refused by the library's chain check
    check = check_signature(rel, trust_from_options(certificate_chain=[keys["leaf"]]))
    assert check.status == "invalid" and check.detail.startswith("model.sig does not verify with the certificate chain")


def test_encrypted_key_with_its_password_file(keys, tmp_path):
    rel = _plain_release(tmp_path / "rel")
    signer = prepare_signer(signing_request(key=keys["encrypted"], password_file=keys["password"]))
    sign_release(rel, signer, name="rel", expected=_expected(rel))
    assert check_signature(rel, trust_from_options(public_key=keys["pub"])).status == "verified"
    assert library_verify(rel, "key", "--public_key", keys["pub"]).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--sign-key", "{encrypted}"], "{encrypted}: the private key is encrypted; give its password with --sign-password-file"),
    (["--sign-key", "{encrypted}", "--sign-password-file", "{wrong_password}"],
     "{encrypted}: not a PEM private key or the password is wrong"),
    (["--sign-key", "{rsa}"], "{rsa}: model-signing signs with elliptic-curve keys (P-256, P-384, P-521); this key is RSA"),
    (["--sign-key", "{pub}"], "{pub}: not a PEM private key"),
    (["--sign-key", "{other_key}", "--sign-certificate", "{leaf}", "--sign-chain", "{ca}"],
     "{leaf}: its public key is not the one of {other_key}"),
    (["--sign-key", "{key}", "--sign-certificate", "{leaf}"],
     "certificate signing needs both --sign-certificate (the signing certificate) and --sign-chain (the CA certificates above it)"),
    (["--sign-key", "{key}", "--sign-certificate", "{leaf}", "--sign-chain", "{ca}", "--sign-password-file", "{password}"],
     ("--sign-password-file: model-signing's certificate signer takes an unencrypted key only; decrypt it first "
     "(openssl ec -in KEY.pem -out PLAIN.pem)")),
    (["--sign-key", "{key}", "--sign-certificate", "{ca}", "--sign-chain", "{ca}"],
     "{ca}: its public key is not the one of {key}"),
    (["--sign-sigstore", "--sign-key", "{key}"],
     ("--sign-sigstore signs keyless (an OIDC identity); it cannot be combined with --sign-key, "
     "--sign-password-file, --sign-certificate or --sign-chain")),
    (["--sign-password-file", "{password}"],
     "--sign-certificate, --sign-chain and --sign-password-file need --sign-key (the private key that signs)"),
    (["--sign-oidc-issuer", "https://issuer.example"],
     "the OIDC issuer, identity token and staging options only apply with --sign-sigstore"),
])
def test_bad_signing_options_fail_before_any_work(args, message, project, keys, tmp_path):
    out = tmp_path / "rel"
    res = run("release", "build", project, "-o", out, *[a.format(**keys) for a in args])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == "Error: " + message.format(**keys)
    assert not out.exists() and not (tmp_path / "rel.partial").exists()


def test_sigstore_request_is_keyless_and_recorded():
    req = signing_request(sigstore=True, oidc_issuer="https://oauth2.sigstore.dev/auth")
    assert req is not None and req.method == "sigstore" and req.private_key is None
    signer = prepare_signer(req)  # nothing contacted until signing
    assert signer.info.to_json() == {"file": SIGNATURE_NAME, "method": "sigstore",
                                     "oidc_issuer": "https://oauth2.sigstore.dev/auth"}
    assert signing_request() is None


@pytest.mark.parametrize("args, message", [
    (["--identity", "me@example.com"],
     "Sigstore verification needs both --identity (who signed) and --issuer (their OIDC issuer)"),
    (["--public-key", "{pub}", "--certificate-chain", "{ca}"],
     "give one of --public-key, --certificate-chain or --identity/--issuer"),
])
def test_bad_trust_options(args, message, signed, keys):
    res = run("verify", signed, *[a.format(**keys) for a in args])
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1] == "Error: " + message


def _unsigned_manifest(rel: Path) -> None:
    """Take the signature out of the manifest (and SHA256SUMS), as a release built unsigned has it."""
    doc = json.loads((rel / MANIFEST_NAME).read_text())
    del doc["signature"]
    manifest_bytes = (json.dumps(doc, indent=2) + "\n").encode()
    (rel / MANIFEST_NAME).write_bytes(manifest_bytes)
    sums = {a["path"]: a["sha256"] for a in doc["artifacts"]} | {MANIFEST_NAME: hashlib.sha256(manifest_bytes).hexdigest()}
    (rel / CHECKSUMS_NAME).write_bytes(format_sha256sums(sums))


def test_unsigned_release(signed, keys, tmp_path):
    rel = tmp_path / signed.name  # the signed release with its signature taken out of the manifest and folder
    shutil.copytree(signed, rel)
    (rel / SIGNATURE_NAME).unlink()
    _unsigned_manifest(rel)
    code, out = verify_json(rel)
    assert code == 0 and out["signature"]["status"] == "unsigned"
    code, out = verify_json(rel, "--require-signature")
    assert code == 1 and out["signature"]["detail"] == "unsigned: no model.sig, and a signature is required"
    code, out = verify_json(rel, "--public-key", keys["pub"])
    assert code == 1 and out["signature"]["status"] == "invalid"


def test_verify_ignore_tolerates_unsigned_extras_but_never_a_signed_file(signed, keys, tmp_path):
    rel = tmp_path / signed.name
    shutil.copytree(signed, rel)
    (rel / ".cache" / "huggingface").mkdir(parents=True)
    (rel / ".cache" / "huggingface" / "x.lock").write_bytes(b"")
    code, out = verify_json(rel, "--public-key", keys["pub"], "--ignore", ".cache/huggingface/*")
    assert code == 0 and out["signature"]["status"] == "verified"
    code, out = verify_json(rel, "--public-key", keys["pub"])
    assert code == 1 and ".cache/huggingface/x.lock not covered by the signature" in out["signature"]["detail"]
    _flip_byte(rel)  # a signed file matching an --ignore pattern is still checked
    code, out = verify_json(rel, "--public-key", keys["pub"], "--ignore", "*")
    assert code == 1 and "differs from its signed digest" in out["signature"]["detail"]


def test_not_checked_names_how_the_manifest_says_it_was_signed(signed, keys):
    res = run("verify", signed)
    key_sha = hashlib.sha256(keys["pub"].read_bytes()).hexdigest()
    assert res.output.splitlines()[0] == (
        f"signature   not-checked: signature present, not checked (the manifest says: signed with an EC key "
        f"(public key sha256 {key_sha})); give --public-key, --certificate-chain or --identity/--issuer to check it")


def test_verify_with_a_key_reads_each_file_once(signed, keys, monkeypatch):
    """The signature check reuses the digests the manifest check computed: nothing is hashed twice."""
    import converter.release.signing as signing_module

    hashed: list[list[str]] = []
    real = signing_module._hash_files
    monkeypatch.setattr(signing_module, "_hash_files", lambda root, files: hashed.append(list(files)) or real(root, files))
    assert run("verify", signed, "--public-key", keys["pub"]).exit_code == 0
    assert hashed == [[]]


def test_without_the_sign_extra_signing_options_say_how_to_install_it(tmp_path, monkeypatch):
    """The base install has no model-signing: asking to check a signature is one line naming the extra."""
    import sys

    from click.testing import CliRunner

    from converter.cli import main

    monkeypatch.setitem(sys.modules, "model_signing", None)  # import model_signing -> ImportError
    (tmp_path / "pub.pem").write_text("not used")
    res = CliRunner().invoke(main, ["verify", str(tmp_path), "--public-key", str(tmp_path / "pub.pem")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        "Error: signatures need the model-signing library (model_signing is not installed): "
        "pip install 'flux-gguf[sign]'")


# ---- hostile key, certificate and signature files (issue 27) ---------------------------------------
# A FIFO would block a read forever and /dev/zero never ends, so every case runs in one child
# process with a timeout and a 2 GiB address-space cap (a hang fails the test instead of the suite).
HOSTILE_DRIVER = r"""
import json, sys
from click.testing import CliRunner
from converter.cli import main
results = [CliRunner().invoke(main, args) for args in json.loads(sys.argv[1])]
print(json.dumps([{"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr} for r in results]))
"""
SPARSE_BYTES = 2 << 30
READ = "cannot read the"
FIFO, DEVICE, FOLDER = (f"it is a {kind}, not a regular file" for kind in ("FIFO", "device", "folder"))
TOO_BIG = f"{SPARSE_BYTES:,} bytes, more than the 1,048,576 allowed"
HOSTILE_BUILDS = {  # release build options -> the one Error: line
    "key-fifo": (["--sign-key", "{fifo}"], f"--sign-key {{fifo}}: {READ} private key: {FIFO}"),
    "key-zero": (["--sign-key", "/dev/zero"], f"--sign-key /dev/zero: {READ} private key: {DEVICE}"),
    "key-folder": (["--sign-key", "{folder}"], f"--sign-key {{folder}}: {READ} private key: {FOLDER}"),
    "key-sparse": (["--sign-key", "{sparse}"], f"--sign-key {{sparse}}: {READ} private key: {TOO_BIG}"),
    "password-fifo": (["--sign-key", "{encrypted}", "--sign-password-file", "{fifo}"],
                      f"--sign-password-file {{fifo}}: {READ} password: {FIFO}"),
    "password-zero": (["--sign-key", "{encrypted}", "--sign-password-file", "/dev/zero"],
                      f"--sign-password-file /dev/zero: {READ} password: {DEVICE}"),
    "certificate-folder": (["--sign-key", "{key}", "--sign-certificate", "{folder}", "--sign-chain", "{ca}"],
                           f"--sign-certificate {{folder}}: {READ} signing certificate: {FOLDER}"),
    "chain-fifo": (["--sign-key", "{key}", "--sign-certificate", "{leaf}", "--sign-chain", "{fifo}"],
                   f"--sign-chain {{fifo}}: {READ} certificate chain: {FIFO}"),
    "token-zero": (["--sign-sigstore", "--sign-identity-token-file", "/dev/zero"],
                   f"--sign-identity-token-file /dev/zero: {READ} identity token: {DEVICE}"),
}
HOSTILE_TRUST = {  # verify / upload options -> the one Error: line
    "public-key-fifo": (["verify", "{signed}", "--public-key", "{fifo}"],
                        f"--public-key {{fifo}}: {READ} public key: {FIFO}"),
    "public-key-zero": (["verify", "{signed}", "--public-key", "/dev/zero"],
                        f"--public-key /dev/zero: {READ} public key: {DEVICE}"),
    "public-key-folder": (["verify", "{signed}", "--public-key", "{folder}"],
                          f"--public-key {{folder}}: {READ} public key: {FOLDER}"),
    "public-key-sparse": (["verify", "{signed}", "--public-key", "{sparse}"],
                          f"--public-key {{sparse}}: {READ} public key: {TOO_BIG}"),
    "chain-fifo": (["verify", "{signed}", "--certificate-chain", "{fifo}"],
                   f"--certificate-chain {{fifo}}: {READ} certificate chain: {FIFO}"),
    "upload-public-key-folder": (["upload", "{signed}", "me/repo", "--dry-run", "--public-key", "{folder}"],
                                 f"--public-key {{folder}}: {READ} public key: {FOLDER}"),
}


def _limit_memory() -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.fixture(scope="module")
def hostile(keys, project, signed, tmp_path_factory) -> dict:
    """Every hostile case run once in one child: {case: (result, the paths its strings name)}."""
    import os

    d = tmp_path_factory.mktemp("hostile")
    os.mkfifo(d / "fifo")
    (d / "folder").mkdir()
    with open(d / "sparse.pem", "wb") as f:
        f.truncate(SPARSE_BYTES)
    sig_sparse, sig_fifo = d / "sig-sparse" / signed.name, d / "sig-fifo" / signed.name
    for rel in (sig_sparse, sig_fifo):
        shutil.copytree(signed, rel)
        (rel / SIGNATURE_NAME).unlink()
    with open(sig_sparse / SIGNATURE_NAME, "wb") as f:
        f.truncate(SPARSE_BYTES)
    os.mkfifo(sig_fifo / SIGNATURE_NAME)
    names = {**{k: str(v) for k, v in keys.items()}, "fifo": str(d / "fifo"), "folder": str(d / "folder"),
             "sparse": str(d / "sparse.pem"), "signed": str(signed), "sig_sparse": str(sig_sparse),
             "sig_fifo": str(sig_fifo)}
    cases = {f"build-{k}": ["release", "build", str(project), "-o", str(d / f"out-{k}"), *args]
             for k, (args, _) in HOSTILE_BUILDS.items()}
    cases |= {f"trust-{k}": args for k, (args, _) in HOSTILE_TRUST.items()}
    cases |= {"sig-sparse": ["verify", "{sig_sparse}", "--public-key", "{pub}"],
              "sig-fifo": ["verify", "{sig_fifo}", "--public-key", "{pub}"]}
    cases = {k: [a.format(**names) for a in args] for k, args in cases.items()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", HOSTILE_DRIVER, json.dumps(list(cases.values()))],
                          capture_output=True, text=True, timeout=300, env=env, preexec_fn=_limit_memory)
    assert proc.returncode == 0, proc.stderr
    return {"results": dict(zip(cases, json.loads(proc.stdout))), "names": names, "dir": d}


@pytest.mark.parametrize("case", HOSTILE_BUILDS)
def test_a_signing_file_that_is_a_fifo_device_folder_or_huge_is_one_line(hostile, case):
    r = hostile["results"][f"build-{case}"]
    assert (r["exit_code"], r["stdout"]) == (1, "")
    assert r["stderr"] == f"Error: {HOSTILE_BUILDS[case][1].format(**hostile['names'])}\n"
    assert not (hostile["dir"] / f"out-{case}").exists()


@pytest.mark.parametrize("case", HOSTILE_TRUST)
def test_a_trusted_key_or_chain_that_is_a_fifo_device_folder_or_huge_is_one_line(hostile, case):
    r = hostile["results"][f"trust-{case}"]
    assert (r["exit_code"], r["stdout"]) == (1, "")
    assert r["stderr"] == f"Error: {HOSTILE_TRUST[case][1].format(**hostile['names'])}\n"


def test_a_huge_sparse_model_sig_is_refused_from_its_size(hostile):
    """A 2 GiB model.sig is never read (the cap is 1 MiB): the signature is invalid, exit 1."""
    r = hostile["results"]["sig-sparse"]
    sig = Path(hostile["names"]["sig_sparse"]) / SIGNATURE_NAME
    assert r["exit_code"] == 1 and r["stderr"] == ""
    assert r["stdout"].splitlines()[0] == (f"signature   invalid: {SIGNATURE_NAME} {sig}: cannot read: {TOO_BIG} "
                                           "(a model-signing bundle is a few KB)")


def test_a_model_sig_that_is_a_fifo_is_refused_not_waited_on(hostile):
    r = hostile["results"]["sig-fifo"]
    assert r["exit_code"] == 1 and r["stderr"] == ""
    assert r["stdout"].splitlines()[0] == f"signature   invalid: {SIGNATURE_NAME} is not a regular file"


@pytest.mark.parametrize("sig", ["valid", "garbage"])
def test_a_model_sig_beside_a_manifest_that_says_unsigned_fails_with_or_without_a_key(signed, keys, tmp_path, sig):
    """One verdict: the manifest and the folder disagree, so the signature check is invalid (exit 1),
    whether model.sig would verify or not, with a key or without."""
    rel = tmp_path / signed.name
    shutil.copytree(signed, rel)
    _unsigned_manifest(rel)
    if sig == "garbage":
        (rel / SIGNATURE_NAME).write_text("{}")
    detail = ("manifest.json says the release is unsigned, but the folder holds model.sig: the manifest and the "
              "folder disagree")
    for trust in ([], ["--public-key", keys["pub"]]):
        code, out = verify_json(rel, *trust)
        assert code == 1 and not out["ok"]
        assert (out["signature"]["status"], out["signature"]["detail"]) == ("invalid", detail)
        assert all(f["status"] == "ok" for f in out["files"])  # every listed file is intact: only the signature fails
    res = run("upload", rel, "me/repo", "--dry-run")
    assert res.exit_code == 1 and res.stderr == f"Error: {rel}: {detail}; refusing to upload\n"
