"""Signed releases on the Hub (issue 13): upload publishes model.sig, download --public-key checks it.

Runs against the loopback Hub emulator of test_hub.py, with the real huggingface_hub client.
"""
# ruff: noqa: F811  (the emulator fixture is imported from test_hub and named as a parameter)
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import pathlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_hub import emulator, error_line, make_release, run  # noqa: F401  (emulator is a fixture)

from converter.release.signing import prepare_signer, sign_release, signing_request
from manifests import CHECKSUMS_NAME, MANIFEST_NAME, SIGNATURE_NAME, dump_manifest, format_sha256sums, load_manifest


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("signer", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        out[name] = d / f"{name}.pem"
        out[name].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
        out[name + "_pub"] = d / f"{name}_pub.pem"
        out[name + "_pub"].write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return out


def signed_release(root: pathlib.Path, key: pathlib.Path) -> pathlib.Path:
    """A release whose manifest says it is signed (as ``release build --sign-key`` writes it), signed."""
    rel = make_release(root)
    signer = prepare_signer(signing_request(key=key))
    manifest = dataclasses.replace(load_manifest(rel / MANIFEST_NAME), signature=signer.info.to_json())
    manifest_bytes = dump_manifest(manifest)
    (rel / MANIFEST_NAME).write_bytes(manifest_bytes)
    sums = {a.path: a.sha256 for a in manifest.artifacts} | {MANIFEST_NAME: hashlib.sha256(manifest_bytes).hexdigest()}
    (rel / CHECKSUMS_NAME).write_bytes(format_sha256sums(sums))
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in rel.iterdir()}
    sign_release(rel, signer, name=rel.name, expected=expected)
    return rel


def test_upload_publishes_model_sig_and_download_verifies_it(emulator, keys, tmp_path):
    rel = signed_release(tmp_path / "rel", keys["signer"])
    res = run("upload", rel, "alice/demo", "--public-key", keys["signer_pub"])
    assert res.exit_code == 0, res.output
    assert emulator.file_bytes("alice/demo", SIGNATURE_NAME) == (rel / SIGNATURE_NAME).read_bytes()
    assert run("verify", rel, "--remote", "alice/demo").exit_code == 0  # model.sig is part of the release there
    out = tmp_path / "out"
    res = run("download", "alice/demo", "-o", out, "--public-key", keys["signer_pub"], "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["signature"]["status"] == "verified" and doc["signature"]["not_fetched"] == []
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in rel.iterdir())
    assert (out / SIGNATURE_NAME).read_bytes() == (rel / SIGNATURE_NAME).read_bytes()
    assert run("verify", out, "--public-key", keys["signer_pub"]).exit_code == 0


def test_download_subset_checks_what_it_fetched_and_names_the_rest(emulator, keys, tmp_path):
    rel = signed_release(tmp_path / "rel", keys["signer"])
    assert run("upload", rel, "alice/demo").exit_code == 0  # without a key: published as it is, model.sig included
    out = tmp_path / "out"
    res = run("download", "alice/demo", "--include", "*Q4_K_M*", "-o", out, "--public-key", keys["signer_pub"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("signature"))
    assert line == ("signature   signature verified with the public key " + str(keys["signer_pub"]) + ": 3 files "
                    "fetched match what was signed; not fetched: README.md, demo-Q8_0.gguf")
    assert sorted(p.name for p in out.iterdir()) == sorted([CHECKSUMS_NAME, MANIFEST_NAME, SIGNATURE_NAME,
                                                            "demo-Q4_K_M.gguf"])


def test_download_with_the_wrong_key_fetches_nothing(emulator, keys, tmp_path):
    rel = signed_release(tmp_path / "rel", keys["signer"])
    assert run("upload", rel, "alice/demo").exit_code == 0
    out = tmp_path / "out"
    res = run("download", "alice/demo", "-o", out, "--public-key", keys["other_pub"])
    assert res.exit_code == 1
    msg = error_line(res)
    assert msg.startswith("Error: alice/demo@") and "/model.sig does not verify with the public key" in msg
    assert msg.endswith("; nothing was downloaded") and "Key mismatch" in msg
    assert not out.exists() or not any(out.iterdir())


def test_download_refuses_a_manifest_replaced_after_signing(emulator, keys, tmp_path):
    """An attacker with write access swaps a GGUF and rewrites both listings: hashes agree, the signature does not."""
    rel = signed_release(tmp_path / "rel", keys["signer"])
    gguf = rel / "demo-Q8_0.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"\x00")
    doc = json.loads((rel / MANIFEST_NAME).read_text())
    for a in doc["artifacts"]:
        if a["path"] == gguf.name:
            a["sha256"] = hashlib.sha256(gguf.read_bytes()).hexdigest()
    data = (json.dumps(doc, indent=2) + "\n").encode()
    (rel / MANIFEST_NAME).write_bytes(data)
    sums = {a["path"]: a["sha256"] for a in doc["artifacts"]} | {MANIFEST_NAME: hashlib.sha256(data).hexdigest()}
    (rel / CHECKSUMS_NAME).write_bytes(format_sha256sums(sums))
    assert run("upload", rel, "alice/demo").exit_code == 0  # no key given: hashes agree, so it goes up
    out = tmp_path / "out"
    assert run("download", "alice/demo", "-o", tmp_path / "plain").exit_code == 0  # hash-only download passes
    res = run("download", "alice/demo", "-o", out, "--public-key", keys["signer_pub"])
    assert res.exit_code == 1
    msg = error_line(res)
    assert msg.endswith(f"/{MANIFEST_NAME} differs from its signed digest (replaced after signing?); nothing was downloaded")
    assert not out.exists() or not any(out.iterdir())


def test_download_public_key_of_an_unsigned_release(emulator, keys, tmp_path):
    rel = make_release(tmp_path / "rel")
    assert run("upload", rel, "alice/demo").exit_code == 0
    res = run("download", "alice/demo", "-o", tmp_path / "out", "--public-key", keys["signer_pub"])
    assert res.exit_code == 1
    assert error_line(res).endswith(f"has no {SIGNATURE_NAME}: the release is not signed (download without "
                                    "--public-key/--certificate-chain/--identity to fetch it unverified)")


@pytest.mark.parametrize("damage", ["wrong key", "edited signature", "tampered file", "signature removed"])
def test_upload_refuses_a_release_whose_signature_fails(damage, emulator, keys, tmp_path):
    rel = signed_release(tmp_path / "rel", keys["signer"])
    pub = keys["signer_pub"]
    if damage == "wrong key":
        pub = keys["other_pub"]
    elif damage == "edited signature":
        doc = json.loads((rel / SIGNATURE_NAME).read_text())
        statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
        statement["subject"][0]["name"] = "someone else's model"
        doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
        (rel / SIGNATURE_NAME).write_text(json.dumps(doc))
    elif damage == "tampered file":
        (rel / "README.md").write_text("# demo GGUF, now with a different card\n")
    else:
        (rel / SIGNATURE_NAME).unlink()
    res = run("upload", rel, "alice/demo", "--public-key", pub)
    assert res.exit_code == 1
    msg = error_line(res)
    assert msg.startswith(f"Error: {rel}: ") and msg.endswith("; refusing to upload")
    assert "alice/demo" not in emulator.repos  # nothing was sent, not even the repo created
