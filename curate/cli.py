"""Entry point of the `curate` console script: importing the command modules registers them."""
from curate._app import app
from curate import cmd_metadata, cmd_download, cmd_images  # noqa: F401  (register commands)

__all__ = ["app"]
