"""``slimserve optimize`` / ``slimserve report``: the pipeline offline, with a progress bar.

A typer app named ``app``; the server's CLI mounts it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from optimizers.api import OptimizationRequest, OptimizationResult, run_optimization
from optimizers.report import plot, read_report, render_table
from serving.errors import SlimServeError

app = typer.Typer(help="Compress a model into a faster engine, measured.", no_args_is_help=True)
console = Console(width=180)


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="ONNX file, HF checkpoint folder/archive, .pt2")],
    target: Annotated[str, typer.Option(help="cpu | cuda | tensorrt")] = "cpu",
    min_cosine: Annotated[float | None, typer.Option(help="fidelity bound: cosine")] = 0.99,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help="fidelity bound: accuracy / top-1 drop")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help=".npz of inputs or text file, one example a line")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="batch size to optimize for")] = 8,
    seq_len: Annotated[int, typer.Option(help="sequence length to optimize for")] = 128,
    allow: Annotated[str | None, typer.Option(help="comma-separated pass names")] = None,
    require: Annotated[
        str | None, typer.Option(help="comma-separated passes the result must contain")
    ] = None,
    time_budget: Annotated[float | None, typer.Option(help="seconds")] = None,
    static_shape: Annotated[
        bool,
        typer.Option(help="time and serve OpenVINO candidates compiled for batch x seq only"),
    ] = False,
    repository: Annotated[
        Path | None, typer.Option(help="publish into this model repository")
    ] = None,
    name: Annotated[str | None, typer.Option(help="model name (default: file stem)")] = None,
    output: Annotated[
        Path | None, typer.Option(help="where to keep the work folder and result")
    ] = None,
) -> None:
    """Run the optimization pipeline on MODEL and print the candidate table."""
    model_name = name or model.name.split(".")[0]
    try:
        request = OptimizationRequest(
            name=model_name,
            target=target,
            batch_size=batch_size,
            seq_len=seq_len,
            min_cosine=min_cosine,
            max_accuracy_drop=max_accuracy_drop,
            time_budget_s=time_budget,
            allow=tuple(a.strip() for a in allow.split(",") if a.strip()) if allow else None,
            require=tuple(a.strip() for a in require.split(",") if a.strip()) if require else None,
            static_shape=static_shape,
        )
    except SlimServeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    workdir = output or Path(tempfile.mkdtemp(prefix=f"slimserve-optimize-{model_name}-"))
    with Progress(
        TextColumn("[bold]{task.fields[stage]}"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("starting", total=1.0, stage="load")

        def on_progress(event: dict) -> None:
            fraction = event.get("fraction")
            bar.update(
                task,
                description=str(event.get("message", ""))[:90],
                stage=event.get("stage", ""),
                completed=fraction if fraction is not None else None,
            )

        try:
            result = run_optimization(
                model, request, workdir, calibration=calibration, progress=on_progress
            )
        except SlimServeError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    console.print(render_table(result.report))
    winner = result.report["winner"]
    console.print(f"winner: [bold]{winner['label']}[/bold] ({winner['latency_ms']:.2f} ms)")
    if result.report.get("fidelity_note"):
        console.print(f"[yellow]note:[/yellow] {result.report['fidelity_note']}")
    if repository is not None:
        version = publish(result, repository, model_name)
        console.print(f"published {model_name} version {version} in {repository}")
    console.print(f"engine: {result.engine_file}\nreport: {result.files['report.json']}")


def publish(result: OptimizationResult, repository: Path, name: str) -> int:
    """Publish the winner as a new version (the original first, as version 1, for a new model)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from serving.model_config import autocomplete_from_onnx
    from serving.repository import ModelRepository

    repository.mkdir(parents=True, exist_ok=True)
    repo = ModelRepository(repository)
    config = None
    if not (repo.model_dir(name) / "config.pbtxt").is_file():
        config = autocomplete_from_onnx(mc.ModelConfig(), result.original_file, name=name)
        files = {"model.onnx": result.original_file, **result.original_files}
        repo.publish_version(name, files, config=config)
    files = {"model.onnx": result.engine_file, **result.files}
    return repo.publish_version(name, files)


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="version folder or report.json")],
    png: Annotated[bool, typer.Option(help="(re)draw report.png beside it")] = False,
) -> None:
    """Render an existing optimization report as a table."""
    try:
        data = read_report(path)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(render_table(data))
    winner = data.get("winner") or {}
    console.print(f"winner: {winner.get('label')} ({winner.get('latency_ms')} ms)")
    if png:
        folder = path if path.is_dir() else path.parent
        console.print(f"plot: {plot(data, folder / 'report.png')}")


if __name__ == "__main__":
    app()
