"""Image normalisation for shards: composite transparency on white, fit to a square, encode PNG."""
import io

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def on_white(img):
    """RGB (or L) image with any transparency (RGBA, LA, palette+tRNS) composited on white."""
    if img.mode == "P":
        img = img.convert("RGBA")  # palette transparency lives in info['transparency']
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    return img


def fit_square(img, size, crop="pad"):
    """Resize to size x size: 'center' crops the long side, 'pad' keeps the whole image on white."""
    if crop == "center":
        return ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS)
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != img.size:
        img = img.resize(new, Image.Resampling.LANCZOS)
    canvas = Image.new(img.mode, (size, size), 255 if img.mode == "L" else (255, 255, 255))
    canvas.paste(img, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def normalise(img, size=None, crop="pad", grayscale=False):
    img = on_white(img)
    img = img.convert("L" if grayscale else "RGB")  # one channel count for the whole data set
    if size is not None and img.size != (size, size):
        img = fit_square(img, size, crop)
    return img


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # lossless; level 1 is ~5x faster than 6 at similar size
    return buf.getvalue()
