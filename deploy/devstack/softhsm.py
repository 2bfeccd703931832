"""The development CA with its key in a SoftHSM2 token: `make run`'s, the tests', the bench's.

`create_token_ca(directory, subject)` makes, the first time:

* `softhsm2.conf` and `tokens/`: SoftHSM2's configuration, its token store under `directory`;
* a token labelled `myl-ca` (`softhsm2-util --init-token`), whose user PIN is random and kept
  in `pin` (mode 0600) and whose SO PIN is random and kept nowhere (nothing here needs it);
* a P-256 key generated inside the token, CKA_SENSITIVE and not CKA_EXTRACTABLE: nobody, this
  code included, can read it out. It is generated there rather than imported from the file CA
  of `.run/ca`, because an imported key has been in a file, which is what the token is for;
* `ca.crt`: a self-signed CA certificate for that key (`cert_service.ca.ca_certificate`),
  signed through the token.

Later calls find `ca.crt`, `pin` and `tokens/` and change nothing. Without `ca.crt` nothing
can have been issued by the token's key, so a token without one (a crash in between) is made
again from scratch; a `ca.crt` without its token is refused, never replaced.

The PINs never appear on a command line (another local user could read it there):
softhsm2-util initialises the token with throwaway PINs, which are then changed through
PKCS#11 (C_SetPIN) to the kept ones.

SoftHSM2 reads `SOFTHSM2_CONF` once per process, when the library is first initialised, so
`create_token_ca` sets this process's to the directory's configuration: call it before
anything else in the process uses SoftHSM2. `TokenCa.env()` gives a service the variables it
needs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, UserType
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from cert_service.ca import CaSubject, CertificateAuthorityError, ca_certificate
from cert_service.hsm import Pkcs11Signer, Pkcs11Uri

__all__ = ["MODULE_PATHS", "TOKEN_LABEL", "TokenCa", "create_token_ca", "softhsm_module"]

TOKEN_LABEL: Final = "myl-ca"
KEY_LABEL: Final = "ca"
MODULE_PATHS: Final = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def softhsm_module() -> str | None:
    """The SoftHSM2 PKCS#11 library, or None when SoftHSM2 is not installed."""
    if shutil.which("softhsm2-util") is None:
        return None
    return next((path for path in MODULE_PATHS if Path(path).is_file()), None)


@dataclass(frozen=True)
class TokenCa:
    """A CA whose key is in a SoftHSM2 token: where everything is, and how a service finds it."""

    directory: Path
    module: str

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def pin_path(self) -> Path:
        return self.directory / "pin"

    @property
    def uri(self) -> str:
        module = quote(self.module, safe="/")
        return f"pkcs11:token={TOKEN_LABEL};object={KEY_LABEL};type=private?module-path={module}"

    def env(self) -> dict[str, str]:
        """What cert_service needs to sign with this token's key."""
        return {
            "SOFTHSM2_CONF": str(self.conf),
            "CA_CERT_FILE": str(self.cert_path),
            "CA_KEY_URI": self.uri,
            "CA_KEY_PIN_FILE": str(self.pin_path),
        }


def create_token_ca(
    directory: Path, subject: CaSubject | None = None, module: str | None = None
) -> TokenCa:
    """The token CA in ``directory``, made if ``ca.crt`` is not there yet (see the module)."""
    module = module or softhsm_module()
    if module is None:
        raise CertificateAuthorityError("SoftHSM2 is not installed (Debian: apt install softhsm2)")
    ca = TokenCa(Path(directory).resolve(), module)
    os.environ["SOFTHSM2_CONF"] = str(ca.conf)
    tokens = ca.directory / "tokens"
    if ca.cert_path.exists():
        if tokens.is_dir() and ca.pin_path.exists():
            return ca
        raise CertificateAuthorityError(
            f"{ca.cert_path} exists but its token ({tokens}, {ca.pin_path}) does not; refusing "
            "to replace a CA"
        )
    shutil.rmtree(tokens, ignore_errors=True)
    ca.pin_path.unlink(missing_ok=True)
    ca.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens.mkdir(mode=0o700)
    ca.conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    pin = secrets.token_urlsafe(18)
    _init_token(ca, pin)
    library = pkcs11.lib(module)
    token = library.get_token(token_label=TOKEN_LABEL)
    with token.open(rw=True, user_pin=pin) as session:
        parameters = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        public, _private = parameters.generate_keypair(
            store=True,
            label=KEY_LABEL,
            id=b"\x01",
            private_template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.PRIVATE: True,
            },
        )
        public_key = serialization.load_der_public_key(encode_ec_public_key(public))
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    signer = Pkcs11Signer.open(Pkcs11Uri.parse(ca.uri), pin, public_key)
    try:
        certificate = ca_certificate(signer, subject or CaSubject())
    finally:
        signer.close()
    # The PIN before the certificate: a certificate is what says the directory is complete.
    fd = os.open(ca.pin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(pin)
    ca.cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return ca


def _init_token(ca: TokenCa, pin: str) -> None:
    """A token labelled TOKEN_LABEL with user PIN ``pin`` and a random SO PIN, neither of
    which is ever on a command line."""
    throwaway_so, throwaway_user = secrets.token_hex(8), secrets.token_hex(8)
    done = subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            TOKEN_LABEL,
            "--so-pin",
            throwaway_so,
            "--pin",
            throwaway_user,
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(ca.conf)},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise CertificateAuthorityError(f"softhsm2-util --init-token failed: {done.stderr}")
    token = pkcs11.lib(ca.module).get_token(token_label=TOKEN_LABEL)
    with token.open(rw=True, user_pin=throwaway_user) as session:
        session.set_pin(throwaway_user, pin)
    with token.open(rw=True, so_pin=throwaway_so, user_type=UserType.SO) as session:
        session.set_pin(throwaway_so, secrets.token_urlsafe(18))
