"""The embedded demo dataset: generated "paintings" with the exact schema of ``huggan/wikiart``.

It lets a newcomer run the whole pipeline offline on a laptop, and gives the tests a dataset with
a known answer. Each style is a recipe of what the CRNN is built to see: palette, mark type
(bands, dots, dabs, blocks, polygons, strokes), and mark direction (horizontal vs vertical
structure is exactly what the row and column GRUs tell apart: two styles share a palette and
differ only in direction). Genres add a composition on top (horizon, figure, buildings, objects),
artists a personal hue shift. A known share of rows carries a deliberately wrong style label;
their row ids are written to ``wrong_labels.csv`` so outlier detection can be scored.

Rows are ordered by artist, like the Hub dataset, so code that takes "the first N" as a sample
fails here as it would on the real data.
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

STYLE_NAMES = [
    "Abstract_Expressionism", "Action_painting", "Analytical_Cubism", "Art_Nouveau", "Baroque",
    "Color_Field_Painting", "Contemporary_Realism", "Cubism", "Early_Renaissance", "Expressionism",
    "Fauvism", "High_Renaissance", "Impressionism", "Mannerism_Late_Renaissance", "Minimalism",
    "Naive_Art_Primitivism", "New_Realism", "Northern_Renaissance", "Pointillism", "Pop_Art",
    "Post_Impressionism", "Realism", "Rococo", "Romanticism", "Symbolism", "Synthetic_Cubism", "Ukiyo_e",
]
GENRE_NAMES = [
    "abstract_painting", "cityscape", "genre_painting", "illustration", "landscape", "nude_painting",
    "portrait", "religious_painting", "sketch_and_study", "still_life", "Unknown Genre",
]
# "Unknown Artist" first, as on the Hub; then the 23 artists of the ArtGAN protocol in Hub spelling.
ARTIST_NAMES = [
    "Unknown Artist", "boris-kustodiev", "camille-pissarro", "childe-hassam", "claude-monet", "edgar-degas",
    "eugene-boudin", "gustave-dore", "ilya-repin", "ivan-aivazovsky", "ivan-shishkin", "john-singer-sargent",
    "marc-chagall", "martiros-saryan", "nicholas-roerich", "pablo-picasso", "paul-cezanne",
    "pierre-auguste-renoir", "pyotr-konchalovsky", "raphael-kirchner", "rembrandt", "salvador-dali",
    "vincent-van-gogh", "albrecht-durer",
]
DEMO_GENRES = ["abstract_painting", "cityscape", "landscape", "portrait", "still_life"]


@dataclass(frozen=True)
class StyleRecipe:
    name: str
    hue: float          # palette centre, 0..1
    hue_spread: float
    saturation: float
    value: float
    background: str     # "flat", "dark", "gradient"
    marks: str          # "bands", "dots", "dabs", "blocks", "polygons", "strokes"
    direction: str      # "h", "v", "diag", "any"
    mark_size: float    # share of the image side
    density: int


# The first eight are hand-made to be distinct; Color_Field_Painting and Minimalism share a palette
# and differ only by direction, so the demo rewards the row/column reading.
_CURATED = [
    StyleRecipe("Color_Field_Painting", 0.58, 0.10, 0.65, 0.80, "flat", "bands", "h", 0.22, 4),
    StyleRecipe("Minimalism", 0.58, 0.10, 0.65, 0.80, "flat", "bands", "v", 0.22, 4),
    StyleRecipe("Pointillism", 0.15, 0.35, 0.55, 0.95, "flat", "dots", "any", 0.035, 260),
    StyleRecipe("Impressionism", 0.30, 0.25, 0.40, 0.90, "gradient", "dabs", "h", 0.10, 120),
    StyleRecipe("Cubism", 0.08, 0.05, 0.45, 0.60, "flat", "polygons", "any", 0.35, 14),
    StyleRecipe("Baroque", 0.06, 0.04, 0.75, 0.85, "dark", "dabs", "any", 0.10, 30),
    StyleRecipe("Pop_Art", 0.00, 0.50, 0.95, 0.95, "flat", "blocks", "any", 0.25, 12),
    StyleRecipe("Ukiyo_e", 0.55, 0.08, 0.35, 0.92, "flat", "strokes", "h", 0.60, 10),
]
_MARKS = ["bands", "dots", "dabs", "blocks", "polygons", "strokes"]
_DIRECTIONS = ["h", "v", "diag", "any"]
_BACKGROUNDS = ["flat", "dark", "gradient"]


def style_recipes() -> list[StyleRecipe]:
    """All 27 recipes: the curated ones, then the remaining styles from a fixed parametric grid."""
    curated = {r.name for r in _CURATED}
    rng = np.random.default_rng(1234)
    rest = []
    for i, name in enumerate(n for n in STYLE_NAMES if n not in curated):
        rest.append(StyleRecipe(
            name, hue=(i * 0.137) % 1.0, hue_spread=float(rng.uniform(0.03, 0.3)),
            saturation=float(rng.uniform(0.35, 0.95)), value=float(rng.uniform(0.55, 0.95)),
            background=_BACKGROUNDS[i % 3], marks=_MARKS[i % 6], direction=_DIRECTIONS[(i // 2) % 4],
            mark_size=float(rng.uniform(0.05, 0.3)), density=int(rng.integers(8, 120)),
        ))
    return _CURATED + rest


@dataclass(frozen=True)
class DemoParams:
    size: int = 1600
    image_side: int = 96
    styles: int = 8
    noise: float = 0.03
    seed: int = 0


def _colour(rng: np.random.Generator, recipe: StyleRecipe, hue_shift: float) -> tuple[int, int, int]:
    h = (recipe.hue + hue_shift + rng.normal(0, recipe.hue_spread)) % 1.0
    s = float(np.clip(recipe.saturation + rng.normal(0, 0.08), 0, 1))
    v = float(np.clip(recipe.value + rng.normal(0, 0.08), 0, 1))
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _angle(rng: np.random.Generator, direction: str) -> float:
    base = {"h": 0.0, "v": math.pi / 2, "diag": math.pi / 4}.get(direction)
    return float(rng.uniform(0, math.pi)) if base is None else base + float(rng.normal(0, 0.12))


def _draw_marks(draw: ImageDraw.ImageDraw, recipe: StyleRecipe, hue_shift: float, side: int,
                rng: np.random.Generator) -> None:
    """The style's marks (bands, dots, dabs, strokes, blocks or polygons) over the background."""
    size = max(2.0, recipe.mark_size * side)
    if recipe.marks == "bands":
        n = max(2, recipe.density + int(rng.integers(-1, 2)))
        edges = np.sort(rng.uniform(0, side, n - 1)).tolist()
        edges = [0.0, *edges, float(side)]
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            box = [0, a, side, b] if recipe.direction == "h" else [a, 0, b, side]
            draw.rectangle(box, fill=_colour(rng, recipe, hue_shift))
    elif recipe.marks == "dots":
        for _ in range(recipe.density):
            x, y = rng.uniform(0, side, 2)
            r = size * rng.uniform(0.6, 1.2)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_colour(rng, recipe, hue_shift))
    elif recipe.marks in ("dabs", "strokes"):
        width = max(1, int(size * (0.35 if recipe.marks == "dabs" else 0.06)))
        for _ in range(recipe.density):
            x, y = rng.uniform(0, side, 2)
            if recipe.background == "dark":
                x, y = side / 2 + rng.normal(0, side / 6), side / 2 + rng.normal(0, side / 6)
            a = _angle(rng, recipe.direction)
            length = size * rng.uniform(0.7, 1.3)
            dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=_colour(rng, recipe, hue_shift), width=width)
    elif recipe.marks == "blocks":
        cells = max(2, int(round(1 / recipe.mark_size)))
        step = side / cells
        for i in range(cells):
            for j in range(cells):
                draw.rectangle([i * step, j * step, (i + 1) * step, (j + 1) * step],
                               fill=_colour(rng, recipe, hue_shift + rng.choice([0, 0.33, 0.66])),
                               outline=(0, 0, 0), width=max(1, side // 48))
    elif recipe.marks == "polygons":
        for _ in range(recipe.density):
            cx, cy = rng.uniform(0, side, 2)
            pts = [(cx + rng.normal(0, size / 2), cy + rng.normal(0, size / 2)) for _ in range(4)]
            draw.polygon(pts, fill=_colour(rng, recipe, hue_shift), outline=(40, 30, 20))



def paint(recipe: StyleRecipe, genre: str, hue_shift: float, side: int, rng: np.random.Generator) -> Image.Image:
    """Draw one painting; all randomness comes from ``rng``."""
    if recipe.background == "dark":
        bg = (int(rng.integers(5, 30)), int(rng.integers(5, 25)), int(rng.integers(0, 20)))
    else:
        bg = _colour(rng, recipe, hue_shift + 0.5 * (recipe.background == "gradient"))
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    if recipe.background == "gradient":
        top = np.array(_colour(rng, recipe, hue_shift))
        for y in range(side):
            t = y / max(side - 1, 1)
            draw.line([(0, y), (side, y)], fill=tuple(int(c) for c in top * (1 - t) + np.array(bg) * t))

    _draw_marks(draw, recipe, hue_shift, side, rng)
    _compose_genre(draw, genre, side, rng)
    if recipe.marks in ("dabs", "dots") and recipe.background != "dark":
        img = img.filter(ImageFilter.SMOOTH)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (side, side, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _compose_genre(draw: ImageDraw.ImageDraw, genre: str, side: int, rng: np.random.Generator) -> None:
    """A faint subject drawn over the style: what a genre label would be about."""
    ink = tuple(int(v) for v in rng.integers(20, 90, 3))
    if genre == "landscape":
        y = side * rng.uniform(0.55, 0.7)
        draw.line([(0, y), (side, y + rng.normal(0, side * 0.03))], fill=ink, width=max(1, side // 40))
    elif genre == "portrait":
        r = side * rng.uniform(0.16, 0.22)
        draw.ellipse([side / 2 - r, side * 0.38 - r * 1.2, side / 2 + r, side * 0.38 + r * 1.2],
                     outline=ink, width=max(1, side // 32))
    elif genre == "cityscape":
        for _ in range(int(rng.integers(3, 6))):
            x = rng.uniform(0, side * 0.85)
            w, h = side * rng.uniform(0.06, 0.14), side * rng.uniform(0.25, 0.55)
            draw.rectangle([x, side - h, x + w, side], outline=ink, width=max(1, side // 48))
    elif genre == "still_life":
        for _ in range(3):
            r = side * rng.uniform(0.06, 0.1)
            x, y = side * rng.uniform(0.3, 0.7), side * rng.uniform(0.6, 0.8)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=ink, width=max(1, side // 48))


def generate_demo(out_dir: str | Path, params: DemoParams) -> Path:
    """Write the demo dataset with ``save_to_disk`` under ``out_dir``; reuse it if already there.

    Returns the folder that ``datasets.load_from_disk`` opens. Writes ``wrong_labels.csv``
    (``row,given_style,true_style``) and ``demo_info.json`` beside the data.
    """
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    out = Path(out_dir)
    info_path = out / "demo_info.json"
    wanted = asdict(params)
    if info_path.is_file() and json.loads(info_path.read_text()).get("params") == wanted:
        return out / "dataset"

    rng = np.random.default_rng(params.seed)
    recipes = style_recipes()[: params.styles]
    artists_of_style = {r.name: [1 + (2 * i + k) % (len(ARTIST_NAMES) - 1) for k in range(2)]
                        for i, r in enumerate(recipes)}
    artist_shift = {a: float(rng.normal(0, 0.03)) for a in range(len(ARTIST_NAMES))}

    rows = []
    for _ in range(params.size):
        recipe = recipes[int(rng.integers(len(recipes)))]
        genre = DEMO_GENRES[int(rng.integers(len(DEMO_GENRES)))]
        artist = int(rng.choice(artists_of_style[recipe.name]))
        known_artist = rng.uniform() >= 0.15
        known_genre = rng.uniform() >= 0.10
        image = paint(recipe, genre, artist_shift[artist], params.image_side, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        rows.append({
            "image": {"bytes": buffer.getvalue(), "path": None},
            "artist": artist if known_artist else 0,
            "genre": GENRE_NAMES.index(genre) if known_genre else GENRE_NAMES.index("Unknown Genre"),
            "style": STYLE_NAMES.index(recipe.name),
        })
    rows.sort(key=lambda r: r["artist"])  # ordered by artist, as on the Hub

    n_wrong = int(round(params.noise * params.size))
    wrong_rows = sorted(rng.choice(params.size, size=n_wrong, replace=False).tolist())
    used_styles = [STYLE_NAMES.index(r.name) for r in recipes]
    wrong = []
    for row in wrong_rows:
        true_style = rows[row]["style"]
        given = int(rng.choice([s for s in used_styles if s != true_style]))
        rows[row]["style"] = given
        wrong.append((row, STYLE_NAMES[given], STYLE_NAMES[true_style]))

    features = Features({
        "image": ImageFeature(),
        "artist": ClassLabel(names=ARTIST_NAMES),
        "genre": ClassLabel(names=GENRE_NAMES),
        "style": ClassLabel(names=STYLE_NAMES),
    })
    columns = {k: [r[k] for r in rows] for k in ("image", "artist", "genre", "style")}
    dataset = Dataset.from_dict(columns, features=features)

    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # several processes may race to generate
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from datasets import disable_progress_bars, enable_progress_bars

    disable_progress_bars()
    try:
        dataset.save_to_disk(str(tmp / "dataset"))
    finally:
        enable_progress_bars()
    with open(tmp / "wrong_labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "given_style", "true_style"])
        writer.writerows(wrong)
    (tmp / "demo_info.json").write_text(json.dumps({
        "params": wanted, "styles": [r.name for r in recipes], "wrong_labels": len(wrong),
    }, indent=2))
    if info_path.is_file() and json.loads(info_path.read_text()).get("params") == wanted:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        return out / "dataset"
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out / "dataset"


def read_wrong_labels(demo_dir: str | Path) -> dict[int, tuple[str, str]]:
    """Row id -> (given style, true style) for the deliberately mislabelled demo rows."""
    with open(Path(demo_dir) / "wrong_labels.csv", newline="") as fh:
        return {int(r["row"]): (r["given_style"], r["true_style"]) for r in csv.DictReader(fh)}
