"""The `curate` typer app; command modules register on it (one module per command group)."""
import typer

app = typer.Typer(
    help="Curate LAION-style metadata and web images into training data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
