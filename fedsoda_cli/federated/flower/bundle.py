"""The Flower App that `flwr run` submits, and the environment that keeps Flower offline.

The app folder is written afresh for each run (so it works from any install of fedsoda): a
pyproject.toml naming fedsoda's ServerApp and ClientApp, and a module that imports them. The FAB
carries no fedsoda code; SuperLink and SuperNodes run the fedsoda installed beside Flower (the
same version on every machine), and runtime dependency installation stays off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import fedsoda_cli

APP_MODULE = "fedsoda_flower_app"

# Flower phones home by default (telemetry, an update check): off for every Flower process fedsoda starts.
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def offline_env(flwr_home: Path | None = None) -> dict[str, str]:
    """This process's environment, with Flower's phoning home off (and FLWR_HOME if given). Flower's
    commands (flower-superlink, flwr, and the flwr-*app processes Flower itself starts) are looked up
    first beside this Python, so an un-activated virtual environment works."""
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def write_app(folder: Path) -> Path:
    """The Flower App folder: pyproject.toml + the module that names the apps. Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedsoda-federate"
version = "{fedsoda_cli.__version__}"
description = "fedsoda federate: the round loop's relay (ServerApp) and the site bridge (ClientApp)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsoda"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server_app"
clientapp = "{APP_MODULE}:client_app"

[tool.flwr.app.config]
fedsoda-socket = ""
fedsoda-token = ""
""")
    (folder / f"{APP_MODULE}.py").write_text(
        '"""fedsoda\'s Flower apps (installed with fedsoda on every machine)."""\n\n'
        "from fedsoda_cli.federated.flower import clientapp, serverapp\n\n"
        "client_app = clientapp.app\n"
        "server_app = serverapp.app\n"
    )
    return folder


def write_cli_home(folder: Path, address: str, root_certificates: Path | None) -> Path:
    """A FLWR_HOME for the `flwr` CLI calls fedsoda makes, with one SuperLink connection "fedsoda"
    (TLS with `root_certificates`, or plain HTTP when None); the user's own FLWR_HOME is untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates else "insecure = true"
    (folder / "config.toml").write_text(
        f'[superlink]\ndefault = "fedsoda"\n\n[superlink.fedsoda]\naddress = "{address}"\n{security}\n'
    )
    return folder
