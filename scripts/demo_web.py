"""The demo's "web": real photos served on loopback, and LAION-like metadata pointing at them.

No network is reachable on the machines this demo must run on, so the image half of
`make demo` downloads from a local HTTP server instead of the internet. This script:
  1. makes a small image corpus from the photos that ship with scikit-image (random crops,
     flips and colour shifts of each), plus planted exact and near duplicates, a dead link,
     a corrupt file, and extra rows whose scores fail the filter (a low aesthetic or a likely
     watermark), so every curate step has real work (`--world shapes`: the same extra rows);
  2. writes `OUT/meta/part-00000.parquet` with LAION's columns (URL, TEXT, WIDTH, HEIGHT,
     similarity, hash, punsafe, pwatermark, aesthetic) and URLs on 127.0.0.1;
  3. serves `OUT/www` on 127.0.0.1 and runs the command given after `--` while serving.
The download's network guard refuses loopback unless allowed: pipelines.yaml's `demo-web`
allows 127.0.0.0/8, and so must a command given here.

    python scripts/demo_web.py --out demo/web --n 320 -- curate download -i demo/web/meta -o demo/images --allow-network 127.0.0.0/8
"""
from __future__ import annotations

import argparse
import functools
import io
import itertools
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from core import laion

# (skimage.data function, words for its captions)
PHOTOS = {
    "astronaut": "an astronaut in a white space suit with the american flag",
    "coffee": "a cup of coffee on a saucer on a wooden table",
    "chelsea": "a ginger tabby cat looking to the side",
    "rocket": "a rocket on the launch pad under a blue sky",
    "hubble_deep_field": "deep space full of distant galaxies",
    "immunohistochemistry": "a microscope image of stained tissue",
    "retina": "a photograph of the back of a human eye",
    "colorwheel": "a colour wheel with every hue",
    "logo": "the scikit-image logo, a snake on a grid",
    "camera": "a black and white photo of a cameraman with a tripod",
    "coins": "a grey photo of old coins on a table",
}
STYLES = ["a photo of", "a close-up of", "a picture showing", "an image of"]
TONES = {"warm": (1.15, 1.0, 0.85), "cool": (0.85, 1.0, 1.15), "natural": (1.0, 1.0, 1.0)}


def load_photos() -> dict[str, Image.Image]:
    import skimage.data as data

    out = {}
    for name in PHOTOS:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        out[name] = Image.fromarray(arr[..., :3].astype(np.uint8)).convert("RGB")
    return out


def variant(photo: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A random crop (40-100% of the short side), flip and tone of a photo, with caption words."""
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.4, 1.0))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    img = photo.crop((left, top, left + side, top + side)).resize((160, 160), Image.BICUBIC)
    words = []
    if rng.random() < 0.5:
        img, words = img.transpose(Image.FLIP_LEFT_RIGHT), ["mirrored"]
    tone = str(rng.choice(list(TONES)))
    gains = np.array(TONES[tone]) * rng.uniform(0.9, 1.1)
    img = Image.fromarray(np.clip(np.asarray(img) * gains, 0, 255).astype(np.uint8))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
    return img, " ".join(words + [tone, "tones"])


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_items(n: int, seed: int):
    """(file name, bytes or None for a dead link, caption, (w, h)) of the photo corpus: n
    variants of the scikit-image photos, planted exact and near duplicates, a dead link and a
    corrupt file."""
    rng = np.random.default_rng(seed)
    photos = load_photos()
    names = list(PHOTOS)
    for i in range(n):
        name = names[i % len(names)]
        img, extra = variant(photos[name], rng)
        text = f"{STYLES[i % len(STYLES)]} {PHOTOS[name]}, {extra}"
        data = jpeg(img)
        yield f"img{i:05d}.jpg", data, text, img.size
        if i % 10 == 3:  # the same bytes under another URL: an exact duplicate (sha256)
            yield f"copy{i:05d}.jpg", data, text + ", reposted", img.size
        if i % 10 == 7:  # re-encoded at low quality: a near duplicate (pHash)
            yield f"lowq{i:05d}.jpg", jpeg(img, 35), text + ", low quality", img.size
    yield "missing.jpg", None, "a link that is dead", (160, 160)  # 404
    yield "corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg", "a corrupt file", (160, 160)


def shape_items(n: int, seed: int):
    """The shapes world's training images (scripts/shapes_world.py), n per combination."""
    from shapes_world import training_items

    return training_items(per_combo=n, seed=seed)


def photo_rejects(n: int, seed: int):
    """Extra photo variants (n // 8 of them) whose metadata scores fail the filter: the filter
    has real rows to drop, and the score histograms straddle their thresholds."""
    rng = np.random.default_rng(seed + 1000)  # its own stream: the kept corpus does not change
    photos = load_photos()
    names = list(PHOTOS)
    for i in range(n // 8):
        name = names[int(rng.integers(len(names)))]
        img, extra = variant(photos[name], rng)
        yield f"reject{i:05d}.jpg", jpeg(img), f"{STYLES[i % len(STYLES)]} {PHOTOS[name]}, {extra}", img.size


def shape_rejects(n: int, seed: int):
    """Extra shapes-world pictures (one per 8 training pictures, of combinations that are not
    held out) whose metadata scores fail the filter; the training set stays as it is."""
    from shapes_world import SIZE, all_combos, held_out, png, random_image

    rng = np.random.default_rng(seed + 1000)
    skip = set(held_out(seed=seed))
    combos = [c for c in all_combos() if c not in skip]
    for i in range(len(combos) * n // 8):
        c = combos[int(rng.integers(len(combos)))]
        yield f"reject{i:05d}.png", png(random_image(c, rng)), c.caption, (SIZE, SIZE)


# --world: what the server holds (items, and rejects: extra rows whose scores fail the filter).
# --n is distinct photos, or images per shape combination.
WORLDS = {"photos": (photo_items, photo_rejects), "shapes": (shape_items, shape_rejects)}
# The demo pipelines' filter thresholds (aesthetic >= 4.5, pwatermark <= 0.5): rejects alternate
# between a low aesthetic and a likely watermark, everything else passes both.
REJECT_SCORES = ({"aesthetic": (3.0, 4.5)}, {"pwatermark": (0.55, 0.95)})


def build_corpus(out: Path, items, port: int, seed: int, rejects=()) -> int:
    """Write OUT/www/<files> and OUT/meta/part-00000.parquet (URLs on 127.0.0.1:port) from
    (file name, bytes or None, caption, (w, h)) items, then the rejects (scores that fail the
    filter); returns the number of rows."""
    www = out / "www"
    www.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    tagged = itertools.chain(((item, None) for item in items),
                             ((item, REJECT_SCORES[i % 2]) for i, item in enumerate(rejects)))
    for (fname, data, text, size), fail in tagged:
        if data is not None:
            (www / fname).write_bytes(data)
        url = f"http://127.0.0.1:{port}/{fname}"
        rows.append(dict(URL=url, TEXT=text, WIDTH=float(size[0]), HEIGHT=float(size[1]), fail=fail))
    write_metadata(out / "meta" / "part-00000.parquet", rows, np.random.default_rng(seed))
    return len(rows)


def write_shards(folder: Path, items, size: int, per_shard: int = 1000, seed: int = 0) -> int:
    """Items as webdataset shards laid out as `curate download` writes them (key = shard id +
    index; image, .txt, .json with LAION's score columns), for benchmarks that skip the HTTP
    round trip. Like the download: dead links and undecodable bytes are left out, and images not
    already size x size are resized (shorter side) and centre-cropped to it, then re-encoded as
    JPEG 95. Returns the number of samples written."""
    from core.image import decode_rgb
    from core.imageshard import Sample, write_shard

    rng = np.random.default_rng(seed)
    shards: dict[int, list] = {}
    for name, data, caption, _ in items:
        try:
            img = decode_rgb(data or b"")
        except Exception:  # the dead link and the corrupt file, as the download drops them
            continue
        ext = name.rsplit(".", 1)[1]
        if img.size != (size, size):
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            data, ext = jpeg(img.crop((left, top, left + size, top + size)), 95), "jpg"
        n = sum(len(v) for v in shards.values())
        meta = {"url": f"http://127.0.0.1/{name}", "caption": caption, "width": size, "height": size,
                "aesthetic": float(rng.uniform(4.6, 7.0)), "pwatermark": float(rng.uniform(0.0, 0.3)),
                "punsafe": float(rng.uniform(0.0, 0.1))}
        shard, index = divmod(n, per_shard)
        shards.setdefault(shard, []).append(Sample(f"{shard:05d}{index:04d}", data, ext, caption, meta))
    for shard, samples in shards.items():
        write_shard(Path(folder) / f"{shard:05d}.tar", samples)
    return sum(len(v) for v in shards.values())


def write_metadata(path: Path, rows: list[dict], rng: np.random.Generator) -> None:
    n = len(rows)
    table = pa.table(
        {
            "URL": [r["URL"] for r in rows],
            "TEXT": [r["TEXT"] for r in rows],
            "WIDTH": [r["WIDTH"] for r in rows],
            "HEIGHT": [r["HEIGHT"] for r in rows],
            "similarity": rng.uniform(0.25, 0.40, n),
            "hash": laion.hash64(pa.array([r["URL"] for r in rows]), pa.array([r["TEXT"] for r in rows])),
            "punsafe": rng.uniform(0.0, 0.1, n).astype(np.float32),
            "pwatermark": _scores(rows, "pwatermark", (0.0, 0.3), rng),
            "aesthetic": _scores(rows, "aesthetic", (4.6, 7.0), rng),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _scores(rows: list[dict], column: str, passing: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """float32 scores, uniform in `passing` but for rows whose `fail` range names this column."""
    values = rng.uniform(*passing, len(rows))
    for i, r in enumerate(rows):
        if r.get("fail") and column in r["fail"]:
            values[i] = rng.uniform(*r["fail"][column])
    return values.astype(np.float32)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per image would drown the demo's output
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for www/ and meta/")
    parser.add_argument("--world", choices=sorted(WORLDS), default="photos",
                        help="photos (scikit-image photos, planted duplicates) or shapes (scripts/shapes_world.py)")
    parser.add_argument("--n", type=int, default=320,
                        help="photos: distinct images before duplicates; shapes: images per combination")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command to run while serving")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    handler = functools.partial(QuietHandler, directory=str(args.out / "www"))
    (args.out / "www").mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    items, rejects = (make(args.n, args.seed) for make in WORLDS[args.world])
    n = build_corpus(args.out, items, server.server_address[1], args.seed, rejects)
    print(f"demo web: {n} URLs served from {args.out / 'www'} on 127.0.0.1:{server.server_address[1]}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return subprocess.call(command) if command else 0
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
