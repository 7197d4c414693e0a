"""The fine prototypes' short list from a faiss index, against vpdm's own (torch) inverted file.

    pip install -e ".[faiss]"        # faiss-cpu, pinned in pyproject.toml
    python benchmarks/faiss_short_list.py --checkpoint runs/x/model.pt --data SPEC --threads 2

vpdm's fine condition is, per feature position, the kernel average of the prototypes in the ``probes``
nearest short lists of the image's routed class (``VaguePrototypes._short_list``). The field's library for
short lists is faiss; this script builds, per class, a faiss ``IndexIVFFlat`` over the same lists (its coarse
quantizer holds vpdm's own list centroids, so a position probes the same lists), asks it for each position's
``k`` nearest prototypes, and takes the kernel over those ``k`` alone (the rest of the probed lists' weights,
a few percent at most with the default kernel width, are dropped). Printed, per ``k``: milliseconds per image
of the fine condition (faiss search + kernel, against torch's grouped products on the same batch of 16 test
images, both on ``--threads`` threads, min over interleaved repeats), the condition's difference from torch's
(relative to the fine term, ``|y_faiss - y_torch| / |x - y_torch|``, median and 99th percentile over positions),
and the test split's image / pixel AUROC / AUPRO / pixel AP with that condition in place of torch's (the
term statistics are the checkpoint's, fitted with torch's condition).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch


def build_indexes(fine, faiss):
    """One IndexIVFFlat per class over that class's lists, quantizer = vpdm's list centroids; ids = prototype rows."""
    from faiss.contrib.ivf_tools import add_preassigned

    prototypes = fine.prototypes.detach().float().contiguous()
    offsets = fine.list_offsets.tolist()
    indexes = []
    for lists in fine.class_lists.tolist():
        lists = [g for g in lists if g >= 0]
        centroids = fine.list_centroids[lists].float().contiguous().numpy()
        quantizer = faiss.IndexFlatL2(fine.dim)
        quantizer.add(centroids)
        index = faiss.IndexIVFFlat(quantizer, fine.dim, len(lists))
        index.is_trained = True
        rows = np.concatenate([np.arange(offsets[g], offsets[g + 1]) for g in lists])
        # each prototype into the list vpdm stored it in (its nearest centroid: the same list)
        assign = np.concatenate([np.full(offsets[g + 1] - offsets[g], i) for i, g in enumerate(lists)])
        # named arrays: add_preassigned keeps only a raw pointer to the ids, a temporary would be freed under it
        vectors, ids, assign = prototypes[rows].numpy(), rows.astype(np.int64), assign.astype(np.int64)
        add_preassigned(index, np.ascontiguousarray(vectors), assign, ids)
        index.nprobe = min(fine.config.probes, len(lists))
        indexes.append((index, quantizer))  # the quantizer kept alive: the index only points to it
    return indexes


def faiss_condition(fine, indexes, features: torch.Tensor, k: int) -> torch.Tensor:
    """The fine condition (B x C x S x S) with each position's kernel over its k nearest probed prototypes."""
    batch = features.shape[0]
    flat = fine.samples(features).float().contiguous()
    per_image = flat.shape[0] // batch
    route = fine._route(flat, per_image)[:, 0]
    scale = 1.0 / (math.sqrt(fine.dim) * fine.config.ot_reg)
    prototypes = fine.prototypes.detach()
    y = torch.empty_like(flat)
    for c in route.unique().tolist():
        images = torch.nonzero(route == c).flatten()
        rows = (images.unsqueeze(1) * per_image + torch.arange(per_image)).flatten()
        distance, ids = indexes[c][0].search(flat[rows].numpy(), k)
        distance, ids = torch.from_numpy(distance), torch.from_numpy(ids)
        logits = distance.clamp_min_(0).sqrt_().mul_(-scale).masked_fill_(ids < 0, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        ids = ids.clamp_min(0)
        for first in range(0, len(rows), 2048):  # the weighted sum of k prototype rows per position, in chunks
            part = slice(first, first + 2048)
            y[rows[part]] = torch.bmm(weights[part].unsqueeze(1), prototypes[ids[part]]).squeeze(1)
    y = y.view(batch, fine.vague_size, fine.vague_size, fine.channels).permute(0, 3, 1, 2)
    return y.contiguous()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a vpdm checkpoint with routed per-class fine prototypes")
    p.add_argument("--data", help="data spec of the test split (default: the checkpoint's)")
    p.add_argument("--k", default="8,16,32,64", help="comma-separated numbers of nearest prototypes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    try:
        import faiss
    except ImportError:
        print('faiss_short_list.py needs faiss: pip install -e ".[faiss]"', file=sys.stderr)
        return 2
    from vpdm.evaluation.metrics import compute_metrics
    from vpdm.inference.checkpoint import load_checkpoint
    from vpdm.training import engine

    from vpdm.bench.screen import score
    from vpdm.evaluation import evaluator

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    model, config, _ = load_checkpoint(args.checkpoint)
    model.eval()
    fine = model.fine
    if fine is None or not fine.routed or fine.config.routes != 1:
        print(f"{args.checkpoint}: the fine prototypes are not routed per class (model.fine.per_class, route=1)")
        return 2
    if args.data:
        config = config.with_overrides({"data.spec": args.data}).validate()
    test = engine.load_split(config, "test", progress=False)
    labels, masks, cats = evaluator.ground_truth(test.dataset)
    ks = [int(v) for v in args.k.split(",")]
    start = time.perf_counter()
    indexes = build_indexes(fine, faiss)
    print(f"{len(indexes)} faiss IVF indexes over {fine.count} prototypes in {time.perf_counter() - start:.1f}s")

    picks = np.unique(np.linspace(0, len(test.dataset) - 1, 16).round().astype(int))
    batch = model.normalise(test.features[torch.as_tensor(picks)].float())
    with torch.no_grad():
        reference = fine(batch, with_loss=False)["yhat"]
        fns = {"torch": lambda: fine(batch, with_loss=False)}
        for k in ks:
            fns[f"faiss k={k}"] = lambda k=k: faiss_condition(fine, indexes, batch, k)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - t) / len(picks))
        term = (batch - reference).norm(dim=1).flatten()
        print(f"fine condition, batch of {len(picks)}, {args.threads} threads (ms per image, min / median):")
        for name, values in times.items():
            line = f"  {name:12s} {min(values):6.2f} / {float(np.median(values)):6.2f}"
            if name != "torch":
                k = int(name.split("=")[1])
                y = faiss_condition(fine, indexes, batch, k)
                rel = ((y - reference).norm(dim=1).flatten() / term).numpy()
                line += f"  |dy| / fine term: median {np.median(rel):.1e}, p99 {np.quantile(rel, 0.99):.1e}"
            print(line, flush=True)

    original = fine._assign
    for name in ["torch", *[f"faiss k={k}" for k in ks]]:
        if name != "torch":
            k = int(name.split("=")[1])

            def patched(features, histogram=False, num_classes=0, k=k):
                out = {"yhat": faiss_condition(fine, indexes, features, k)}
                if num_classes:
                    route = fine._route(fine.samples(features), fine.per_image)
                    out["class_mass"] = torch.zeros(features.shape[0], num_classes).scatter_(1, route, 1.0)
                return out

            fine._assign = patched
        scores, maps, seconds = score(model, config, test, False)
        fine._assign = original
        m = compute_metrics(labels, scores, masks, maps, cats)["mean"]
        print(
            f"{name:12s} image {100 * m['image_auroc']:.1f} pixel {100 * m['pixel_auroc']:.1f} "
            f"AUPRO {100 * m['aupro']:.1f} AP {100 * m['pixel_ap']:.1f} (scored in {seconds:.0f}s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
