"""``slimserve`` command line: ``serve`` (other parts register more commands on ``app``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="slimserve: serve and optimize compressed models.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """slimserve: serve and optimize compressed models."""


def settings_from(**overrides: Any) -> Any:
    """Settings from the environment, with the CLI options that were given on top."""
    from pydantic import ValidationError

    from serving.settings import Settings

    given = {key: value for key, value in overrides.items() if value not in (None, [], ())}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def serve(
    repository: Annotated[
        Path | None, typer.Option(help="model repository folder [env SLIMSERVE_REPOSITORY]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port (0 picks a free one)")] = None,
    model_control_mode: Annotated[str | None, typer.Option(help="none | explicit | poll")] = None,
    load_model: Annotated[
        list[str] | None,
        typer.Option(help="model to load at start in explicit mode ('*' = all); repeatable"),
    ] = None,
    poll_interval: Annotated[float | None, typer.Option(help="poll mode: seconds")] = None,
    log_level: Annotated[str | None, typer.Option(help="critical|error|warning|info|debug")] = None,
) -> None:
    """Serve a model repository over KServe v2 / Triton HTTP."""
    import uvicorn

    from serving.app import build_server_app

    settings = settings_from(
        repository=repository,
        host=host,
        port=port,
        model_control_mode=model_control_mode,
        startup_models=load_model,
        poll_interval_s=poll_interval,
        log_level=log_level,
    )
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = uvicorn.Config(
        build_server_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=max(int(settings.drain_timeout_s), 1),
        lifespan="on",
        http="httptools",  # the C parser (uvicorn[standard]); never the pure-Python h11
        loop="uvloop",
        proxy_headers=False,  # nothing here reads client addresses; saves CPU per request
    )
    uvicorn.Server(config).run()


def _mount_pipeline_commands() -> None:
    """``optimize`` and ``report`` are the pipeline's own commands (optimizers/cli.py)."""
    from optimizers.cli import optimize, report

    app.command()(optimize)
    app.command()(report)


_mount_pipeline_commands()


def main() -> None:
    app()
