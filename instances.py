"""From a foreground probability map to one label per nucleus (instance segmentation).

The network predicts, per pixel, the probability of being inside a nucleus; touching nuclei then form one blob.
Three ways to number the objects:

* ``cc``: connected components of ``prob > threshold`` (8-connectivity). Touching nuclei stay merged.
* ``watershed``: marker-based watershed on the Euclidean distance transform of the thresholded mask. The
  distance is smoothed (Gaussian, ``sigma`` pixels); markers are the h-maxima of ``log(1 + distance)`` (peaks
  whose height exceeds that of the saddle towards any higher peak by a factor of about ``exp(h)``, so the rule
  is the same for a 3-pixel and a 30-pixel nucleus) that are also the highest point within ``min_distance``
  pixels. One nucleus with a bumpy outline keeps one marker while two nuclei joined by a neck get one each.
  The flooding of the negated distance is restricted to the mask, so the union of the objects is exactly the
  thresholded mask (less the objects below ``min_size``).
* ``borders``: for a run trained with ``--borders True``, whose network also predicts where two nuclei touch
  (the target made by :func:`touching_borders` from the instance labels). The predicted borders cut the mask
  into cores; markers are the h-maxima of the cores' smoothed distance transform as above, but with a larger
  ``h`` (``H_BORDERS``): the borders already split most touching nuclei, so a core needs a deep neck to be cut
  again, and a sliver of core thinner than about a pixel gets no marker of its own (it joins its neighbour
  instead of becoming a spurious object). The mask is then flooded from the markers along rising border
  probability, so again the union of the objects is the thresholded mask.

Every separation (:func:`connected_components`, :func:`watershed_instances`, :func:`border_instances`,
:func:`split_instances`) returns an int32 label image of the input's shape: 0 is background and the objects are
numbered 1..N consecutively. ``min_size`` (pixels) removes specks smaller than that. :func:`split_instances`
then drops the objects the network is unsure of: those whose mean probability is below ``min_confidence``.
"""
import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import reconstruction
from skimage.segmentation import watershed

from config import MIN_CONFIDENCE, MIN_SIZE, SEPARATIONS

# The defaults below (and MIN_SIZE and MIN_CONFIDENCE, flags' defaults, in config.py) were chosen on validation
# images; the measurements: docs/results.md, "How the post-processing defaults were chosen".
MIN_DISTANCE = 2  # pixels
H = 0.05  # in log(1 + distance): a saddle about 5% below the lower peak separates two nuclei
SIGMA = 1.0  # pixels
H_BORDERS = 0.5
# --scale auto rescales an image only when its nuclei are more than this factor wider or narrower than the training
# set's: within it rescaling gained nothing on validation (docs/results.md, "Nuclei of another size").
AUTO_SCALE_BAND = 1.5
AUTO_SCALE_MOST = 4.0  # and by no more than this either way: specks or a whole-image blob are not nuclei to size by


def _check_prob(prob, name="prob"):
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"{name}: a probability map must be 2-D [H, W]; got shape {prob.shape}")
    # a map of 0-255 (predict.py's <id>_prob.png) would pass every threshold below 1 and every min_confidence; the
    # margin lets through the rounding of a map that was resized or blended
    if prob.size and not -1e-3 <= prob.min() <= prob.max() <= 1 + 1e-3:
        raise ValueError(f"{name}: a probability map holds values in [0, 1], not {prob.min():g} to {prob.max():g} "
                         "(a <id>_prob.png of predict.py holds 255 x the probability: divide it by 255)")
    return prob


def remove_small(labels, min_size):
    """Drop objects with fewer than ``min_size`` pixels and renumber the rest 1..N (int32 [H, W])."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.max() == 0:
        return labels.astype(np.int32)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    new_ids = np.zeros(len(sizes), np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labels]


def remove_unsure(labels, prob, min_confidence):
    """Drop objects whose mean probability is below ``min_confidence`` and renumber the rest 1..N.

    labels: int [H, W], 0 background, objects 1..N; prob: float [H, W] in [0, 1]. Returns int32 [H, W].
    """
    labels = np.asarray(labels, np.int32)
    if not labels.size or labels.max() == 0 or min_confidence <= 0:
        return labels
    keep = np.concatenate([[False], mean_probability(labels, prob) >= min_confidence])
    return remove_small(np.where(keep[labels], labels, 0), 1)


def mean_probability(labels, prob):
    """The mean of ``prob`` (float [H, W] in [0, 1]) over each object of ``labels`` (int [H, W], 0 background),
    the network's confidence in it: float64 [N] for labels 1..N, N the largest; NaN (with NumPy's "invalid value"
    warning) for a label in 1..N that no pixel holds, so pass consecutive labels (remove_small's, split_instances')."""
    count = int(labels.max()) if labels.size else 0
    return np.asarray(ndi.mean(prob, labels, np.arange(1, count + 1)), np.float64)


def connected_components(prob, threshold=0.5, min_size=0):
    """Connected components (8-connectivity) of ``prob > threshold``.

    prob: float array [H, W] with values in [0, 1] (a sigmoid output). Returns int32 [H, W]: 0 background,
    objects 1..N. Objects smaller than ``min_size`` pixels are removed (0 keeps all).
    """
    prob = _check_prob(prob)
    labels, _ = ndi.label(prob > threshold, structure=np.ones((3, 3), bool))
    return remove_small(labels, min_size)


def watershed_markers(distance, min_distance=MIN_DISTANCE, h=H):
    """Markers for the watershed: int32 [H, W], one label per marker (0 elsewhere).

    distance: float [H, W] >= 0, the (smoothed) distance to the background; h > 0. The marker pixels are the
    h-maxima of ``log(1 + distance)``: the tops of the peaks that rise at least ``h`` above the saddle towards
    any higher peak. Tops of equal height joined by a saddle less than ``h`` deep (a symmetric nucleus can have
    two) are one marker, and a marker is kept when one of its pixels is the highest within ``min_distance``
    (a square window).
    """
    inside = distance > 0
    height = np.log1p(distance.astype(np.float64))
    if not inside.any() or h > np.ptp(height):
        return np.zeros(distance.shape, np.int32)
    # skimage.morphology.h_maxima's computation, done here to keep the reconstruction for the domes as well
    lowered = height - h - 2 * np.finfo(np.float64).resolution * np.abs(height)
    residue = height - reconstruction(lowered, height)
    domes, _ = ndi.label(inside & (residue > 0), structure=np.ones((3, 3), bool))
    markers = np.where(inside & (residue >= h), domes, 0)
    if min_distance > 0:
        local_max = distance >= ndi.maximum_filter(distance, size=2 * int(min_distance) + 1, mode="constant") - 1e-6
        keep = np.bincount(markers[local_max], minlength=int(markers.max()) + 1) > 0
        keep[0] = False
        markers = np.where(keep[markers], markers, 0)
    return remove_small(markers, 1)


def watershed_instances(prob, threshold=0.5, min_distance=MIN_DISTANCE, min_size=MIN_SIZE, h=H, sigma=SIGMA):
    """Split touching nuclei: marker-based watershed of the distance transform inside ``prob > threshold``.

    prob: float [H, W] in [0, 1]. min_distance: pixels between two markers (larger merges more); h: how far
    a peak of log(1 + distance) must rise above the saddle to its neighbour to become its own object (larger
    merges more); sigma: Gaussian smoothing of the distance map (0 = none). Returns int32 [H, W], 0 background,
    objects 1..N; every pixel of the mask belongs to an object unless its object is below ``min_size`` pixels.
    """
    prob = _check_prob(prob)
    mask = prob > threshold
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    distance = smoothed_distance(mask, sigma)
    markers = watershed_markers(distance, min_distance, h)
    return flood(-distance, markers, mask, min_size)


def smoothed_distance(mask, sigma=SIGMA):
    """Euclidean distance of each pixel of ``mask`` (bool [H, W]) to the nearest pixel outside it, Gaussian
    smoothed (``sigma`` pixels, 0 = none) and 0 outside the mask: float [H, W] >= 0."""
    distance = ndi.distance_transform_edt(mask)
    return ndi.gaussian_filter(distance, sigma) * mask if sigma > 0 else distance


def flood(elevation, markers, mask, min_size):
    """Watershed of ``elevation`` (float [H, W]) from ``markers`` (int [H, W], 0 = none) inside ``mask``.

    A component of the mask that holds no marker becomes one object of its own, so the union of the objects
    is the mask. Returns int32 [H, W], objects 1..N, those below ``min_size`` pixels removed.
    """
    labels = watershed(elevation, markers, mask=mask) if markers.any() else np.zeros(mask.shape, np.int32)
    missed = mask & (labels == 0)
    if missed.any():
        extra, _ = ndi.label(missed, structure=np.ones((3, 3), bool))
        labels = np.where(extra > 0, extra + labels.max(), labels)
    return remove_small(labels.astype(np.int32), min_size)


def border_instances(prob, border, threshold=0.5, min_size=MIN_SIZE, min_distance=MIN_DISTANCE, h=H_BORDERS,
                     sigma=SIGMA):
    """Split touching nuclei along a predicted border map (runs trained with ``--borders True``).

    prob: float [H, W] in [0, 1], the nucleus probability; border: float [H, W] in [0, 1], the probability that
    a pixel lies where two nuclei touch. The cores, ``prob > threshold`` and ``border <= threshold``, give the
    markers (:func:`watershed_markers` of their smoothed distance transform, with ``min_distance``, ``h`` and
    ``sigma`` as in :func:`watershed_instances`); the mask ``prob > threshold`` is then flooded from them along
    rising border probability. Returns int32 [H, W], 0 background, objects 1..N.
    """
    prob = _check_prob(prob)
    border = _check_prob(border, "border")
    if border.shape != prob.shape:
        raise ValueError(f"border {border.shape} and prob {prob.shape} differ in shape")
    mask = prob > threshold
    markers = watershed_markers(smoothed_distance(mask & (border <= threshold), sigma), min_distance, h)
    return flood(border, markers, mask, min_size)


def touching_borders(labels, width=1):
    """The ``--borders`` training target: uint8 [H, W] in {0, 1}, 1 on the pixels of a nucleus that lie within
    ``width`` pixels (a square window) of another nucleus. labels: int [H, W], 0 background, 1..N nuclei.

    Two touching nuclei get a line ``2 * width`` pixels wide, half on each side; a nucleus alone gets none.
    """
    labels = np.asarray(labels)
    size = 2 * int(width) + 1
    highest = ndi.maximum_filter(labels, size=size, mode="nearest")
    # Background counts as the highest id, so that it never lowers a nucleus's minimum; the dtype's own maximum
    # would not do, as scipy's filters wrap it around for 64-bit integers.
    lowest = ndi.minimum_filter(np.where(labels > 0, labels, labels.max()), size=size, mode="nearest")
    return ((labels > 0) & ((highest != labels) | (lowest != labels))).astype(np.uint8)


def border_map(prob, num_classes):
    """The predicted border map [H, W] among probabilities [K, H, W] (K = ``num_classes``, then the border channel
    of a run trained with --borders True), or None when there is none."""
    return prob[num_classes] if prob.shape[0] > num_classes else None


def split_instances(prob, method="watershed", threshold=0.5, min_size=MIN_SIZE, min_confidence=MIN_CONFIDENCE,
                    border=None):
    """Label the objects of a probability map [H, W] (values in [0, 1]) -> int32 [H, W], objects 1..N.

    method: 'watershed' (:func:`watershed_instances`, splits touching nuclei), 'cc'
    (:func:`connected_components`) or 'borders' (:func:`border_instances`; needs ``border``, the predicted
    border map [H, W]). Then objects whose mean probability is below ``min_confidence`` (0 keeps all) are
    dropped. The same ``min_size`` and ``min_confidence`` apply to all, so comparing them measures the
    separation alone.
    """
    if method == "watershed":
        labels = watershed_instances(prob, threshold, min_size=min_size)
    elif method == "cc":
        labels = connected_components(prob, threshold, min_size=min_size)
    elif method == "borders":
        if border is None:
            raise ValueError("method 'borders' needs the border map (a run trained with --borders True)")
        labels = border_instances(prob, border, threshold, min_size=min_size)
    else:
        raise ValueError(f"method {method!r} is not one of {', '.join(SEPARATIONS)}")
    return remove_unsure(labels, prob, min_confidence)


def nucleus_areas(labels):
    """The pixel count of each object of a label image int [H, W] (0 = background), in label order: int64 [N].
    (np.unique, not np.bincount, whose memory grows with the largest label value.)"""
    return np.unique(labels[labels > 0], return_counts=True)[1].astype(np.int64)


def median_diameter(areas):
    """The median diameter (pixels) of objects of these areas (pixels): that of a disk of each one's area; 0.0 for
    no objects."""
    areas = np.asarray(areas, np.float64)
    return float(np.median(2 * np.sqrt(areas / np.pi))) if areas.size else 0.0


def auto_scale(found, trained, band=AUTO_SCALE_BAND, most=AUTO_SCALE_MOST):
    """The factor that resizes an image whose nuclei are ``found`` pixels across (median diameter) so that they are
    ``trained`` pixels across: trained / found when they differ by more than ``band`` either way (at most ``most``
    times larger or smaller), else 1.0 (and 1.0 when nothing was found)."""
    if found <= 0 or trained / band <= found <= trained * band:
        return 1.0
    return float(np.clip(trained / found, 1 / most, most))


def link_planes(previous, labels, min_iou, first_new):
    """The labels of a z plane's nuclei that continue those of the plane before it (predict.py --stitch_z).

    previous: int [H, W], the plane before's labels as already linked (0 background); labels: int [H, W], this
    plane's own (0 background, nuclei 1..N); min_iou in (0, 1]. A nucleus continues the one of ``previous`` whose
    intersection over union with it is at least ``min_iou``, one to one, the pairs taken by decreasing IoU (ties by
    the lower previous, then own label); the others get ``first_new``, ``first_new + 1``, ... in the order of their
    own labels. Returns int64 [N + 1]: the new label of each own label (0 stays 0; a label absent from ``labels``
    maps to 0).

    Cellpose's stitch3D (--stitch_threshold) links a nucleus only to its best match if it is also that match's best
    one; here a nucleus whose best match went to a closer pair continues its next best one at or above ``min_iou``.
    Above 0.5 the two agree: no nucleus then has two partners.
    """
    previous, labels = np.asarray(previous), np.asarray(labels)
    count = int(labels.max()) if labels.size else 0
    own_areas = np.bincount(labels.ravel(), minlength=count + 1)
    both = (previous > 0) & (labels > 0)
    # each overlapping pair (previous label, own label) as one int64 key, counted
    pairs, overlaps = np.unique(previous[both].astype(np.int64) * (count + 1) + labels[both], return_counts=True)
    before, own = np.divmod(pairs, count + 1)
    iou = overlaps / (np.bincount(previous.ravel())[before] + own_areas[own] - overlaps)
    mapping = np.zeros(count + 1, np.int64)
    taken = set()
    for k in np.lexsort((own, before, -iou)):
        if iou[k] < min_iou:
            break
        if not mapping[own[k]] and before[k] not in taken:
            mapping[own[k]] = before[k]
            taken.add(before[k])
    unlinked = 1 + np.flatnonzero((own_areas[1:] > 0) & (mapping[1:] == 0))
    mapping[unlinked] = np.arange(first_new, first_new + len(unlinked))
    return mapping
