"""Measures candidate rules for region_merge's ``threshold="auto"`` on generated images.

Each rule maps one image's neighbour similarities s (cosine of every 4-neighbour pixel pair) to
a threshold. The images are piecewise-constant Voronoi partitions with noise
(``mgccl_ops.bench.synthetic_regions``) over a grid of noise levels, cell-feature correlations
and cell counts; a rule scores the mean adjusted Rand index (ARI) of region_merge's partition
against the true cells, per linkage. "best fixed" is the single threshold that scores best over
all images, an upper bound that no per-image rule has to beat.

Usage: python bench/tune_auto_threshold.py [--size 64] [--images 3]
Results: bench/results/auto_threshold.{json,md}
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

import mgccl_ops
from mgccl_ops.bench import report
from mgccl_ops.bench.synthetic_regions import adjusted_rand_index, piecewise_constant_images
from mgccl_ops.reference.regions import MAD_TO_SIGMA, edge_similarities

NOISES = (0.1, 0.3, 0.6, 1.0)
CORRELATIONS = (0.0, 0.5, 0.8)
SEGMENTS = (4, 16, 48)
MAD_FACTORS = (0.0, 0.5, 1.0, 1.25, 1.5, 2.0, 3.0)
QUANTILES = (0.05, 0.1, 0.25, 0.4)
FIXED = tuple(np.round(np.arange(-0.2, 1.0, 0.05), 2))


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the split of the histogram maximising the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    total, total_mean = weight[-1], mean[-1]
    low, high = weight[:-1], total - weight[:-1]
    valid = (low > 0) & (high > 0)
    between = np.zeros_like(centres[:-1])
    mu_low = np.divide(mean[:-1], low, where=valid, out=np.zeros_like(between))
    mu_high = np.divide(total_mean - mean[:-1], high, where=valid, out=np.zeros_like(between))
    between[valid] = low[valid] * high[valid] * (mu_low[valid] - mu_high[valid]) ** 2
    return float(edges[1:][:-1][np.argmax(between)])


def rules(sim: np.ndarray) -> dict[str, float]:
    """Candidate thresholds of one image from its neighbour similarities."""
    median = np.median(sim)
    mad = MAD_TO_SIGMA * np.median(np.abs(sim - median))
    out = {f"median - {k} MAD": median - k * mad for k in MAD_FACTORS}
    out.update({f"quantile {q}": float(np.quantile(sim, q)) for q in QUANTILES})
    out["otsu"] = otsu(sim)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--images", type=int, default=3, help="images per setting")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()

    scores: dict[tuple[str, str], list[float]] = {}
    per_setting = []
    for setting, (noise, rho, segments) in enumerate(itertools.product(NOISES, CORRELATIONS, SEGMENTS)):
        feat, truth = piecewise_constant_images(
            args.images,
            args.channels,
            args.size,
            args.size,
            segments=segments,
            noise=noise,
            correlation=rho,
            seed=setting,
        )
        image_rules = [rules(edge_similarities(image.double(), 4)[2].numpy()) for image in feat]
        candidates = {name: torch.tensor([r[name] for r in image_rules]) for name in image_rules[0]}
        candidates.update({f"fixed {t:.2f}": torch.tensor(float(t)) for t in FIXED})
        for linkage in ("average", "single"):
            for name, threshold in candidates.items():
                labels, _ = mgccl_ops.region_merge(feat, threshold, linkage=linkage)
                ari = [adjusted_rand_index(labels[b], truth[b]) for b in range(args.images)]
                scores.setdefault((linkage, name), []).extend(ari)
                per_setting.append(
                    {
                        "linkage": linkage,
                        "rule": name,
                        "noise": noise,
                        "correlation": rho,
                        "segments": segments,
                        "ari": float(np.mean(ari)),
                    }
                )
        print(f"noise {noise} correlation {rho} segments {segments} done", flush=True)

    rows = []
    for linkage in ("average", "single"):
        fixed = {name: np.mean(v) for (link, name), v in scores.items() if link == linkage and name.startswith("fixed")}
        best_fixed = max(fixed, key=fixed.get)
        for (link, name), values in scores.items():
            if link == linkage and (not name.startswith("fixed") or name == best_fixed):
                rows.append(
                    {
                        "linkage": linkage,
                        "rule": name if name != best_fixed else f"best {name}",
                        "mean_ari": float(np.mean(values)),
                        "min_ari": float(np.min(values)),
                    }
                )
    rows.sort(key=lambda row: (row["linkage"], -row["mean_ari"]))
    for row in rows:
        print(f"{row['linkage']:8s} {row['rule']:22s} mean ARI {row['mean_ari']:.3f}  min {row['min_ari']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_atomic(
        args.out / "auto_threshold.json",
        __import__("json").dumps({"summary": rows, "per_setting": per_setting}, indent=2).encode(),
    )
    notes = (
        f"{len(NOISES) * len(CORRELATIONS) * len(SEGMENTS) * args.images} generated {args.size}x{args.size} images, "
        f"C = {args.channels}: noise {NOISES} x cell correlation {CORRELATIONS} x cells {SEGMENTS}, "
        f"{args.images} each; 4-connectivity. ARI against the true cells; 'best fixed' is the one threshold "
        f"(of {FIXED[0]}..{FIXED[-1]} step 0.05) best over all images."
    )
    text = (
        '# threshold="auto": candidate rules\n\n'
        + notes
        + "\n\n"
        + report.markdown_table(
            rows, [("linkage", "linkage"), ("rule", "rule"), ("mean ARI", "mean_ari"), ("min ARI", "min_ari")]
        )
    )
    report.write_atomic(args.out / "auto_threshold.md", text.encode())


if __name__ == "__main__":
    main()
