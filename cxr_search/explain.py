"""Look inside the models: Grad-CAM and LIME maps, their faithfulness on phantom lesion masks, a shortcut probe.

Grad-CAM comes from the ``grad-cam`` package (``pytorch_grad_cam.GradCAM``) on the layer named in
``TARGET_LAYERS`` for each backbone (the last convolutional stage, before pooling); an ensemble's map is the
members' maps averaged with the member weights. LIME comes from ``lime.lime_image`` with a deterministic SLIC
segmentation and seeded sampling; its ``classifier_fn`` maps LIME's RGB batches back to the model's grayscale
input and runs the whole ensemble (soft vote and temperature) batched on the device. Maps are float32 [S, S] on
the preprocessed image (S = the recorded size); positive values are evidence for the explained class.

Faithfulness (phantoms only, they carry lesion masks): the pointing game (is the map's maximum inside the lesion?)
and the share of positive attribution mass inside the lesion, each with a stratified bootstrap interval
(``metrics.bootstrap_indices``), for the trained model and for an untrained model of the same architecture.
The shortcut probe measures the share of attribution mass in a band around the corner where the phantom
generator burns its confounder marker (``phantoms._burn_marker``) and flags it when that share dominates.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_search.errors import CxrError
from cxr_search.io import storage

METHODS = ("gradcam", "hirescam", "lime")
# Class-activation methods of the grad-cam package. Grad-CAM averages the gradient over the map, which is exact
# for a global-average-pooled head (every timm backbone here) but blurs cnn3's 4x4-pooled, position-specific head;
# HiResCAM (Draelos & Carin 2020) multiplies gradient and activation element-wise and stays faithful for any
# head. `explain --evaluate` measures both.
CAM_METHODS = {"gradcam": "GradCAM", "hirescam": "HiResCAM"}
# Grad-CAM target layer per backbone: a dotted path inside CxrModel (`get_submodule`), the last feature map
# before pooling. cnn3/alexnet/vgg: the last ReLU of `features` (its max-pool would halve the map's resolution).
# inception_v3: the last 17x17 block (Mixed_6e); Mixed_7c is 2x2 at 128 px, too coarse to point at a lesion.
TARGET_LAYERS: dict[str, str] = {
    "cnn3": "backbone.features.7",
    "alexnet": "backbone.features.11",
    "vgg16": "backbone.features.29",
    "vgg19": "backbone.features.35",
    "resnet34": "backbone.layer4",
    "resnet50": "backbone.layer4",
    "inception_v3": "backbone.Mixed_6e",
    "xception": "backbone.act4",
    "densenet121": "backbone.features.norm5",
}
LIME_SEGMENTS = 64  # SLIC superpixels per image (about 16x16 px each at 128 px)
LIME_BATCH = 250  # perturbed images per classifier call
LIME_TOP = 5  # superpixels outlined in a LIME picture: the strongest evidence for the class
# Shortcut probe: the phantom generator burns its marker 3% in from the top-left corner with a side of ~10% of
# the image (phantoms._burn_marker); the band is the top-left 20% x 20% square, the marker plus a margin for the
# coarse resolution of class-activation maps. It covers 4% of the image. The marker dominates when the band
# holds more attribution than the lesions of the same images and at least SHORTCUT_SHARE of it (7.5x its area).
# Measured on cnn3 trained with the marker on every COVID19 phantom: 0.48 at 48 px (the map's maximum in the
# band on every image), 0.93 at 64 px; without the marker 0.01-0.02; untrained models 0.05-0.08.
MARKER_BAND = 0.2  # fraction of each side
SHORTCUT_SHARE = 0.3  # share of the positive attribution mass
SHORTCUT_WARNING = "explanations concentrate on a non-anatomical marker"
EXPLAIN_DIR = "explain"
FAITHFULNESS_CSV = "faithfulness.csv"
FAITHFULNESS_JSON = "faithfulness.json"


# ---------------------------------------------------------------- maps


def target_layer(model: Any) -> Any:
    """The Grad-CAM target module of a ``CxrModel`` (from ``TARGET_LAYERS``)."""
    name = getattr(model, "name", "")
    if name not in TARGET_LAYERS:
        raise CxrError(f"no Grad-CAM target layer is known for backbone '{name}'; known: {', '.join(TARGET_LAYERS)}.")
    return model.get_submodule(TARGET_LAYERS[name])


def gradcam_maps(predictor: Any, images_uint8: np.ndarray, targets: Sequence[int], *, method: str = "gradcam",
                 batch_size: int = 32) -> np.ndarray:
    """Grad-CAM of each image for its target class; an ensemble's maps averaged with the member weights.

    Args:
        predictor: a ``predict.Predictor`` (one checkpoint or an ensemble).
        images_uint8: preprocessed uint8 [N, S, S] images.
        targets: the class index to explain, per image.
        method: "gradcam" or "hirescam" (``CAM_METHODS``).
        batch_size: images per forward/backward pass.

    Returns:
        float32 [N, S, S], each member's map scaled to [0, 1] by grad-cam before averaging.
    """
    import cv2
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cxr_search.training.runtime import Runtime, model_input

    cam_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
    n, size = len(images_uint8), images_uint8.shape[-1]
    total = np.zeros((n, size, size), np.float64)
    weights = np.array([m.weight for m in predictor.members], np.float64)
    device = torch.device(predictor.device)
    for member, w in zip(predictor.members, weights / weights.sum(), strict=True):
        model = member.model.to(device, memory_format=torch.channels_last).eval()
        rt = Runtime.for_model(model, member.cfg, device)
        with cam_class(model=model, target_layers=[target_layer(model)]) as cam:
            for start in range(0, n, batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images_uint8[start : start + batch_size]))
                x = model_input(batch.to(device).unsqueeze(1), rt, member.cfg, augment=False)
                # gradients must reach the target layer even when the layers before it are frozen
                x = x.detach().requires_grad_(True)
                chosen = [ClassifierOutputTarget(int(t)) for t in targets[start : start + batch_size]]
                maps = cam(input_tensor=x, targets=chosen)  # [B, H_in, W_in]: the model's input size
                if maps.shape[-1] != size:  # the input was upsampled to the backbone's minimum size
                    maps = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in maps])
                total[start : start + len(maps)] += w * maps
        model.zero_grad(set_to_none=True)
    return total.astype(np.float32)


def lime_map(predictor: Any, image_uint8: np.ndarray, target: int, *, samples: int = 1000, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """LIME attribution of one image for one class, on SLIC superpixels (hidden superpixels become black).

    Args:
        predictor: a ``predict.Predictor``; LIME explains its (ensembled, calibrated) probabilities.
        image_uint8: one preprocessed uint8 [S, S] image.
        target: the class index to explain.
        samples: perturbed images LIME draws (lime's default: 1000).
        seed: seed of the sampling (same seed, same map).

    Returns:
        (float32 [S, S] map: each pixel carries its superpixel's weight, int [S, S] superpixel labels).
    """
    from skimage.color import gray2rgb
    from skimage.segmentation import slic

    rgb = gray2rgb(np.asarray(image_uint8, np.uint8))
    segments = slic(rgb, n_segments=LIME_SEGMENTS, compactness=10.0, start_label=0)

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        return predictor.predict_arrays(np.ascontiguousarray(batch[..., 0]))  # R = G = B: the gray image

    explainer = _lime_explainer_class()(random_state=seed)
    explanation = explainer.explain_instance(
        rgb, classifier_fn, labels=(int(target),), top_labels=None, hide_color=0, num_samples=samples,
        batch_size=LIME_BATCH, segmentation_fn=lambda _: segments, random_seed=seed,
    )
    weights = np.zeros(int(segments.max()) + 1, np.float64)
    for segment, weight in explanation.local_exp[int(target)]:
        weights[segment] = weight
    return weights[segments].astype(np.float32), segments


def _lime_explainer_class() -> type:
    from lime.lime_image import LimeImageExplainer

    class BatchedLime(LimeImageExplainer):
        """LIME's image explainer with its neighbourhood built in whole batches.

        Same random draws as ``LimeImageExplainer.data_labels`` (so the same explanation), but one array
        operation per batch instead of a Python loop and deep copy per sample with a tqdm bar on stderr.
        """

        def data_labels(self, image, fudged_image, segments, classifier_fn, num_samples, batch_size=10):
            n_features = np.unique(segments).shape[0]
            data = self.random_state.randint(0, 2, num_samples * n_features).reshape((num_samples, n_features))
            data[0, :] = 1
            labels = []
            for start in range(0, num_samples, batch_size):
                keep = data[start : start + batch_size][:, segments].astype(bool)[..., None]  # [B, H, W, 1]
                labels.extend(classifier_fn(np.where(keep, image[None], fudged_image[None])))
            return data, np.array(labels)

    return BatchedLime


def explain_arrays(predictor: Any, images_uint8: np.ndarray, targets: Sequence[int], method: str, *,
                   samples: int = 1000, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Maps of one method for many images: (float32 [N, S, S], LIME superpixels per image or None)."""
    if method in CAM_METHODS:
        return gradcam_maps(predictor, images_uint8, targets, method=method), [None] * len(images_uint8)
    if method == "lime":
        pairs = [lime_map(predictor, img, t, samples=samples, seed=seed)
                 for img, t in zip(images_uint8, targets, strict=True)]
        if not pairs:
            return np.zeros((0, *images_uint8.shape[1:]), np.float32), []
        return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]
    raise CxrError(f"--method is '{method}'; allowed: {', '.join(METHODS)}.")


# ---------------------------------------------------------------- pictures


def overlay(image_uint8: np.ndarray, heat: np.ndarray, caption: str, *, segments: np.ndarray | None = None,
            scale: int | None = None) -> np.ndarray:
    """A picture of one explanation: the image beside it with the positive attribution as a heat map.

    Args:
        image_uint8: preprocessed uint8 [S, S].
        heat: the map [S, S]; only positive values are drawn, scaled to the map's maximum.
        caption: text under the picture (prediction and probabilities).
        segments: LIME superpixels; the outlines of the LIME_TOP strongest positive ones are drawn.
        scale: integer upscaling (default: panels of at least 256 px, room for the caption).

    Returns:
        uint8 RGB [H, W, 3].
    """
    import cv2
    from PIL import Image, ImageDraw

    scale = scale or max(1, -(-256 // image_uint8.shape[0]))
    size = image_uint8.shape[0] * scale
    gray = cv2.resize(image_uint8, (size, size), interpolation=cv2.INTER_NEAREST)
    base = np.repeat(gray[..., None], 3, axis=2)
    pos = np.clip(np.asarray(heat, np.float64), 0, None)
    pos = pos / pos.max() if pos.max() > 0 else pos
    pos = cv2.resize(pos.astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST)
    colour = cv2.applyColorMap(np.uint8(255 * pos), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    alpha = (0.55 * pos)[..., None]
    blended = (base * (1 - alpha) + colour * alpha).astype(np.uint8)
    if segments is not None:
        from skimage.segmentation import find_boundaries

        weights = {int(k): float(heat[segments == k].mean()) for k in np.unique(segments)}
        top = [k for k in sorted(weights, key=weights.get, reverse=True)[:LIME_TOP] if weights[k] > 0]
        positive = np.isin(segments, top)
        edges = find_boundaries(np.where(positive, segments, -1), mode="inner") & positive
        edges = cv2.resize(edges.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
        blended[edges] = (255, 255, 0)
    strip = 18 * (caption.count("\n") + 1) + 4
    canvas = Image.new("RGB", (2 * size + 4, size + strip), (0, 0, 0))
    canvas.paste(Image.fromarray(base), (0, 0))
    canvas.paste(Image.fromarray(blended), (size + 4, 0))
    ImageDraw.Draw(canvas).multiline_text((3, size + 2), caption, fill=(255, 255, 255), spacing=4)
    return np.asarray(canvas)


def contact_sheet(pictures: Sequence[np.ndarray], *, columns: int | None = None) -> np.ndarray:
    """Tile pictures (same size) into one uint8 RGB sheet, row by row."""
    if not pictures:
        raise CxrError("no picture to put on a contact sheet.")
    h, w = pictures[0].shape[:2]
    cols = columns or max(1, math.ceil(math.sqrt(len(pictures) / 2)))  # pictures are twice as wide as high
    rows = math.ceil(len(pictures) / cols)
    sheet = np.zeros((rows * (h + 4), cols * (w + 4), 3), np.uint8)
    for i, pic in enumerate(pictures):
        r, c = divmod(i, cols)
        sheet[r * (h + 4) : r * (h + 4) + h, c * (w + 4) : c * (w + 4) + w] = pic[:h, :w]
    return sheet


def caption_for(classes: Sequence[str], probs: np.ndarray, target: int, method: str) -> str:
    """Prediction, explained class and the probabilities, for an overlay."""
    pred = int(np.argmax(probs))
    ps = "  ".join(f"{c} {p:.3f}" for c, p in zip(classes, probs, strict=True))
    return f"{method} for {classes[target]}; predicted {classes[pred]} ({probs[pred]:.3f})\n{ps}"


def explain_files(predictor: Any, files: Sequence[str | Path], method: str, out: str | Path, *,
                  samples: int = 1000, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Explain the predicted class of each file; write overlays, raw maps and a contact sheet into ``out``.

    Writes ``NNNN_<stem>.<method>.png`` (image and overlay, prediction and probabilities), ``NNNN_<stem>.<method>.npy``
    (float32 [S, S] map), ``contact_sheet.<method>.png`` (up to 100 pictures per sheet, numbered) and
    ``explanations.<method>.csv`` (one row per file, with the prediction, the files written or the reason a file
    was unusable).

    Args:
        predictor: from ``predict.load``.
        files: image files (``predict.list_inputs``).
        method: "gradcam", "hirescam" or "lime".
        out: output folder (created).
        samples: LIME samples per image.
        seed: LIME seed.
        progress: progress bar for more than a few files.
    """
    from PIL import Image

    from cxr_search.predict import PROGRESS_ABOVE, decode_files, progress_counter

    if method not in METHODS:
        raise CxrError(f"--method is '{method}'; allowed: {', '.join(METHODS)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, good, reasons = decode_files(files, predictor.preprocessing)
    probs = predictor.predict_arrays(images)
    targets = [int(np.argmax(p)) for p in probs]
    rows: list[dict[str, Any]] = [{"path": str(f), "error": reasons.get(i, "")} for i, f in enumerate(files)]
    pictures = []
    with progress_counter(progress and len(good) > PROGRESS_ABOVE, len(good), f"explaining ({method})") as advance:
        for k, i in enumerate(good):
            maps, segs = explain_arrays(predictor, images[k : k + 1], targets[k : k + 1], method,
                                        samples=samples, seed=seed)
            stem = f"{i:04d}_{Path(files[i]).stem}.{method}"
            np.save(out / f"{stem}.npy", maps[0])
            pic = overlay(images[k], maps[0], caption_for(predictor.classes, probs[k], targets[k], method),
                          segments=segs[0])
            Image.fromarray(pic).save(out / f"{stem}.png")
            pictures.append(pic)
            rows[i].update({"predicted": predictor.classes[targets[k]],
                            **{f"p_{c}": float(p) for c, p in zip(predictor.classes, probs[k], strict=True)},
                            "overlay": str(out / f"{stem}.png"), "map": str(out / f"{stem}.npy")})
            advance(1)
    for n, start in enumerate(range(0, len(pictures), 100)):
        name = f"contact_sheet.{method}.png" if len(pictures) <= 100 else f"contact_sheet.{method}.{n + 1}.png"
        Image.fromarray(contact_sheet(pictures[start : start + 100])).save(out / name)
    table = pd.DataFrame(rows)
    table.to_csv(out / f"explanations.{method}.csv", index=False, float_format="%.6f")
    return table


# ---------------------------------------------------------------- faithfulness on phantoms


def mass_share(attribution: np.ndarray, region: np.ndarray) -> float:
    """Share of the positive attribution mass inside ``region``; a map with no positive mass says nothing,
    so it scores as a uniform map would (the region's area share)."""
    pos = np.clip(np.asarray(attribution, np.float64), 0, None)
    total = pos.sum()
    return float(pos[region].sum() / total) if total > 0 else float(np.mean(region))


def pointing_hit(attribution: np.ndarray, region: np.ndarray) -> bool:
    """Pointing game: the map's maximum lies inside ``region``.

    Piecewise-constant maps (LIME) reach their maximum on a whole superpixel: it counts as a hit when at least
    half of the maximum's pixels are inside. A map without positive values points nowhere (a miss).
    """
    a = np.asarray(attribution, np.float64)
    top = a.max()
    if not top > 0:
        return False
    at_max = a >= top - 1e-6 * abs(top)
    return bool(region[at_max].mean() >= 0.5)


def marker_band(size: int) -> np.ndarray:
    """Boolean [size, size] band around the corner where phantom confounder markers sit."""
    band = np.zeros((size, size), bool)
    side = max(1, round(MARKER_BAND * size))
    band[:side, :side] = True
    return band


def lesion_annotations(paths: Sequence[str], size: int) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Lesion masks (resized like their images: whole, to [size, size]) and confounder marks from a phantom set.

    The set's ``manifest.csv`` (written by ``phantoms.generate``) is found beside the images' split folders.

    Returns:
        (a boolean mask or None (no lesion: NORMAL) per path, bool [N] "carries the confounder marker").

    Raises:
        CxrError: the images are not a phantom set (no manifest with lesion masks).
    """
    import cv2

    from cxr_search.data.decode import decode
    from cxr_search.data.phantoms import MANIFEST_COLUMNS

    root = _phantom_root(paths)
    manifest = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    if not set(MANIFEST_COLUMNS) <= set(manifest.columns):
        raise CxrError(f"{root / 'manifest.csv'} is not a phantom manifest (columns {', '.join(MANIFEST_COLUMNS)}).")
    by_path = {str((root / p).resolve()): r for p, r in zip(manifest["path"], manifest.to_dict("records"), strict=True)}
    masks: list[np.ndarray | None] = []
    marked = np.zeros(len(paths), bool)
    for i, p in enumerate(paths):
        row = by_path.get(str(Path(p).resolve()))
        if row is None:
            masks.append(None)
            continue
        marked[i] = row["injected"] == "confounder"
        if not row["mask_path"]:
            masks.append(None)
            continue
        mask = decode(root / row["mask_path"])
        # area-average then threshold at half: the mask shrinks with the image, as the preprocessing resizes it
        resized = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
        masks.append(resized >= 128)
    return masks, marked


def _phantom_root(paths: Sequence[str]) -> Path:
    for parent in list(Path(paths[0]).resolve().parents)[:4] if len(paths) else []:
        if (parent / "manifest.csv").is_file() and (parent / "masks").is_dir():
            return parent
    raise CxrError("faithfulness needs lesion masks: the experiment's images are not a phantom set (no manifest.csv "
                   "and masks/ beside them). Run it on phantoms: `cxr-search data synth --out DIR`, then `cxr-search "
                   "run ... --data DIR`, or on the default phantoms (no --data).")


def untrained_copy(predictor: Any) -> Any:
    """The same ensemble (architectures, weights, temperature, preprocessing) with freshly initialised models."""
    import dataclasses

    import torch

    from cxr_search.training.runtime import model_from_config

    members = []
    for m in predictor.members:
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
            torch.manual_seed(m.cfg.seed)
            model = model_from_config(m.cfg.replace(pretrained="none"), num_classes=len(predictor.classes))
        members.append(dataclasses.replace(m, name=f"untrained {m.cfg.backbone}", model=model.eval()))
    return dataclasses.replace(predictor, members=members)


@dataclass(frozen=True)
class Faithfulness:
    """Per-image scores of one method and one model."""

    hits: np.ndarray  # bool [N]: pointing game
    lesion_mass: np.ndarray  # float [N]: share of positive mass inside the lesion
    marker_mass: np.ndarray  # float [N]: share of positive mass in the marker band


def score_maps(maps: np.ndarray, masks: Sequence[np.ndarray]) -> Faithfulness:
    """Pointing game, lesion mass and marker-band mass of each map against its lesion mask."""
    band = marker_band(maps.shape[-1])
    return Faithfulness(
        np.array([pointing_hit(a, m) for a, m in zip(maps, masks, strict=True)], bool),
        np.array([mass_share(a, m) for a, m in zip(maps, masks, strict=True)]),
        np.array([mass_share(a, band) for a in maps]),
    )


def _interval(values: np.ndarray, idx: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    v = np.asarray(values, np.float64)
    lo, hi = np.quantile(v[idx].mean(axis=1), [(1 - level) / 2, (1 + level) / 2]) if len(v) else (np.nan, np.nan)
    return float(v.mean()) if len(v) else float("nan"), float(lo), float(hi)


def evaluate_faithfulness(predictor: Any, images_uint8: np.ndarray, labels: np.ndarray, paths: Sequence[str], *,
                          n: int = 100, methods: Sequence[str] = METHODS, samples: int = 1000, seed: int = 0,
                          n_resamples: int = 1000, progress: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score explanations against phantom lesion masks, for the trained model and an untrained baseline.

    Images with a lesion mask (COVID19 and PNEUMONIA phantoms) are explained for their true class; up to ``n`` of
    them, a seeded draw. Intervals: 95% stratified (by class) bootstrap over images, the same resamples for every
    row, so rows are comparable.

    Args:
        predictor: the trained model or ensemble (``predict.load``).
        images_uint8: preprocessed uint8 [N, S, S] images (e.g. the experiment's test split).
        labels: int [N] true classes.
        paths: source file of each image (to find its mask in the phantom manifest).
        n: images to evaluate at most.
        methods: any of ``METHODS``.
        samples: LIME samples per image.
        seed: seed of the image draw, LIME and the bootstrap.
        n_resamples: bootstrap resamples.
        progress: print a line per method and model.

    Returns:
        (table: one row per method x model with ``pointing_game``, ``lesion_mass``, ``marker_mass`` and their
        ``_lo``/``_hi`` bounds, ``chance`` (mean lesion area share: what a random map scores), ``n_images``,
        ``n_marked``; the shortcut probe: ``flagged``, ``message``, per method the trained model's ``marker_mass``
        [point, lo, hi], ``lesion_mass`` and ``max_in_band`` (pointing game on the band) on the probed images).
    """
    from cxr_search.metrics import bootstrap_indices

    masks, marked = lesion_annotations(paths, images_uint8.shape[-1])
    usable = np.flatnonzero([m is not None and m.any() for m in masks])
    if len(usable) == 0:
        raise CxrError("none of the images has a lesion mask (only NORMAL phantoms?); evaluate on a split with "
                       "COVID19 or PNEUMONIA phantoms.")
    chosen = np.sort(np.random.default_rng(seed).permutation(usable)[:n])
    imgs, y = images_uint8[chosen], np.asarray(labels)[chosen]
    chosen_masks = [masks[i] for i in chosen]
    probe_group = marked[chosen] if marked[chosen].any() else np.ones(len(chosen), bool)
    idx = bootstrap_indices(y, n_resamples, stratified=True, seed=seed)
    probe_idx = bootstrap_indices(y[probe_group], n_resamples, stratified=True, seed=seed)
    chance = float(np.mean([m.mean() for m in chosen_masks]))
    rows, probe = [], {"flagged": False, "message": "", "methods": {}, "n_marked": int(marked[chosen].sum()),
                       "band": f"top-left {MARKER_BAND:.0%} x {MARKER_BAND:.0%} of the image",
                       "threshold": SHORTCUT_SHARE}
    baseline = untrained_copy(predictor)
    for method in methods:
        for kind, model in (("trained", predictor), ("untrained", baseline)):
            if progress:
                print(f"faithfulness: {method} on {len(chosen)} images, {kind} model", flush=True)
            maps, _ = explain_arrays(model, imgs, y.tolist(), method, samples=samples, seed=seed)
            scores = score_maps(maps, chosen_masks)
            row = {"method": method, "model": kind, "models": ", ".join(m.name for m in model.members),
                   "n_images": len(chosen), "n_marked": int(marked[chosen].sum()), "chance": chance}
            for name, values, ix in (("pointing_game", scores.hits, idx), ("lesion_mass", scores.lesion_mass, idx),
                                     ("marker_mass", scores.marker_mass[probe_group], probe_idx)):
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = _interval(values, ix)
            rows.append(row)
            if kind == "trained":
                share, on_lesions = row["marker_mass"], float(scores.lesion_mass[probe_group].mean())
                probe["methods"][method] = {"marker_mass": [share, row["marker_mass_lo"], row["marker_mass_hi"]],
                                            "lesion_mass": on_lesions,
                                            "max_in_band": float(np.mean([pointing_hit(a, marker_band(a.shape[-1]))
                                                                          for a in maps[probe_group]]))}
                probe["flagged"] |= bool(share >= SHORTCUT_SHARE and share > on_lesions)
    if probe["flagged"]:
        worst = max(probe["methods"].items(), key=lambda kv: kv[1]["marker_mass"][0])
        probe["message"] = (f"{SHORTCUT_WARNING}: {worst[0]} puts {worst[1]['marker_mass'][0]:.0%} of its positive "
                            f"attribution in the {probe['band']} (the lesions of the same images get "
                            f"{worst[1]['lesion_mass']:.0%}); the model may predict from a burned-in marker, not "
                            "from the lungs")
    return pd.DataFrame(rows), probe


def write_faithfulness(exp_dir: str | Path, table: pd.DataFrame, probe: dict[str, Any],
                       settings: dict[str, Any]) -> Path:
    """Write ``EXP/explain/faithfulness.csv`` and ``faithfulness.json`` (probe and settings); returns the folder."""
    folder = Path(exp_dir) / EXPLAIN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in ((FAITHFULNESS_CSV, lambda p: table.to_csv(p, index=False, float_format="%.4f")),
                        (FAITHFULNESS_JSON, lambda p: p.write_text(json.dumps(
                            {"shortcut": probe, "settings": settings}, indent=2, default=str)))):
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        write(tmp)
        os.replace(tmp, folder / name)
    return folder


def read_faithfulness(exp_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """(table, {"shortcut": ..., "settings": ...}) written by :func:`write_faithfulness`, or None if absent."""
    folder = storage.path(exp_dir) / EXPLAIN_DIR
    if not (folder / FAITHFULNESS_CSV).is_file() or not (folder / FAITHFULNESS_JSON).is_file():
        return None
    with storage.open_binary(folder / FAITHFULNESS_CSV) as f:
        table = pd.read_csv(f)
    return table, storage.read_json(folder / FAITHFULNESS_JSON)


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validate method names (a CxrError naming the allowed ones)."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CxrError(f"--method {','.join(bad) or '(none)'} is not known; allowed: {', '.join(METHODS)}.")
    return tuple(methods)
