"""Reading image, mask and label files: PNG/JPEG/BMP with OpenCV, TIFF with tifffile (16-bit, OME and ImageJ).
A JPEG is turned as its EXIF orientation tag says. A mask drawn in its alpha channel alone is read from it.

Images may be grey, RGB, RGBA (alpha is dropped) or 16-bit. 8-bit images are divided by 255; 16-bit (and float)
images are scaled to [0, 1] by their own minimum and maximum, because microscopes rarely use the whole 16-bit
range; a run trained with ``--normalization percentile`` stretches every image by its own percentiles instead.
Masks hold 0/255 or 0/1 and become {0, 1}; label images hold one integer per nucleus, 0 = background; an indexed
(palette) PNG mask or label image is read as its indices, as a TIFF's are, where its palette only colours them
(an annotation tool's or ImageJ's LUT), and so is an indexed PNG image whose palette ramps one colour up from black
(Fiji saves an 8-bit image shown with its Blue or Green LUT so): its indices are the intensities. Every unreadable
or inconsistent file is a DataError naming it. The network then sees ``(x - 0.5) / 0.25`` of those [0, 1] values
(:func:`normalize`), in training and at prediction alike.
"""
import io
import math
import os
import re
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import cv2
import numpy as np
import tifffile
from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin
from skimage.measure import label as connected_regions

from utils import DataError, ram

TIFF_EXTS = (".tif", ".tiff")
JPEG_EXTS = (".jpg", ".jpeg")
CELLPOSE_NOT_IMAGES = ("_masks", "_flows")  # files beside the images in Cellpose's folders: <id>_masks, <id>_flows
JPEG_SIGNATURE = b"\xff\xd8\xff"
INVERTING_LUT = np.repeat(np.arange(255, -1, -1, dtype=np.uint8)[:, None], 3, axis=1)  # ImageJ's: i shown 255 - i
NORMALIZATIONS = ("fixed", "percentile", "percentile_dark")  # train.py --normalization
# train.py --shot_noise: the share of training images made low-light, and the most photons at the value 1 they
# get (noise about 3 % of the signal there); augment.ShotNoise and device_data.shot_noise draw them alike
SHOT_NOISE_P, MOST_PHOTONS = 0.5, 1000
# train.py --blur: the share of training images defocused, and the largest sigma (px) --blur takes: at 10 px a
# nucleus of the bundled model's 19 px is a faint smudge, past what bench/robustness.py measured (4 px)
BLUR_P, MOST_BLUR = 0.5, 10
# Nearest-neighbour resizing with pixel centres aligned as INTER_LINEAR aligns them (cv2.INTER_NEAREST samples
# each output pixel's top-left corner: shrunk 1000 -> 96 px, its labels sat half a pixel off the linearly resized
# image and mask)
NEAREST = cv2.INTER_NEAREST_EXACT
# The most pixels OpenCV decodes in one image (its CV_IO_MAX_IMAGE_PIXELS): more is a damaged header or a
# decompression bomb (a small file that decodes to gigabytes). tifffile has no limit: a TIFF is refused when its
# header claims more bytes than the memory available (one page of a stack read page by page, read_planes), and a
# whole-slide scan that fits is read
MAX_PIXELS = 1 << 30
# Micrometres per unit of length, as ImageJ's `unit` and OME's PhysicalSizeXUnit name it (lower case): another unit
# gives no pixel size (tiff_pixel_size); "pixel" is an uncalibrated image's
MICROMETRES = {"m": 1e6, "cm": 1e4, "mm": 1e3, "micron": 1, "microns": 1, "um": 1, "\u00b5m": 1, "\u03bcm": 1,
               "nm": 1e-3, "\u00e5": 1e-4, "in": 25400, "inch": 25400}
UNCALIBRATED = ("", "pixel", "pixels")
RESOLUTION_UNITS = {2: "inch", 3: "cm"}  # the TIFF ResolutionUnit tag's INCH and CENTIMETER
# Whole dots per inch up to this are a print or screen resolution (72, 96, 300, 1200: 21-353 um pixels), which
# software writes by default; a microscope's pixels are finer than 20 um
PRINT_DPI = 1200
SQUARE = 1e-6  # pixel sizes X and Y that differ by more, relatively, are non-square
# Pixel sizes in micrometres (1 pm to 1 m) that a TIFF's resolution, a fraction of two 32-bit integers, holds as
# pixels per micrometre: tifffile fails to write a finer one, and writes a coarser one as 0
PIXEL_SIZES = (1e-6, 1e6)
# The least share of the median nucleus's area that a part of an id counts from (multi_object_ids): a stray speck of the
# annotator's brush beside a nucleus is smaller
LEAST_PART = 0.25
PERCENTILES = (1.0, 99.8)  # CSBDeep's and StarDist's default normalize(x, 1, 99.8)
NORM_MEAN = 0.5
NORM_STD = 0.25


def _check_exists(path, what):
    """A DataError naming the file unless it exists and this user may read it (OpenCV says neither: it returns
    None for both)."""
    if not os.path.isfile(path):
        raise DataError(f"{what} file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {what} {path}: permission denied; make it readable (chmod a+r) or run as a "
                        "user who may read it")


def _imread(path, flags, what):
    """cv2.imread (tifffile for TIFFs) with a DataError naming the file when it is missing or not a readable image.
    A TIFF must hold one 2D image: [H, W] or [H, W, C]."""
    path = str(path)
    _check_exists(path, what)
    if path.lower().endswith(TIFF_EXTS):
        img = _one_plane(*tiff_planes(path, what), path, what)
        return img[:, :, 0] if img.shape[2] == 1 else img
    img = opencv_read(path, flags, what)
    if img is None or img.size == 0:
        raise DataError(f"cannot read {what} {path}: the file is not a readable image (truncated or wrong format?)")
    return img


def _read_values(path, what):
    """A mask's or label image's values as stored: :func:`_imread` unchanged, but an indexed (palette) PNG as its
    indices [H, W] where :func:`_palette_indices` says they are the values. A JPEG, whatever its name, is a
    DataError."""
    stored = _imread(path, cv2.IMREAD_UNCHANGED, what)
    with open(path, "rb") as f:
        if f.read(3) == JPEG_SIGNATURE:  # even at quality 75 a 0/1 mask's edges flip and keep only 0 and 1
            raise DataError(f"{what} {path} is a JPEG, whose lossy compression changes values at the nuclei's edges "
                            f"(pixels flip, ids blur into others); save {what}s as PNG or TIFF")
    indexed = _png_palette(path, what) if stored.ndim == 3 else None
    return stored if indexed is None or not _palette_indices(*indexed) else indexed[0]


def _png_palette(path, what):
    """(indices uint8 [H, W], palette uint8 [P, 3]) of an indexed (palette) PNG, read with PIL since OpenCV gives
    only the colours; None for any other file."""
    with open(path, "rb") as f:
        data = f.read(26)
        if data[:8] != b"\x89PNG\r\n\x1a\n" or data[25:26] != b"\x03":  # IHDR colour type 3: indexed
            return None
        data += f.read()
    # its critical chunks alone (IHDR, PLTE, IDAT, IEND: a capital first letter): libpng, which OpenCV reads with,
    # skips an ancillary chunk it cannot use (a text's bad checksum) where PIL refuses the whole file
    chunks, at = [data[:8]], 8
    while at + 8 <= len(data):
        end = at + 12 + int.from_bytes(data[at:at + 4], "big")
        if data[at + 4:at + 5].isupper():
            chunks.append(data[at:end])
        at = end
    try:
        # not Image.open: its pixel limit refuses large scans
        with PngImagePlugin.PngImageFile(io.BytesIO(b"".join(chunks)), path) as png:
            indices, palette = np.asarray(png), np.asarray(png.getpalette(), np.uint8).reshape(-1, 3)
    except Exception as e:  # PIL raises SyntaxError, OSError, ... for damaged files
        raise DataError(f"cannot read {what} {path}: not a readable PNG ({str(e).splitlines()[0][:80]})") from None
    if indices.max(initial=0) >= len(palette):  # libpng shows such pixels black: a mask's nuclei would vanish
        raise DataError(f"cannot read {what} {path}: its pixels use palette entry {indices.max()} of a palette of "
                        f"{len(palette)} colours (a damaged file); save it again")
    return indices, palette


def _palette_indices(indices, palette):
    """Whether an indexed PNG's indices [H, W] are its values and its palette [P, 3] only colours them on screen
    (else OpenCV's reading, the palette's colours, are the values). The indices are the values under ImageJ's
    inverting LUT (a binary mask, 255 = nucleus, shown black, read inverted from the colours) and under colours on
    a black index 0 (the classes or ids of labelme, VOC, CVAT, or of an ImageJ LUT such as glasbey_on_dark). A grey
    palette, or colours on another index 0, is a PNG optimiser's reordering of the colours, which are then the
    values."""
    used = palette[np.unique(indices)]
    if palette.shape == INVERTING_LUT.shape and (palette == INVERTING_LUT).all():
        return True
    return bool((palette[0] == 0).all() and (used != used[:, :1]).any())


def one_hue_ramp(palette):
    """Whether a palette [P, 3] is one colour ramped up from black over 256 entries: an ImageJ LUT such as Blue,
    Green or Cyan on an 8-bit image, whose indices are the intensities that a microscope measured."""
    if palette.shape != (256, 3) or not palette[-1].any():
        return False
    ramp = np.outer(np.arange(256) / 255, palette[-1].astype(np.float64))
    return bool(np.abs(palette - ramp).max() <= 1)


def opencv_read(path, flags, what):
    """cv2.imread (None for a file it cannot decode), with a DataError naming the file where OpenCV raises instead:
    a header that claims more than :data:`MAX_PIXELS` pixels, or no memory for them."""
    try:
        return cv2.imread(path, flags)
    except cv2.error as e:
        reason = f"it claims more than {MAX_PIXELS} pixels, OpenCV's limit" if "MAX_IMAGE_PIXELS" in e.err else e.err
        raise DataError(f"cannot read {what} {path}: {reason} (a damaged file, or a decompression bomb; a real image "
                        "that large must be cut into smaller files)") from None


def _one_plane(planes, plane_axes, path, what):
    """planes [N, H, W, C] -> the image [H, W, C]; a stack (N > 1) is a DataError naming the file."""
    if len(planes) > 1:
        raise DataError(f"{what} {path} is a stack of {len(planes)} planes (axes {plane_axes}); training and val.py "
                        "read one 2D image per file: save one plane per file (predict.py segments stacks plane by "
                        "plane)")
    return planes[0]


def tiff_layout(shape, axes):
    """Where the planes and the channels are in a TIFF series of ``shape`` with tifffile's ``axes`` (e.g. "TYX",
    "ZCYX", "YXS", "QYX"). Returns (order, plane_axes, channel_axis): the axes' indices in the order planes, Y, X,
    channels (axes of one element left out), the letters of the plane axes ("" for a 2D image) and the letter of
    the channel axis ("" for grey). Raises ValueError with the reason when the series is no image or stack.

    The channels are the S axis (RGB samples) or the C axis (channels of any number). Without axis metadata
    (tifffile's Q or I), 3 or 4 leading pages are the colours of one image too (channels-first RGB files are
    common), so a stack of 3 or 4 planes needs its axes recorded (ImageJ or OME TIFF). Every other axis of more
    than one element is a plane axis (T, Z, Q, I, ...).
    """
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"axes {axes} have no Y and X")
    kept = [i for i, n in enumerate(shape) if n > 1 or axes[i] in "YX"]
    channels = [i for i in kept if axes[i] in "SC"]
    if not channels and len(kept) == 3 and axes[kept[0]] in "QI" and shape[kept[0]] in (3, 4):
        channels = [kept[0]]
    if len(channels) > 1:
        raise ValueError(f"two channel axes (S and C of {axes})")
    planes = [i for i in kept if axes[i] not in "YX" and i not in channels]
    return (planes + [axes.index("Y"), axes.index("X")] + channels, "".join(axes[i] for i in planes),
            "".join(axes[i] for i in channels))


def _check_claim(nbytes, shape, path, what):
    """A DataError naming the file when a TIFF's header claims more bytes of pixels (``nbytes``, of an array of
    ``shape``) than the memory available: tifffile allocates whatever the header claims."""
    available = ram()[1]
    if nbytes > available:
        raise DataError(f"cannot read {what} {path}: its header claims {nbytes / 2**30:.1f} GiB of pixels "
                        f"{tuple(shape)}, more than the {available / 2**30:.1f} GiB of memory available (a damaged "
                        "file, a decompression bomb, or an image too large for this machine: cut it into smaller "
                        "files)")


def _unreadable_tiff(path, what, error):
    """The DataError for a TIFF that tifffile fails to read (TiffFileError, ValueError, ... for damaged files)."""
    return DataError(f"cannot read {what} {path}: not a readable TIFF ({str(error).splitlines()[0][:80]})")


def tiff_planes(path, what="image"):
    """The first series of a TIFF (:func:`image_series`) as planes: array [N, H, W, C] as stored (N = 1 for a 2D
    image; C = 1 for grey; an RGBA image's alpha dropped), and the letters of its plane axes ("" for a 2D image). See
    :func:`tiff_layout`."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = image_series(tif)
            _check_claim(series.nbytes, series.shape, path, what)
            img, axes = series.asarray(), series.axes
    except DataError:
        raise
    except Exception as e:
        raise _unreadable_tiff(path, what, e) from None
    return _as_planes(img, axes, path, what)


def full_series(tif):
    """The series of an open tifffile.TiffFile that are images, not a reduced-resolution copy of one (pages with
    bit 0 of NewSubfileType set: the thumbnail or preview that scanners and some viewers store, before the image as
    often as after it; an OME pyramid's levels belong to their series and are not series); all of them when every
    series is such a copy."""
    return [s for s in tif.series if not getattr(s.keyframe, "is_reduced", False)] or list(tif.series)


def image_series(tif):
    """The series of an open tifffile.TiffFile that is read: the first of :func:`full_series` (a thumbnail stored
    first was read as the image, its mask then read at the thumbnail's size too)."""
    return full_series(tif)[0]


def _as_planes(img, axes, path, what):
    """tifffile's array ``img`` of a TIFF's first series, or of one of its pages, with its ``axes`` -> (planes [N, H,
    W, C] as stored, alpha dropped; the letters of the plane axes), as :func:`tiff_planes` gives them."""
    try:
        order, plane_axes, channel_axis = tiff_layout(img.shape, axes)
    except ValueError as e:
        raise DataError(f"{what} {path} has shape {img.shape}: {e}") from None
    ones = [i for i in range(img.ndim) if i not in order]
    height, width = img.shape[axes.index("Y")], img.shape[axes.index("X")]
    count = int(np.prod([img.shape[i] for i in order[:len(plane_axes)]]))
    planes = img.transpose(order + ones).reshape(count, height, width, -1)
    return (planes[..., :3] if channel_axis == "S" else planes), plane_axes


# The note on a TIFF whose 3 or 4 pages carry no ImageJ or OME axes (tifffile's channel axis Q or I in
# :func:`tiff_layout`): read as colours, though a short stack saved without its axes looks the same
PAGES_AS_COLOURS = "has 3 or 4 pages and no ImageJ or OME axes: read as the colours of one image"


def pages_as_colours(header):
    """Whether the TIFF of :class:`TiffHeader` ``header`` is 3 or 4 pages without axes, read as the colours of one
    image (:data:`PAGES_AS_COLOURS`)."""
    return header.channel_axis in ("Q", "I")


class TiffHeader(NamedTuple):
    """What a TIFF's header says, before its pixels are read (:func:`tiff_header`): the plane axes and the channel
    axis of its first series (:func:`tiff_layout`; "" for none; a channel axis Q or I means pages without axis
    metadata taken as colours), its number of channels (1 for grey), its number of series (positions or scenes;
    only the first is read), the length of each plane axis, whether the channels are stored before the rows (planar
    RGB, or a stack written without axes that tifffile took for one), the size of a plane (height, width; (0, 0)
    when unknown) and its pixel size in micrometres, or None with the problem that left it out
    (:func:`tiff_pixel_size`). The defaults describe a 2D image without a pixel size."""
    plane_axes: str = ""
    channel_axis: str = ""
    channels: int = 1
    series: int = 1
    plane_shape: tuple = ()
    channels_first: bool = False
    plane_size: tuple = (0, 0)
    pixel_size: float = None
    pixel_size_problem: str = ""


def imagej_text(value):
    """A value of ImageJ's TIFF description with its \\uXXXX escapes decoded: ImageJ escapes every character beyond
    ASCII (Fiji's micrometre is unit=\\u00B5m), and tifffile keeps the escape."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), str(value)).strip()


def tiff_pixel_size(tif):
    """The pixel size in micrometres of an open tifffile.TiffFile from its OME metadata (PhysicalSizeX/Y and their
    units, micrometres by default) or its ImageJ metadata (XResolution/YResolution, pixels per ImageJ's ``unit``, or
    else per the ResolutionUnit tag's centimetre or inch). Returns (size or None, problem): the problem says why
    metadata that is there gives no size (non-square pixels, an unknown unit, not a size), '' when there is none.
    A plain TIFF's resolution is not read: it is mostly a print resolution (72 dpi would be 353 um pixels); nor is
    an ImageJ TIFF's whole number of dots per inch up to PRINT_DPI without ImageJ's unit."""
    if tif.is_ome:
        try:
            images = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (images[0] if isinstance(images, list) else images)["Pixels"]
            sizes = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
            units = pixels.get("PhysicalSizeXUnit", "\u00b5m"), pixels.get("PhysicalSizeYUnit", "\u00b5m")
        except Exception as e:
            # tifffile reads the image without it: a damaged XML gives no size, and the header keeps its axes
            return None, f"unreadable OME metadata ({str(e).splitlines()[0][:80]})"
        if sizes == (None, None):
            return None, ""
        if None in sizes:
            return None, f"PhysicalSize{'XY'[sizes.index(None)]} missing beside PhysicalSize{'YX'[sizes.index(None)]}"
    elif tif.is_imagej and 282 in tif.pages.first.tags:  # XResolution
        page, metadata = tif.pages.first, tif.imagej_metadata or {}
        unit = imagej_text(metadata.get("unit", ""))
        if unit.lower() in UNCALIBRATED:
            unit = RESOLUTION_UNITS.get(page.resolutionunit, "")
            if not unit or (unit == "inch" and all(r <= PRINT_DPI and float(r).is_integer() for r in page.resolution)):
                return None, ""  # 72 or 300 dots per inch: a print resolution, as in a plain TIFF
        units = unit, imagej_text(metadata.get("yunit", unit))
        sizes = [1 / r if r > 0 else math.nan for r in page.resolution]  # the resolution is in pixels per unit
    else:
        return None, ""
    unknown = [str(u) for u in units if str(u).lower() not in MICROMETRES]
    if unknown:
        return None, f"unknown unit of length {unknown[0]!r}"
    try:
        x, y = (float(s) * MICROMETRES[str(u).lower()] for s, u in zip(sizes, units))
    except (TypeError, ValueError):  # an OME size that is not a number (tifffile reads "1,5" as a tuple)
        return None, f"pixel size {sizes[0]} x {sizes[1]} is not a size"
    if not (PIXEL_SIZES[0] <= x <= PIXEL_SIZES[1] and PIXEL_SIZES[0] <= y <= PIXEL_SIZES[1]):
        return None, f"pixel size {x:g} x {y:g} um is not between {PIXEL_SIZES[0]:g} and {PIXEL_SIZES[1]:g} um"
    if abs(x - y) > SQUARE * max(x, y):
        return None, f"non-square pixels ({x:g} x {y:g} um)"
    return x, ""


def tiff_header(path):
    """The :class:`TiffHeader` of a TIFF: lets predict.py know a stack before reading it. An unreadable file gives
    the defaults (reading it names the problem)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = image_series(tif)
            shape, axes = series.shape, series.axes
            order, plane_axes, channel_axis = tiff_layout(shape, axes)
            channels = shape[order[-1]] if channel_axis else 1
            plane_shape = tuple(shape[i] for i in order[:len(plane_axes)])
            channels_first = bool(channel_axis) and order[-1] < axes.index("Y")
            plane_size = (shape[axes.index("Y")], shape[axes.index("X")])
            return TiffHeader(plane_axes, channel_axis, channels, len(full_series(tif)), plane_shape, channels_first,
                              plane_size, *tiff_pixel_size(tif))
    except Exception:
        return TiffHeader()


def decode_planes(path):
    """Read an image file as stored: (uint8 or uint16 array [N, H, W, C] in RGB order, or the float or other
    integer type of a TIFF, alpha dropped; the letters of its plane axes). N > 1 only for a TIFF stack (time, z or
    pages; :func:`tiff_layout`), else 1 and "". C is 1 (grey), 3 (RGB) or, for a TIFF with a channel axis, any
    number of channels (:func:`select_channel`)."""
    path = str(path)
    if path.lower().endswith(TIFF_EXTS):
        _check_exists(path, "image")
        planes, plane_axes = tiff_planes(path)  # tifffile reads RGB
    else:
        # a JPEG is turned as its EXIF orientation says (a phone's, or a viewer's "rotate"), as every viewer shows
        # it and as its mask was drawn; IMREAD_UNCHANGED would ignore the tag
        flags = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH if path.lower().endswith(JPEG_EXTS) else cv2.IMREAD_UNCHANGED
        img = _imread(path, flags, "image")
        indexed = _png_palette(path, "image") if img.ndim == 3 else None
        if indexed is not None and one_hue_ramp(indexed[1]):  # Fiji's 8-bit image with a LUT: the LUT only shows it
            img = indexed[0]
        img = img[:, :, None] if img.ndim == 2 else img
        planes, plane_axes = (img[:, :, 2::-1] if img.shape[2] >= 3 else img)[None], ""  # OpenCV reads BGR(A)
    return np.ascontiguousarray(planes), plane_axes


def check_finite(planes, path):
    """``planes`` (any shape) as they are, or a DataError naming ``path`` when a float image holds NaN or infinite
    values, which would turn the whole image to NaN once scaled."""
    if planes.dtype.kind == "f" and not np.isfinite(planes).all():
        raise DataError(f"image {path} holds NaN or infinite values (from registration or stitching?); replace "
                        "them, e.g. by 0 (Fiji: Process > Math > Remove NaNs), and save it again")
    return planes


def select_channel(planes, channel, path):
    """planes [N, H, W, C] of the image file ``path`` -> the planes the network reads: channel ``channel``
    (0-based, RGB order; predict.py --channel) as grey [N, H, W, 1] (a grey image as it is), or with ``channel``
    None the planes as they are when grey or RGB. Any other number of channels, a channel the image lacks, or NaN
    in the planes read (:func:`check_finite`) is a DataError."""
    count = planes.shape[3]
    if count == 1 or channel is None:
        if count not in (1, 3):
            raise DataError(f"image {path} has {count} channels; the network reads grey or RGB: choose the nucleus "
                            f"channel with --channel (0 to {count - 1}), or save it alone")
    elif not 0 <= channel < count:
        raise DataError(f"--channel {channel}: image {path} has {count} channels (0 to {count - 1})")
    return check_finite(nucleus_channel(planes, channel), path)


def nucleus_channel(planes, channel):
    """planes [..., C] -> what the network reads of them, unchecked (:func:`select_channel` checks): channel
    ``channel`` (--channel) [..., 1], a view, when C > 1; else the planes themselves (grey, or ``channel`` None)."""
    return planes if channel is None or planes.shape[-1] == 1 else planes[..., channel:channel + 1]


@contextmanager
def read_planes(path, channel):
    """The planes of the image file ``path`` as stored, every channel kept, as a sequence of arrays [H, W, C], checked
    as :func:`select_channel` checks them for ``channel`` (its messages): the network reads their
    :func:`nucleus_channel`, and predict.py measures every channel. A TIFF stack whose every plane is one page
    (:func:`_page_per_plane`: T, Z or TZ planes of grey or RGB pages) is read a page at a time as it is indexed, its
    file open until the block ends, so that a 500-frame time-lapse is never held whole; any other file is read whole
    (:func:`decode_planes`). A DataError names the file: on entering, or on indexing for a page that is damaged or
    holds NaN."""
    opened = _page_per_plane(str(path))
    if opened is None:
        planes = decode_planes(path)[0]
        select_channel(planes, channel, path)
        yield planes
        return
    tif, series = opened
    with tif:
        yield _PagePlanes(series, path, channel)


def _page_per_plane(path):
    """(an open tifffile.TiffFile, its first series) when that series is a stack of one page per plane
    (:func:`_one_page_per_plane`), else None, the file closed. The memory check is on one page, all that is held at
    once: a DataError when it claims more than the memory available."""
    if not path.lower().endswith(TIFF_EXTS):
        return None
    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # the whole read names the problem
        return None
    with ExitStack() as closing:  # closed unless handed on
        closing.callback(tif.close)
        series = image_series(tif)
        if _one_page_per_plane(series):
            page = series.keyframe
            _check_claim(page.nbytes, page.shape, path, "image")
            closing.pop_all()
            return tif, series
    return None


def _one_page_per_plane(series):
    """Whether a tifffile series is a stack whose every plane is one page of the file, there and shaped as the first:
    plane axes before the page's rows, no channel axis across pages (a hyperstack's C, 3 pages without axes taken as
    colours), not an ImageJ stack stored past its first page alone."""
    try:
        page = series.keyframe
        plane_axes, channel_axis = tiff_layout(series.shape, series.axes)[1:]
        page_axes, page_channel = tiff_layout(page.shape, page.axes)[1:]
        return bool(plane_axes and not page_axes and channel_axis == page_channel and series.transform is None
                    and not series.is_truncated and len(series) * page.size == series.size
                    and all(p is not None and p.shape == page.shape and p.dtype == page.dtype for p in series))
    except Exception:  # a series tiff_layout refuses, a page missing: read whole, which says what is wrong
        return False


class _PagePlanes:
    """The planes of an open TIFF series of one page per plane (:func:`_page_per_plane`): ``planes[i]`` reads page i
    -> [H, W, C] as :func:`read_planes` gives it."""

    def __init__(self, series, path, channel):
        self.series, self.path, self.channel = series, path, channel

    def __len__(self):
        return len(self.series)

    def __getitem__(self, index):
        try:
            stored = self.series[index].asarray()
        except Exception as e:
            raise _unreadable_tiff(self.path, "image", e) from None
        planes = np.ascontiguousarray(_as_planes(stored, self.series.keyframe.axes, self.path, "image")[0])
        select_channel(planes, self.channel, self.path)
        return planes[0]


# PNG colour types (the IHDR chunk's byte 25) -> the channels decode_image keeps: grey, RGB, a palette's (its
# colours, or one grey channel for a LUT's ramp: 3 counts the most), grey + alpha and RGB + alpha (OpenCV reads
# both as BGRA; alpha dropped)
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 3, 6: 3}
# PIL's modes of a JPEG or BMP -> the channels decode_image gives (OpenCV reads a palette BMP of colours as RGB, one
# of greys PIL calls L); a mode not here (a 12-bit JPEG's) is decoded
PIL_CHANNELS = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 3, "CMYK": 3, "YCbCr": 3}
EXIF_ORIENTATION, TURNED_ORIENTATIONS = 0x0112, (5, 6, 7, 8)  # the EXIF tag, and its values of a quarter turn


def decoded_size(path):
    """(height, width, channels, numpy dtype) of the array :func:`decode_image` gives for an image file (a
    stack: of one plane), from its header alone (a PNG's IHDR, a TIFF's series, PIL's header of a JPEG or BMP, known
    by its signature, with the EXIF quarter turn of one named as a JPEG), so that sizing a dataset costs no decoding;
    any other file (a 16-bit PGM, a GIF), or a header these do not read, is decoded, which gives the same. A palette
    PNG counts 3 channels, the most it decodes to (1 when its indices are the values)."""
    path = str(path)
    try:
        if path.lower().endswith(TIFF_EXTS):
            with tifffile.TiffFile(path) as tif:
                series = image_series(tif)
                shape, axes, dtype = series.shape, series.axes, series.dtype
            order, _, channel_axis = tiff_layout(shape, axes)
            channels = shape[order[-1]] if channel_axis else 1
            channels = min(channels, 3) if channel_axis == "S" else channels  # alpha dropped (_as_planes)
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            return height, width, channels, dtype
        with open(path, "rb") as f:
            head = f.read(26)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[25] in PNG_CHANNELS:
            width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            return height, width, PNG_CHANNELS[head[25]], np.dtype(np.uint16 if head[24] == 16 else np.uint8)
        # JPEG and BMP (8-bit) by their signatures, whatever their names: any other format that OpenCV reads (a
        # 16-bit PGM, a GIF's palette) PIL's header may tell otherwise, so it is decoded. Not Image.open: its pixel
        # limit warns on a large scan's header, or refuses it
        reader = (JpegImagePlugin.JpegImageFile if head[:3] == JPEG_SIGNATURE else
                  BmpImagePlugin.BmpImageFile if head[:2] == b"BM" else None)
        if reader is not None:
            with reader(path) as image:
                width, height = image.size
                # decode_image turns a file named as a JPEG (the flags it reads it with) as its EXIF tag says
                if (reader is JpegImagePlugin.JpegImageFile and path.lower().endswith(JPEG_EXTS)
                        and image.getexif().get(EXIF_ORIENTATION) in TURNED_ORIENTATIONS):
                    width, height = height, width
                return height, width, PIL_CHANNELS[image.mode], np.dtype(np.uint8)
    except Exception:  # any header problem: decoding reads the file, or names what is wrong with it
        pass
    image = decode_image(path)
    return (*image.shape, image.dtype)


def decode_image(path):
    """Read a 2D grey or RGB image file as stored (a JPEG turned by its EXIF tag): array [H, W, C] (C 1 or 3, RGB
    order), alpha dropped; uint8 or uint16, or a TIFF's own type (float, int32...). A stack, another number of
    channels or NaN values is a DataError naming the file."""
    image = check_finite(_one_plane(*decode_planes(path), path, "image"), path)
    if image.shape[2] not in (1, 3):
        raise DataError(f"image {path} has {image.shape[2]} channels; training and val.py read grey or RGB images: "
                        "save the nucleus channel alone (predict.py --channel picks it)")
    return image


def read_label_image(path):
    """Read an instance label image (0 = background, one integer per nucleus; 8/16/32-bit PNG or TIFF) -> int32
    [H, W]; an indexed PNG may give its indices (:func:`_read_values`), a float TIFF of whole numbers (Fiji's) its
    values. A colour image, fractional float values or a binary mask (one value for several separate objects) are a
    DataError naming the file."""
    labels = _label_values(path)
    if _binary_components(labels) is not None:
        raise DataError(f"label image {path} gives one value ({labels.max()}) to several separate objects: it is a "
                        f"binary mask; put masks in masks/0/<id>{os.path.splitext(path)[1]} (a folder per class), or "
                        "number the nuclei 1..N in label images")
    return labels


def read_labels_or_components(path):
    """:func:`read_label_image`, but a binary mask (one value for several separate objects) is read as its connected
    components (8-connectivity, as instances.connected_components: touching nuclei stay one) -> (int32 [H, W],
    whether the file was such a mask)."""
    labels = _label_values(path)
    components = _binary_components(labels)
    return (labels, False) if components is None else (components, True)


def _binary_components(labels):
    """The connected components (int32 [H, W], 8-connectivity) of a label image int32 [H, W] that gives one value to
    several separate objects (a binary mask); None for any other."""
    inside = labels > 0
    top = labels.max(initial=0)
    if top == 0 or (labels[inside] != top).any():
        return None
    count, components = cv2.connectedComponents(inside.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return components if count > 2 else None


def _label_values(path):
    """A label image's values as int32 [H, W], checked as :func:`read_label_image` says (a binary mask passes)."""
    labels = _read_values(path, "label image")
    if labels.ndim == 3:
        if (labels != labels[:, :, :1]).any():
            raise DataError(f"label image {path} is a colour image; label images hold one integer per nucleus in a "
                            "single grey channel (0 = background): save them as 16-bit grey PNG or TIFF")
        labels = labels[:, :, 0]
    # Fiji saves label images as 32-bit float, which holds every id up to 2**24 exactly
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"label image {path} holds {labels.dtype} values with fractions or NaN; label images hold "
                        "integers, one per nucleus (save them as 16-bit PNG or integer TIFF)")
    low, top = int(labels.min()), int(labels.max())
    # ids past 255 saved in 8 bits wrap (256 -> 0, 257 -> 1: the lowest ids are shared) or clip to 255 (255 is
    # shared): nuclei vanish or share an id (past 65535 in 16 bits alike). Another id on separate objects (255 nuclei,
    # one cut in two) is left to the notes on such ids. A binary mask (two values) is left to read_label_image's
    # message
    most = np.iinfo(labels.dtype).max if labels.dtype in (np.uint8, np.uint16) else None
    used = np.flatnonzero(np.bincount(labels.ravel())) if top == most else np.zeros(0, int)
    if len(used) > 2:
        split, lowest = multi_object_ids(labels), used[used > 0][0]
        shared = [i for i in (most, lowest) if i in split]
        if shared:
            bits = 8 * labels.dtype.itemsize
            raise DataError(f"label image {path} is {bits}-bit, uses the id {most} and gives one id to several "
                            f"separate objects ({len(split)} such id{'s' * (len(split) > 1)}, e.g. {shared[0]}): the "
                            f"tool that saved it wrapped or clipped the ids of more than {most} nuclei (nuclei merged "
                            f"or lost); save label images as {'16-bit PNG or TIFF' if bits == 8 else '32-bit TIFF'}")
    if low < 0 or top > np.iinfo(np.int32).max:  # int32 below: larger values would wrap to negative ones
        raise DataError(f"label image {path} holds the value {low if low < 0 else top}; labels are 0 for the "
                        f"background and 1 to {np.iinfo(np.int32).max} for the nuclei (number them 1..N)")
    return labels.astype(np.int32)


def multi_object_ids(labels):
    """The ids of a label image int [H, W] that each mark several separate objects (8-connectivity, as
    :func:`_binary_components` counts them) of at least a quarter of the median nucleus's area (:data:`LEAST_PART`)
    -> sorted int array (empty when there are none). Such an id is one nucleus to the DSB2018 score, whose IoU with
    each of its parts then stays below 0.5. Smaller parts are an annotator's stray specks, as beside one nucleus in
    11 of DSB2018's 670 label images (1 to 25 pixels, and 165 of a 2102-pixel median), not nuclei."""
    objects = connected_regions(labels, background=0, connectivity=2)
    owner = np.zeros(int(objects.max()) + 1, labels.dtype)
    owner[objects.ravel()] = labels.ravel()  # every pixel of an object has its id: any one of them names it
    sizes = np.bincount(objects.ravel())[1:]
    ids, index = np.unique(owner[1:], return_inverse=True)
    areas = np.bincount(index, weights=sizes)
    large = sizes >= LEAST_PART * np.median(areas) if len(areas) else sizes > 0
    parts = np.bincount(index[large], minlength=len(ids))
    return ids[parts > 1]


def read_labels(path, shape=None):
    """:func:`read_label_image`, resized with nearest-neighbour to ``shape`` = (H, W) when that differs from the
    file's (a label stays a label; an object too small for the new size may vanish) -> int32 [H, W]."""
    return resize_labels(read_label_image(path), shape)


def resize_labels(labels, shape=None):
    """Instance labels int [H, W] resized with nearest-neighbour to ``shape`` = (H, W) when that differs -> int32
    [H, W] (a label stays a label; an object too small for the new size may vanish)."""
    if shape is not None and tuple(labels.shape) != tuple(shape):
        labels = cv2.resize(labels.astype(np.int32), (shape[1], shape[0]), interpolation=NEAREST)  # int32: ids exact
    return labels.astype(np.int32)


def image_to_float(img, input_channels, normalization="fixed"):
    """Decoded image [H, W, C] (uint8, uint16 or float) -> float32 [H, W, input_channels] in [0, 1].

    ``normalization`` 'fixed': uint8 is divided by 255, other types are min-max scaled per image. 'percentile':
    every image is stretched from its 1st to its 99.8th percentile (over all its channels, so colours keep their
    balance) and clipped to [0, 1] (:func:`stretch_percentiles`), so dim, faint or low-contrast images look alike.
    'percentile_dark': the same, then an image with a bright background (mean above 0.5: stained or bright-field,
    dark nuclei) is inverted, so that every image shows bright nuclei on a dark background, as fluorescence does.
    Grey images are repeated to 3 channels when the model wants 3; colour images are converted to grey when it
    wants 1. A grey image stored in three equal channels is read as the one-channel image it is, so that both
    files give the same values (the percentiles of three copies differ slightly from those of one).
    """
    if img.shape[2] == 3 and (img == img[:, :, :1]).all():
        img = img[:, :, :1]
    if normalization in ("percentile", "percentile_dark"):
        out = stretch_percentiles(img.astype(working_float(img), copy=False))
        if normalization == "percentile_dark" and out.mean() > 0.5:
            out = 1.0 - out
    elif img.dtype == np.uint8:
        out = img.astype(np.float32) / 255.0
    else:
        out = img.astype(working_float(img), copy=False)
        lo, hi = float(out.min()), float(out.max())
        out = ((out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)).astype(np.float32, copy=False)
    channels = out.shape[2]
    if channels == input_channels:
        return out
    if channels == 1:
        return np.repeat(out, input_channels, axis=2)
    if input_channels == 1:
        return cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[:, :, None]
    raise DataError(f"an image has {channels} channels but --input_channels is {input_channels}")


def working_float(img):
    """float32 to scale ``img`` in, or float64 for a float image whose values or range go beyond float32's (they
    would become inf, then NaN over the whole image)."""
    if img.dtype.kind != "f" or img.dtype.itemsize <= 2:
        return np.float32
    lo, hi = float(img.min()), float(img.max())
    return np.float64 if max(-lo, hi, hi - lo) > float(np.finfo(np.float32).max) else np.float32


def normalize(x):
    """Image values in [0, 1] (numpy or torch, any shape) -> what the network sees, ``(x - 0.5) / 0.25``."""
    return (x - NORM_MEAN) / NORM_STD


def denormalize(x):
    """The inverse of :func:`normalize`: network input values -> image values in [0, 1] (not clipped)."""
    return x * NORM_STD + NORM_MEAN


def stretch_percentiles(x):
    """float [H, W, C], any range -> float32 [H, W, C] in [0, 1]: ``(x - p_low) / (p_high - p_low)``, clipped,
    with the percentiles (:data:`PERCENTILES`) taken over all pixels and channels. When they are equal (a few
    nuclei on an exactly flat background, over 98.8 % of the pixels one value) the image is stretched from its
    minimum to its maximum instead, so the nuclei stay; a flat image becomes all zeros."""
    lo, hi = np.percentile(x, PERCENTILES)
    if hi <= lo:
        lo, hi = x.min(), x.max()
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def layer_alpha(mask, path):
    """The alpha channel [H, W] of a mask drawn as a transparent layer, else None: a PNG or BMP read with four
    channels (OpenCV's fourth is always alpha; a TIFF's may be any channel) whose colour is one flat value in each
    channel and whose alpha varies (the shape), or is 0 throughout (nothing drawn)."""
    if mask.ndim != 3 or mask.shape[2] != 4 or str(path).lower().endswith(TIFF_EXTS):
        return None
    colour, alpha = mask[:, :, :3], mask[:, :, 3]
    if not (colour == colour[:1, :1]).all() or (alpha.min() == alpha.max() != 0):
        return None
    return alpha


def read_mask(path):
    """Read a mask file -> uint8 [H, W] with values {0, 1}. Accepts 0/255 or 0/1, and 0/65535 in a 16-bit file (a
    colour file is read as its grey, an indexed PNG may be read as its indices (:func:`_read_values`), a
    transparent layer (:func:`layer_alpha`) as its alpha); anything else is an error."""
    mask = _read_values(path, "mask")  # not IMREAD_GRAYSCALE: it maps 16-bit 0/1 to 0/0
    alpha = layer_alpha(mask, path)
    if alpha is not None:
        mask = alpha
    elif mask.ndim == 3:
        mask = cv2.cvtColor(mask[:, :, :3], cv2.COLOR_BGR2GRAY) if mask.shape[2] >= 3 else mask[:, :, 0]
    # two linear passes instead of np.unique's sort or hash of every pixel, which doubled the time to read a mask
    # (preprocess_dsb2018.py reads one per nucleus); np.unique is left for the message
    top = mask.max(initial=0)
    two_valued = not ((mask != 0) & (mask != top)).any()
    if two_valued and (top in (0, 1, 255) or (mask.dtype == np.uint16 and top == 65535)):
        return (mask > 0).astype(np.uint8)
    values = np.unique(mask)
    shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
    raise DataError(f"mask {path} has values {{{shown}}}" + (" in its alpha channel (a transparent layer, read as "
                    "its alpha: draw the nuclei fully opaque)" if alpha is not None else "") +
                    "; masks must hold only 0/255 or 0/1 (0/65535 in 16 bits) " +
                    # anti-aliasing and resizing grade the rims of nuclei drawn at full value; several values below
                    # it are ids or colours
                    ("(soft edges: a drawing tool's anti-aliasing, or a resized mask; draw with anti-aliasing off, or "
                     "threshold it at half its maximum and save it as PNG)" if len(values) > 2 and top in (255, 65535)
                     else "(a label image? put label images in labels/; a colour mask of several classes? save each "
                     "class's nuclei as 255 on 0)" if len(values) > 2 else
                     "(a class's colour? save the nuclei as 255 on 0)"))
