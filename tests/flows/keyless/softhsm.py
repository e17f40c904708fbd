"""A private SoftHSM2 for the keyless tests, loaded from a copy of its module.

SoftHSM2 reads ``SOFTHSM2_CONF`` once, at C_Initialize, and python-pkcs11
keeps one initialised module per path per process; the ``softhsm`` fixture of
tests/unit/keys/test_root.py therefore fails when the real module was loaded
before it ran, which pytest-xdist makes a matter of luck when both test
modules land in one worker. Loading a *copy* of ``libsofthsm2.so`` from a
temporary directory sidesteps that: the dynamic loader treats another file
as another library, with its own state and its own configuration, so these
tests and test_root.py's can share a process in either order. (One shared
fixture in tests/conftest.py would be the tidier cure.)

As in test_root.py, a missing SoftHSM2 or python-pkcs11 fails the test under
``CI=true`` and skips it otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import missing

from keybroker.errors import RootKeyError
from keybroker.keys.root import find_pkcs11_module

USER_PIN = "kl-user-5512"
SO_PIN = "kl-so-9046"


@dataclass(frozen=True)
class SoftHSM:
    #: Path of this process's private copy of libsofthsm2.so (already initialised).
    module: str
    #: Labels of the tokens, all with :data:`USER_PIN` and :data:`SO_PIN`.
    tokens: tuple[str, ...]
    conf: Path


def start_softhsm(base: Path, tokens: tuple[str, ...]) -> SoftHSM:
    """Make ``tokens`` in a token directory under ``base`` and load a private SoftHSM2 on it.

    Every token must exist before the module is initialised: SoftHSM2 does not
    see a token that another process (softhsm2-util) makes later.
    """
    util = shutil.which("softhsm2-util")
    try:
        real = os.path.realpath(find_pkcs11_module())
    except RootKeyError:
        real = ""
    if util is None or not real:
        missing("SoftHSM2 (softhsm2-util and libsofthsm2.so)")
    try:
        import pkcs11
    except ImportError:
        missing("python-pkcs11")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label in tokens:
        subprocess.run(
            [
                util,
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                USER_PIN,
                "--so-pin",
                SO_PIN,
            ],
            check=True,
            capture_output=True,
            env=env,
        )
    module = str(base / "libsofthsm2-keyless.so")
    shutil.copyfile(real, module)
    # SOFTHSM2_CONF is read now, at C_Initialize, and only now; put back
    # whatever another fixture had set, since its module already read it.
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        pkcs11.lib(module)
    finally:
        if saved is None:
            del os.environ["SOFTHSM2_CONF"]
        else:
            os.environ["SOFTHSM2_CONF"] = saved
    return SoftHSM(module, tokens, conf)
