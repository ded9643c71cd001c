"""A captioned synthetic world: coloured shapes on coloured backgrounds.

Every caption says exactly what the pixels hold ("a red circle on a blue background"), so a
generated image can be judged against its prompt by pixel statistics alone (`judge`). Some
(shape, colour, background) combinations are held out: none of their images is in the
training metadata, while each of their pairs (shape+colour, colour+background,
shape+background) is. A model that renders a held-out prompt right has composed what it
learned rather than recalled a picture.

Used by `scripts/demo_web.py --world shapes` (served on loopback and curated like the photos),
by `bench/toy_t2i.py` and by the tests:

    from shapes_world import held_out, training_items, judge    # scripts/ on sys.path
"""
from __future__ import annotations

import io
import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Flat colours far apart in RGB, so the nearest palette colour names a pixel unambiguously even
# after a VQ round trip or a model's sampling noise (closest pair: ~200 apart of 441).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
# Share of its bounding box a shape fills: how `judge` tells the shapes apart.
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
SIZE = 64  # pixels per side of a served image
SUPERSAMPLE = 4  # drawn this many times larger, then box-filtered down: anti-aliased edges
CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


@dataclass(frozen=True)
class Combo:
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_combos() -> list[Combo]:
    """Every (shape, colour, background) with colour != background: 3 x 6 x 5 = 90."""
    return [Combo(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b]


def pairs(c: Combo) -> set[tuple[str, str, str]]:
    """The three pairs a combo is made of, tagged with their kind."""
    return {("shape+colour", c.shape, c.colour), ("colour+background", c.colour, c.background),
            ("shape+background", c.shape, c.background)}


def held_out(n: int = 6, seed: int = 0) -> list[Combo]:
    """n combos kept out of training, no two sharing a pair, so each of their pairs is still
    seen in training (with the other shapes, colours or backgrounds)."""
    combos = all_combos()
    order = np.random.default_rng(seed).permutation(len(combos))
    picked: list[Combo] = []
    used: set[tuple[str, str, str]] = set()
    for i in order:
        if len(picked) == n:
            break
        if not pairs(combos[i]) & used:
            picked.append(combos[i])
            used |= pairs(combos[i])
    if len(picked) < n:
        raise ValueError(f"cannot hold out {n} combos that share no pair (at most {len(picked)})")
    return picked


def parse_caption(text: str) -> Combo:
    """The combo a caption names; ValueError for any other text."""
    m = CAPTION.match(text.strip().lower())
    if not m or m[2] not in SHAPES or m[1] not in COLOURS or m[3] not in COLOURS:
        raise ValueError(f"not a shapes-world caption: {text!r} (e.g. {all_combos()[0].caption!r})")
    return Combo(m[2], m[1], m[3])


def render(c: Combo, cx: float, cy: float, side: float, size: int = SIZE) -> Image.Image:
    """The shape (bounding box `side` px, centred at (cx, cy)) on a flat background, RGB."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), COLOURS[c.background])
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = [v * k for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)]
    fill = COLOURS[c.colour]
    if c.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif c.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # triangle pointing up
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img.resize((size, size), Image.BOX)


def random_image(c: Combo, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """`c` at a random size (35-60% of the side) and position (centre within +-1/8 side)."""
    side = size * rng.uniform(0.35, 0.6)
    cx, cy = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    return render(c, cx, cy, side, size)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def training_items(per_combo: int = 30, holdout: int = 6, seed: int = 0):
    """(file name, PNG bytes, caption, (w, h)) for every image of the training set:
    `per_combo` images of each combo that is not held out (84 x 30 = 2,520 by default)."""
    rng = np.random.default_rng(seed + 1)
    skip = set(held_out(holdout, seed))
    i = 0
    for c in all_combos():
        if c in skip:
            continue
        for _ in range(per_combo):
            yield f"shape{i:05d}.png", png(random_image(c, rng)), c.caption, (SIZE, SIZE)
            i += 1


# ---------------------------------------------------------------- judging generated pictures
@dataclass(frozen=True)
class Verdict:
    background: str  # nearest palette colour of the border pixels
    colour: str  # nearest palette colour of most pixels that are not background
    shape: str  # the shape whose fill of its bounding box is nearest that of the blob
    area: float  # share of the image that is not background
    fill: float  # share of the blob's bounding box the blob fills
    colours_right: bool  # background and shape colour as the prompt says
    right: bool  # colours right, and the shape too, and one blob of a plausible size


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8/float RGB -> (...) index into COLOURS of the nearest palette colour."""
    palette = np.array(list(COLOURS.values()), np.float32)  # (K, 3)
    d = ((pixels[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)  # (..., K)
    return d.argmin(-1)


def judge(image: np.ndarray, want: Combo) -> Verdict:
    """Judge an (H, W, 3) uint8 image against the combo its prompt names.

    Background: the commonest palette colour of a 2-px border ring (shapes stay inside it).
    Blob: the largest 4-connected region of non-background pixels; its colour is their
    commonest palette colour, its shape the one whose fill ratio is nearest. "Right" also asks
    that the blob hold >= 80% of the non-background pixels and 3-50% of the image."""
    from scipy import ndimage

    names = list(COLOURS)
    labels = nearest_colour(image)  # (H, W)
    ring = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    bg = int(np.bincount(ring, minlength=len(names)).argmax())
    fg = labels != bg
    comp, n = ndimage.label(fg)
    if n == 0:
        return Verdict(names[bg], "none", "none", 0.0, 0.0, False, False)
    sizes = np.bincount(comp.ravel())[1:]
    blob = comp == 1 + int(sizes.argmax())
    colour = int(np.bincount(labels[blob], minlength=len(names)).argmax())
    ys, xs = np.nonzero(blob)
    fill = float(blob.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    area = float(fg.mean())
    colours_right = names[bg] == want.background and names[colour] == want.colour
    single = bool(blob.sum() >= 0.8 * fg.sum()) and 0.03 <= area <= 0.5
    return Verdict(names[bg], names[colour], shape, area, fill, bool(colours_right),
                   bool(colours_right and shape == want.shape and single))


def judge_grid(path, prompts: list[str], n: int, size: int = SIZE) -> list[dict]:
    """`train sample`'s grid (one row per prompt, n images of size x size per row) -> one
    verdict per image, as dicts with "prompt" and "seed" (the column)."""
    from core.image import decode_rgb  # the repository's one safe decoder

    with open(path, "rb") as f:
        grid = np.asarray(decode_rgb(f.read()))
    if grid.shape[0] < len(prompts) * size or grid.shape[1] < n * size:
        raise ValueError(f"{path}: {grid.shape[1]}x{grid.shape[0]} px is not a grid of {len(prompts)} rows x {n} "
                         f"images of {size} px")
    out = []
    for r, prompt in enumerate(prompts):
        for c in range(n):
            tile = grid[r * size:(r + 1) * size, c * size:(c + 1) * size]
            out.append({"prompt": prompt, "seed": c, **judge(tile, parse_caption(prompt)).__dict__})
    return out


def main() -> int:
    """`held-out`: the held-out captions, one a line. `judge GRID --n N [--prompt P ...]`: judge a
    `train sample` grid of those prompts (default: the held-out ones) by pixel statistics; one
    line per prompt; exit 0 when every prompt is right for at least half its images."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("what", choices=["held-out", "judge"])
    parser.add_argument("grid", nargs="?", help="judge: the PNG grid written by `train sample`")
    parser.add_argument("--holdout", type=int, default=6, help="combinations held out")
    parser.add_argument("--seed", type=int, default=0, help="world seed (which combinations are held out)")
    parser.add_argument("--n", type=int, default=4, help="judge: images per prompt (train sample --n)")
    parser.add_argument("--size", type=int, default=SIZE, help="judge: pixels per image side in the grid")
    parser.add_argument("--prompt", action="append", help="judge: the grid's prompts in order (default: held out)")
    args = parser.parse_args()
    held = [c.caption for c in held_out(args.holdout, args.seed)]
    if args.what == "held-out":
        print("\n".join(held))
        return 0
    if not args.grid:
        parser.error("judge needs the grid's path")
    prompts = args.prompt or held
    verdicts = judge_grid(args.grid, prompts, args.n, args.size)
    good = 0
    for p in prompts:
        mine = [v for v in verdicts if v["prompt"] == p]
        right = sum(v["right"] for v in mine)
        good += right * 2 >= len(mine)
        seen = ", ".join(f"{v['colour']} {v['shape']} on {v['background']}" for v in mine if not v["right"])
        print(f"  {right}/{len(mine)} right  {p}" + (f"   (wrong: {seen})" if seen else ""))
    print(f"{good} of {len(prompts)} prompts rendered right in at least half of their {args.n} images")
    return 0 if good == len(prompts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
