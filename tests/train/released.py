"""Names and shapes of the released Meissonic transformer's 867 tensors (copied from
shared/reference into meissonic_transformer_state_dict.tsv), for the model and release tests."""
from __future__ import annotations

from pathlib import Path

TSV = Path(__file__).with_name("meissonic_transformer_state_dict.tsv")
RELEASED_PARAMS = 1_006_946_304  # with the 2x2 compression layers (the 1024 px checkpoint)


def released_shapes() -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of the released state dict."""
    rows = [line.split("\t") for line in TSV.read_text().splitlines()[1:] if line]
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape in rows}
