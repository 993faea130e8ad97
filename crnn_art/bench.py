"""``crnn-art bench``: speed and memory of the model and the input pipeline, measured in one run.

Every figure compares two things on the same machine in the same process, so ratios hold even
where absolute numbers depend on the hardware:

- training step time of the CRNN vs a bare torchvision ResNet-50 classifier (same size, batch,
  precision, memory format) -> the CRNN/ResNet-50 time ratio (target <= 1.10 at 224 px);
- evaluation images/s;
- input pipeline images/s in one process: the seed's pipeline (full PIL decode of a 1600x1280 JPEG,
  torchvision v1 transforms at 384) vs crnn-art's (draft-mode decode, v2 transforms) on the same
  originals and on 512 px prepared images (target >= 4x the seed's), and the full DataLoader with N workers;
- outlier scoring of 80,000 x 3,072 embeddings over 27 classes, centroids and nearest neighbours
  (target < 5 s on a 2-core CPU);
- peak memory of each (CUDA: allocator peak; CPU: resident-set peak);
- with ``--compile``: the CRNN's step with its ResNet trunk under ``torch.compile`` (``model.compile_trunk``)
  vs eager, and the one-off compile time, which the option must earn back;
- JPEG decoding in batches with ``torchvision.io.decode_jpeg`` on the bench device (on CUDA: nvJPEG)
  vs PIL's draft-mode decode in one worker, the figure a GPU-decode input path would have to beat.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from crnn_art.data.partition import hub_like_layout, planning_figures
from crnn_art.errors import ConfigError

TARGETS = {"crnn_vs_resnet50_step_time": 1.10, "pipeline_speedup_vs_seed": 4.0, "outlier_scoring_seconds": 5.0,
           "streaming_rows_used_min": 0.999, "streaming_plan_seconds_max": 2.0}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # Linux: reset the resident-set high-water mark
        except OSError:
            pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _timed(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call (median of ``steps`` after ``warmup``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _bare_backbone(backbone: str, size: int) -> torch.nn.Module:
    """The backbone alone with its own 27-class classifier: what the CRNN's cost is measured against."""
    if backbone == "resnet50":
        from torchvision.models import resnet50

        return resnet50(num_classes=27)
    import timm

    name = backbone.removeprefix("timm:")
    try:
        return timm.create_model(name, num_classes=27, img_size=size)
    except TypeError:
        return timm.create_model(name, num_classes=27)


def _train_step(name: str, device: torch.device, fmt: torch.memory_format, precision: str, x: torch.Tensor,
                y: torch.Tensor, backbone: str = "resnet50") -> tuple[Callable[[], None], torch.nn.Module]:
    """One training step of the CRNN (``name="crnn"``) or of the bare backbone (27 classes) on a fixed batch."""
    from crnn_art.model import CRNNArtClassifier

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if name == "crnn":
        net = CRNNArtClassifier(heads={"style": 27}, backbone=backbone, backbone_weights=None, image_size=x.shape[-1])
        logits_of = lambda out: out.logits["style"]  # noqa: E731
    else:
        net, logits_of = _bare_backbone(backbone, x.shape[-1]), lambda out: out
    net = net.to(device).to(memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(logits_of(net(x)).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step, net


def _alternating_times(steps_by_name: dict[str, Callable[[], None]], steps: int,
                       device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step, the steps taken in turn (A, B, A, B, ...) so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            times[name].append(_timed(step, 1, warmup=0, device=device))
    return times


def bench_training(device: torch.device, size: int, batch: int, steps: int, precision: str,
                   channels_last: bool, backbone: str = "resnet50") -> dict[str, Any]:
    """Train-step time of the CRNN and of its bare backbone (ResNet-50 by default; 27 classes), same settings.

    Peak memory is taken with each model alone. The timed steps then alternate (CRNN, ResNet,
    CRNN, ...), so a machine that slows down or speeds up mid-run (shared cores, clocks) moves
    both alike; the ratio is the median of the per-pair ratios.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 27, (batch,), device=device)
    names = ("crnn", "backbone")
    results: dict[str, Any] = {}
    for name in names:
        step, net = _train_step(name, device, fmt, precision, x, y, backbone)
        step()
        _reset_peak(device)
        step()
        results[name] = {"peak_mb": _peak_mb(device)}
        del step, net
    steppers = {name: _train_step(name, device, fmt, precision, x, y, backbone) for name in names}
    for step, _ in steppers.values():
        step()  # warm-up
    times = _alternating_times({name: step for name, (step, _) in steppers.items()}, steps, device)
    for name in names:
        results[name]["step_s"] = float(np.median(times[name]))
        results[name]["images_per_s"] = batch / results[name]["step_s"]
    # The ratio of each CRNN step to the ResNet step right after it, then the median: the pairing is
    # what the alternation is for (single steps on 2 shared cores move by +-8 %).
    paired = np.array(times["crnn"]) / np.array(times["backbone"])
    crnn = steppers["crnn"][1].eval()
    del steppers
    with torch.no_grad():
        def infer() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                crnn(x)

        _reset_peak(device)
        eval_s = _timed(infer, steps, warmup=1, device=device)
    results["eval"] = {"images_per_s": batch / eval_s, "peak_mb": _peak_mb(device)}
    results["ratio"] = float(np.median(paired))
    results["ratio_of_medians"] = results["crnn"]["step_s"] / results["backbone"]["step_s"]
    return results


def bench_compile(device: torch.device, size: int, batch: int, steps: int, precision: str,
                  channels_last: bool) -> dict[str, Any]:
    """CRNN train step with the ResNet trunk compiled in place (GRUs eager) vs eager, same settings.

    The first compiled step includes compilation: reported apart as ``compile_s``, with the number of
    steps the faster step needs to pay it back. Timed steps alternate, as in ``bench_training``.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 27, (batch,), device=device)
    compiled_step, net = _train_step("crnn", device, fmt, precision, x, y)
    net.trunk.compile()
    first = _timed(compiled_step, 1, warmup=0, device=device)
    _reset_peak(device)
    compiled_step()
    peak = _peak_mb(device)
    eager_step, _ = _train_step("crnn", device, fmt, precision, x, y)
    eager_step()  # warm-up
    times = _alternating_times({"eager": eager_step, "compiled": compiled_step}, steps, device)
    results: dict[str, Any] = {name: {"step_s": float(np.median(t)), "images_per_s": batch / float(np.median(t))}
                               for name, t in times.items()}
    results["compiled"].update(first_step_s=first, peak_mb=peak)
    eager, compiled = results["eager"]["step_s"], results["compiled"]["step_s"]
    results["speedup"] = float(np.median(np.array(times["eager"]) / np.array(times["compiled"])))
    results["compile_s"] = first - compiled
    results["payback_steps"] = results["compile_s"] / (eager - compiled) if eager > compiled else None
    return results


def bench_jpeg_decode(device: torch.device, originals: list[bytes], batch: int = 16) -> dict[str, Any]:
    """Decode 1600x1280 JPEGs: batched ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA) vs
    PIL's draft-mode decode (to the 384 px recipe's needs) in one CPU process, as a worker does it."""
    from torchvision.io import decode_jpeg

    from crnn_art.data.decoding import decode_image
    from crnn_art.data.transforms import decode_min_side

    data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in originals[:batch]]
    data = (data * (batch // len(data) + 1))[:batch]
    min_side = decode_min_side(384, 0.7)
    pil_rate = _per_image_rate(lambda d: decode_image({"bytes": d, "path": None}, min_side), originals[:batch])
    seconds = _timed(lambda: decode_jpeg(data, device=device), 3, warmup=1, device=device)
    return {"device": str(device), "batch": batch, "decode_jpeg_images_per_s": batch / seconds,
            "pil_draft_images_per_s": pil_rate, "ratio": batch / seconds / pil_rate}


def bench_optimizer(device: torch.device, steps: int) -> dict[str, Any]:
    """One AdamW step over the CRNN's parameters: the for-each implementation against the fused kernel."""
    from crnn_art.model import CRNNArtClassifier

    net = CRNNArtClassifier(heads={"style": 27}).to(device)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    result: dict[str, Any] = {"parameters": sum(p.numel() for p in net.parameters())}
    for name, fused in (("foreach", False), ("fused", True)):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=not fused or None, fused=fused or None)
        result[f"{name}_step_ms"] = 1000 * _timed(opt.step, steps, warmup=1, device=device)
    result["fused_speedup"] = result["foreach_step_ms"] / result["fused_step_ms"]
    return result


def _large_jpegs(n: int, w: int = 1600, h: int = 1280) -> list[bytes]:
    """Painting-like originals: smooth colour fields with texture (compress like real scans)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(xx / (40 + 10 * i) + c) * np.cos(yy / (55 + 7 * c)) for c in range(3)], -1)
        noise = rng.normal(0, 0.15, (h, w, 3)).astype(np.float32)
        arr = ((base + noise) * 60 + 128).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _per_image_rate(fn: Callable[[bytes], Any], images: list[bytes]) -> float:
    """Images/s of ``fn`` over ``images`` in this process, after one warm-up call."""
    fn(images[0])
    start = time.perf_counter()
    for data in images:
        fn(data)
    return len(images) / (time.perf_counter() - start)


def _shrink(data: bytes, short_side: int = 512) -> bytes:
    from crnn_art.data.prepare import resize_jpeg

    resized, _ = resize_jpeg({"bytes": data, "path": None}, short_side, 90)
    return resized


def bench_pipeline(originals: list[bytes], workers: int, size: int = 384,
                   device: torch.device | None = None) -> dict[str, Any]:
    """Decode + train transform images/s in one process (seed vs ours; whole recipe, and the workers'
    share with ``augment.on_device``), what the device share costs, and the DataLoader with workers."""
    from PIL import Image
    from torchvision import transforms as v1

    from crnn_art.config import AugmentConfig
    from crnn_art.data.decoding import decode_image
    from crnn_art.data.transforms import decode_min_side, train_transform, worker_transform

    device = device or torch.device("cpu")
    prepared = [_shrink(d) for d in originals]
    seed = v1.Compose([
        v1.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15)), v1.RandomHorizontalFlip(),
        v1.ColorJitter(0.12, 0.12, 0.10, 0.03), v1.ToTensor(),
        v1.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), v1.RandomErasing(p=0.2),
    ])
    ours = train_transform(size, AugmentConfig())
    min_side = decode_min_side(size, 0.7)
    cpu = torch.device("cpu")
    _reset_peak(cpu)
    seed_rate = _per_image_rate(lambda d: seed(Image.open(io.BytesIO(d)).convert("RGB")), originals)
    ours_rate = _per_image_rate(lambda d: ours(decode_image({"bytes": d, "path": None}, min_side)), originals)
    prepared_rate = _per_image_rate(lambda d: ours(decode_image({"bytes": d, "path": None}, min_side)), prepared)
    crop = worker_transform(size, AugmentConfig())
    worker_rate = _per_image_rate(lambda d: crop(decode_image({"bytes": d, "path": None}, min_side)), prepared)
    result = {
        "seed_images_per_s": seed_rate, "draft_decode_images_per_s": ours_rate,
        "prepared_512_images_per_s": prepared_rate, "speedup_draft": ours_rate / seed_rate,
        "speedup_prepared": prepared_rate / seed_rate, "peak_mb": _peak_mb(cpu),
        "worker_on_device_images_per_s": worker_rate, "speedup_worker_on_device": worker_rate / seed_rate,
        "device_augment": _device_augment_rate(device, size),
        "loader_workers": workers, "loader_images_per_s": _loader_rate(prepared, workers, size),
    }
    return result


def _device_augment_rate(device: torch.device, size: int, batch: int = 32, reps: int = 3) -> dict[str, Any]:
    """What ``augment.on_device`` costs where the model runs: jitter + normalise + erase of a uint8 batch."""
    from crnn_art.config import AugmentConfig
    from crnn_art.data.transforms import DeviceAugment

    augment = DeviceAugment(AugmentConfig())
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    seconds = _timed(lambda: augment(images, 0), reps, warmup=1, device=device)
    return {"device": str(device), "batch": batch, "images_per_s": batch / seconds}


def _loader_rate(prepared: list[bytes], workers: int, size: int) -> float:
    """The real training DataLoader (PaintingDataset + GlobalDrawBatchSampler) over prepared images."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from crnn_art.config import AugmentConfig
    from crnn_art.data.loaders import PaintingDataset, train_loader
    from crnn_art.data.sampling import GlobalDrawBatchSampler
    from crnn_art.data.transforms import eval_resize, train_transform

    reps = max(1, 256 // len(prepared))
    cells = [{"bytes": d, "path": None} for d in prepared] * reps
    ds = Dataset.from_dict(
        {"image": cells, "artist": [0] * len(cells), "genre": [0] * len(cells), "style": [0] * len(cells)},
        features=Features({"image": ImageFeature(), "artist": ClassLabel(names=["a"]),
                           "genre": ClassLabel(names=["g"]), "style": ClassLabel(names=["s"])}),
    )
    labels = np.zeros((len(cells), 1), dtype=np.int64)
    dataset = PaintingDataset(ds, np.arange(len(cells)), labels, train_transform(size, AugmentConfig()),
                              eval_resize(size))
    sampler = GlobalDrawBatchSampler(len(cells), 16, 0, 1, seed=0)
    loader = train_loader(dataset, sampler, workers)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["row"])
    return n / (time.perf_counter() - start)


def bench_outliers(n: int = 80_000, dim: int = 3072, classes: int = 27) -> dict[str, Any]:
    from crnn_art.evaluation.outliers import (
        centroids_from_sums,
        class_sums,
        gather_references,
        knn_agreement,
        project,
        score_head,
    )

    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(n, dim, generator=gen), dim=1)
    labels = torch.randint(0, classes, (n,), generator=gen)
    logits = torch.randn(n, classes, generator=gen)
    cpu = torch.device("cpu")
    _reset_peak(cpu)
    start = time.perf_counter()
    rows = torch.arange(n)
    sums, counts = class_sums(z, labels, classes)
    zp = project(z)
    references = gather_references(zp, labels, rows, counts)
    agreement = knn_agreement(zp, labels, rows, *references)
    scored = score_head("style", z, logits, labels, rows, centroids_from_sums(sums, counts), agreement)
    seconds = time.perf_counter() - start
    assert len(scored) == n
    return {"samples": n, "dim": dim, "classes": classes, "references": len(references[2]), "seconds": seconds,
            "peak_mb": _peak_mb(cpu)}


def crnn_train_flops(size: int) -> float:
    """FLOPs of one CRNN training step per image (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from crnn_art.model import CRNNArtClassifier

    net = CRNNArtClassifier(heads={"style": 27})
    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        net(x).logits["style"].sum().backward()
    return float(counter.get_total_flops())


def bench_backbones(backbones: list[str], device: str, size: int, batch: int, steps: int,
                    precision: str) -> list[dict[str, Any]]:
    """``crnn-art bench --backbone ...``: for each backbone, the CRNN's train step against the bare backbone's
    (channels-last, random init), measured as ``bench_training`` does (alternating steps, median pair ratio)."""
    from crnn_art.backbones import backbone_problem

    for name in backbones:
        problem = backbone_problem(name)
        if problem:
            raise ConfigError(problem.replace("model.backbone", "--backbone"))
    dev = torch.device(device)
    return [{"name": name, **bench_training(dev, size, batch, steps, precision, True, name)} for name in backbones]


def _wikiart_like_hashes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Perceptual and average hashes and thumbnails shaped like a large collection: 90 % unrelated paintings,
    8 % near-blank sketches (average hashes of a few bits, perceptual hashes from 20 patterns: the crowded buckets
    real collections have), 2 % copies (up to 6 bits off another image). Returns the planted (original, copy)
    pairs too."""
    rng = np.random.default_rng(seed)
    phash, ahash = (rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True) for _ in range(2))
    sketches = rng.choice(n, int(0.08 * n), replace=False)
    ahash[sketches] = rng.integers(0, 16, len(sketches)).astype(np.uint64)
    patterns = rng.integers(0, np.iinfo(np.uint64).max, 20, dtype=np.uint64, endpoint=True)
    phash[sketches] = patterns[rng.integers(0, 20, len(sketches))] ^ _random_bits(rng, len(sketches), 12)
    copies = np.setdiff1d(np.arange(n), sketches)[: int(0.02 * n)]
    originals = rng.choice(np.setdiff1d(np.arange(n), np.r_[sketches, copies]), len(copies), replace=False)
    phash[copies] = phash[originals] ^ _random_bits(rng, len(copies), 6)
    ahash[copies] = ahash[originals] ^ _random_bits(rng, len(copies), 4)
    thumbs = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    thumbs[copies] = thumbs[originals]
    return phash, ahash, thumbs, np.stack([originals, copies], axis=1)


def _random_bits(rng: np.random.Generator, n: int, most: int) -> np.ndarray:
    """``n`` masks of up to ``most`` random bits each."""
    masks = np.zeros(n, dtype=np.uint64)
    for _ in range(most):
        masks |= np.where(rng.random(n) < 0.5, np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64), np.uint64(0))
    return masks


def bench_duplicates(n: int = 81_444, embedded: int = 8_000, dim: int = 3072, device: str = "cpu") -> dict[str, Any]:
    """``crnn-art duplicates`` past the decoding: grouping ``n`` images by their hashes (multi-index hashing, no
    all-pairs loop) on a WikiArt-sized synthetic set, and the exact cosine search of ``--cosine`` on ``embedded``
    random embeddings, with its time scaled to ``n`` (it grows with the square)."""
    from crnn_art.data.duplicates import cosine_pairs, find_groups

    phash, ahash, thumbs, planted = _wikiart_like_hashes(n)
    cpu = torch.device("cpu")
    _reset_peak(cpu)
    start = time.perf_counter()
    groups = find_groups(phash, ahash, thumbs)
    hashing = time.perf_counter() - start
    found = sum(len(g.members) for g in groups)
    group_of = {m: k for k, g in enumerate(groups) for m in g.members}
    joined = sum(group_of.get(int(a), -1) == group_of.get(int(b), -2) for a, b in planted)
    z = torch.randn(embedded, dim, generator=torch.Generator().manual_seed(0)).numpy()
    start = time.perf_counter()
    cosine_pairs(z, 0.95, device=device)
    cosine = time.perf_counter() - start
    return {"images": n, "planted_copies": len(planted), "planted_found": joined, "groups": len(groups),
            "images_in_groups": found, "group_seconds": hashing, "peak_mb": _peak_mb(cpu), "embedded": embedded,
            "dim": dim, "cosine_seconds": cosine, "cosine_seconds_at_images": cosine * (n / embedded) ** 2,
            "device": device}


STREAM_SIZES = ((8, 8), (16, 4), (32, 2), (64, 2), (64, 16), (256, 2), (256, 16))
"""(processes, local batch) planned by ``bench_streaming_plan``: one node to a large cluster."""


def bench_streaming_plan(epochs: int = 20) -> list[dict[str, Any]]:
    """The streaming partition on a layout shaped like ``huggan/wikiart`` (81,444 rows, 72 files, row groups of 100,
    70 % training rows), planned for every process and epoch, no I/O: rows trained per epoch and planning time."""
    layout = hub_like_layout()
    return [{"processes": world, "local_batch": local, "epochs": epochs,
             **planning_figures(layout, world, local, epochs, block=1000)} for world, local in STREAM_SIZES]


def _stage(on_stage, name: str) -> None:
    """Tell the caller (``crnn-art bench``'s progress line) which measurement starts."""
    if on_stage is not None:
        on_stage(name)


def run_bench(device: str = "cpu", size: int = 224, batch: int = 16, steps: int = 7, precision: str = "no",
              pipeline_images: int = 24, workers: int | None = None, channels_last: bool | None = None,
              quick: bool = False, peak_tflops: float | None = None, compile_trunk: bool = False,
              on_stage=None) -> dict[str, Any]:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device!r} is not a device crnn-art benchmarks; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no GPU is visible to PyTorch here (torch.cuda.is_available() is False); "
                          "use --device cpu, or install a CUDA build of torch on a GPU machine")
    dev = torch.device(device)
    if quick:
        steps, pipeline_images = 2, 6
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    layouts = [channels_last] if channels_last is not None else [False, True]
    report: dict[str, Any] = {
        "machine": {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "cpu_cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": {"image_size": size, "batch": batch, "steps": steps, "precision": precision},
        "training": {},
        "targets": TARGETS,
    }
    for cl in layouts:
        _stage(on_stage, f"training step, {'channels_last' if cl else 'contiguous'}")
        report["training"]["channels_last" if cl else "contiguous"] = bench_training(dev, size, batch, steps,
                                                                                     precision, cl)
    if compile_trunk:
        _stage(on_stage, "training step, trunk compiled")
        report["compile"] = bench_compile(dev, size, batch, steps, precision, channels_last is not False)
    _stage(on_stage, "optimizer step")
    report["optimizer"] = bench_optimizer(dev, steps)
    originals = _large_jpegs(pipeline_images)  # generated once: 1600 x 1280, like WikiArt scans
    _stage(on_stage, "JPEG decode")
    report["jpeg_decode"] = bench_jpeg_decode(dev, originals)
    _stage(on_stage, "input pipeline")
    report["pipeline"] = bench_pipeline(originals, workers, device=dev)
    _stage(on_stage, "outlier scoring")
    report["outliers"] = bench_outliers(10_000 if quick else 80_000)
    _stage(on_stage, "streaming plan")
    report["streaming_plan"] = bench_streaming_plan()
    best = min(report["training"].values(), key=lambda r: r["crnn"]["step_s"])
    report["summary"] = {
        "crnn_vs_resnet50_step_time": best["ratio"],
        "pipeline_speedup_vs_seed": max(report["pipeline"]["speedup_draft"], report["pipeline"]["speedup_prepared"],
                                        report["pipeline"]["speedup_worker_on_device"]),
        "outlier_scoring_seconds": report["outliers"]["seconds"],
        "streaming_rows_used_min": min(r["used"] for r in report["streaming_plan"]),
        "streaming_plan_seconds_max": max(r["seconds"] for r in report["streaming_plan"]),
    }
    if peak_tflops:
        flops = crnn_train_flops(size) * best["crnn"]["images_per_s"]
        report["summary"]["model_flop_utilisation"] = flops / (peak_tflops * 1e12)
        report["summary"]["achieved_tflops"] = flops / 1e12
    report["meets_targets"] = {
        "crnn_vs_resnet50_step_time": report["summary"]["crnn_vs_resnet50_step_time"] <= TARGETS[
            "crnn_vs_resnet50_step_time"],
        "pipeline_speedup_vs_seed": report["summary"]["pipeline_speedup_vs_seed"] >= TARGETS[
            "pipeline_speedup_vs_seed"],
        "outlier_scoring_seconds": report["summary"]["outlier_scoring_seconds"] < TARGETS["outlier_scoring_seconds"],
        "streaming_rows_used_min": report["summary"]["streaming_rows_used_min"] >= TARGETS["streaming_rows_used_min"],
        "streaming_plan_seconds_max": report["summary"]["streaming_plan_seconds_max"] < TARGETS[
            "streaming_plan_seconds_max"],
    }
    return report
