import typer

app = typer.Typer(help="Train the Meissonic transformer on code shards.", add_completion=False)


@app.callback(invoke_without_command=True)
def main() -> None:
    typer.echo("train is not built yet (see the train issue).")
    raise typer.Exit(1)
