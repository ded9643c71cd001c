import typer

app = typer.Typer(help="Encode image shards into VQ code shards.", add_completion=False)


@app.callback(invoke_without_command=True)
def main() -> None:
    typer.echo("pretokenize is not built yet (see the pretokenize issue).")
    raise typer.Exit(1)
