"""Copies of one painting: exact (re-encoded, resized, other EXIF) and near (crop, colour shift) copies found
among distinct paintings, without comparing all pairs; groups that cross splits (leakage) or carry other labels
(conflicts); one and two processes give the same report."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from crnn_art.data.duplicates import (
    EMBEDDING_PHASH_BITS,
    candidate_pairs,
    cosine_pairs,
    find_groups,
    hamming,
    image_key,
)
from tests.conftest import run_cli
from tests.standins.odd_images import painting


def _reencoded(image: Image.Image, quality: int = 70, scale: float = 0.8, exif: bool = True) -> Image.Image:
    image = image.resize((int(image.width * scale), int(image.height * scale)))
    buffer = io.BytesIO()
    extra = {"exif": Image.Exif()} if exif else {}
    if exif:
        extra["exif"][0x010E] = "a copy with other metadata"
    image.save(buffer, "JPEG", quality=quality, **extra)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _cropped(image: Image.Image, share: float = 0.05) -> Image.Image:
    w, h = image.size
    return image.crop((int(w * share), int(h * share), w - int(w * share), h - int(h * share))).resize((w, h))


def _shifted(image: Image.Image) -> Image.Image:
    return ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.1)).enhance(0.8)


def _planted(n: int = 120):
    """``n`` distinct paintings, then 12 exact, 8 cropped and 8 colour-shifted copies of some of them."""
    images = [painting(96, seed=i).convert("RGB") for i in range(n)]
    truth = []
    for k, (make, kind) in enumerate([(_reencoded, "exact")] * 12 + [(_cropped, "near")] * 8 +
                                     [(_shifted, "near")] * 8):
        images.append(make(images[3 * k]))
        truth.append((3 * k, len(images) - 1, kind))
    return images, truth


def test_planted_copies_are_found_with_few_false_ones():
    """Re-encoded copies and colour shifts: all found at the default bits, none of the 120 distinct paintings
    paired. A 5 % crop moves the perceptual hash of these simple pictures by 10-18 bits: the default finds none,
    14 bits finds some, still without false pairs (the trade-off docs/duplicates.md shows)."""
    images, truth = _planted()
    keys = [image_key(im) for im in images]
    hashes = (np.array([k[0] for k in keys], dtype=np.uint64), np.array([k[1] for k in keys], dtype=np.uint64),
              np.stack([k[2] for k in keys]))
    kinds = ["exact"] * 12 + ["crop"] * 8 + ["colour"] * 8
    for bits, expected in ((8, {"exact": 12, "crop": 0, "colour": 8}), (14, {"exact": 12, "crop": 5, "colour": 8})):
        groups = find_groups(*hashes, near_bits=bits)
        found = {(a, b): g.kind for g in groups for a in g.members for b in g.members if a < b}
        got = {kind: sum((a, b) in found for (a, b, _), k in zip(truth, kinds, strict=True) if k == kind)
               for kind in ("exact", "crop", "colour")}
        false = [pair for pair in found if pair not in {(a, b) for a, b, _ in truth}]
        print(f"near_bits={bits}: found {got} of 12 exact, 8 crops, 8 colour shifts; false pairs {len(false)}")
        assert got == expected and not false
        assert all(found[(a, b)] == "exact" for (a, b, _), k in zip(truth, kinds, strict=True) if k == "exact")


def test_candidate_pairs_are_exactly_the_pairs_within_the_bits():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2 ** 63, 400, dtype=np.int64).astype(np.uint64)
    hashes[200:] = hashes[:200] ^ (np.uint64(1) << rng.integers(0, 64, 200).astype(np.uint64))  # one bit off
    hashes[:60] &= np.uint64(0xFF)  # near-blank images: one large bucket, compared in blocks when over the limit
    i, j = np.triu_indices(len(hashes), k=1)
    for bits in (2, 8):
        close = hamming(hashes[i], hashes[j]) <= bits
        truth = set(zip(i[close].tolist(), j[close].tolist(), strict=True))
        for limit in (1 << 22, 100, 1):
            assert {tuple(p) for p in candidate_pairs(hashes, bits, limit).tolist()} == truth


def test_cosine_pairs_are_exactly_the_pairs_at_or_above_the_threshold_in_any_blocks():
    """Cosines of the centred embeddings, every pair at or above the threshold once, whatever the block size."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, 24)).astype(np.float32) + 3.0  # a shared direction, as pooled CNN features have
    z[250:] = z[:50] + rng.normal(scale=0.2, size=(50, 24)).astype(np.float32)  # 50 near copies
    centred = z - z.mean(axis=0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    i, j = np.triu_indices(len(z), k=1)
    sims = (unit[i] * unit[j]).sum(axis=1)
    for threshold in (0.9, 0.97):
        truth = {(a, b): c for a, b, c in zip(i.tolist(), j.tolist(), sims.tolist(), strict=True) if c >= threshold}
        assert len(truth) >= 40
        for block in (7, 64, 1024):
            pairs, cosines = cosine_pairs(z, threshold, block=block)
            found = dict(zip(map(tuple, pairs.tolist()), cosines.tolist(), strict=True))
            assert found.keys() == truth.keys()
            assert all(abs(found[k] - truth[k]) < 1e-5 for k in truth)
    from crnn_art.errors import DataError

    with pytest.raises(DataError, match="--cosine 0.1 joins more than 100 pairs: .* raise it"):
        cosine_pairs(z, 0.1, max_pairs=100)  # a threshold that joins half of all pairs stops at once


def test_embedding_pairs_join_the_crops_a_perceptual_hash_misses_when_the_hash_confirms_loosely():
    """Close embeddings propose, the perceptual hash confirms within EMBEDDING_PHASH_BITS: the crops that 8 bits
    do not join become near copies (their cosine recorded); a proposed pair of two different paintings is not
    joined; pairs the hashes already join keep their kind."""
    images, truth = _planted()
    kinds = ["exact"] * 12 + ["crop"] * 8 + ["colour"] * 8
    keys = [image_key(im) for im in images]
    hashes = (np.array([k[0] for k in keys], dtype=np.uint64), np.array([k[1] for k in keys], dtype=np.uint64),
              np.stack([k[2] for k in keys]))
    crops = [(a, b) for (a, b, _), k in zip(truth, kinds, strict=True) if k == "crop"]
    exact = [(a, b) for (a, b, _), k in zip(truth, kinds, strict=True) if k == "exact"]
    distinct = [(1, 2), (4, 5)]
    proposed = crops + exact[:2] + distinct
    similar = (np.array(proposed, dtype=np.int64), np.full(len(proposed), 0.97, dtype=np.float32))
    groups = find_groups(*hashes, near_bits=8, similar=similar)
    matches = {(a, b): (kind, cos) for g in groups for a, b, _, kind, cos in g.pairs}
    bits = {pair: int(hamming(hashes[0][pair[0]:pair[0] + 1], hashes[0][pair[1]:pair[1] + 1])[0]) for pair in proposed}
    confirmed = [pair for pair in crops if bits[pair] <= EMBEDDING_PHASH_BITS]
    assert len(confirmed) >= 5 and all(matches[pair] == ("near", pytest.approx(0.97)) for pair in confirmed)
    assert not any(pair in matches for pair in crops if pair not in confirmed)
    assert all(bits[pair] > EMBEDDING_PHASH_BITS and pair not in matches for pair in distinct)
    assert all(matches[pair][0] == "exact" for pair in exact)


@pytest.fixture(scope="module")
def folder_with_copies(tmp_path_factory):
    """An image folder (one folder per style) with a copy filed under another style and a re-encoded copy."""
    root = tmp_path_factory.mktemp("dups") / "paintings"
    styles = ["Impressionism", "Cubism", "Baroque"]
    for i in range(60):
        (root / styles[i % 3]).mkdir(parents=True, exist_ok=True)
        painting(64, seed=1000 + i).save(root / styles[i % 3] / f"artist-{i}_work.jpg")
    _reencoded(Image.open(root / "Cubism" / "artist-1_work.jpg")).save(root / "Baroque" / "copy-of-1.jpg")
    _reencoded(Image.open(root / "Baroque" / "artist-2_work.jpg"), exif=False).save(root / "Baroque" / "copy-2.jpg")
    return root


def test_duplicates_of_a_folder_flag_conflicts_and_leakage_the_same_on_one_and_two_processes(folder_with_copies,
                                                                                             tmp_path):
    common = ["duplicates", "--source", str(folder_with_copies)]
    run_cli([*common, "--output-dir", str(tmp_path / "one")])
    run_cli([*common, "--output-dir", str(tmp_path / "two")], processes=2)
    one = json.loads((tmp_path / "one" / "duplicates.json").read_text())
    two = json.loads((tmp_path / "two" / "duplicates.json").read_text())
    assert one == two
    by_path = {tuple(sorted(p.rsplit("/", 1)[-1] for p in g["paths"])): g for g in one["groups"]}
    conflict = by_path[("artist-1_work.jpg", "copy-of-1.jpg")]
    assert conflict["kind"] == "exact" and conflict["conflicts"] == ["style"]
    assert sorted(conflict["labels"]["style"]) == ["Baroque", "Cubism"]
    same = by_path[("artist-2_work.jpg", "copy-2.jpg")]
    assert same["kind"] == "exact" and same["conflicts"] == []
    assert same["leakage"] == (len(set(same["splits"])) > 1)
    assert one["summary"]["groups"] == len(one["groups"]) >= 2
    page = (tmp_path / "one" / "duplicates.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 4 and "conflict" in page
    assert (tmp_path / "one" / "duplicates.csv").read_text().count("\n") == 1 + sum(len(g["rows"]) for g in
                                                                                  one["groups"])


def _artists_dataset():
    from datasets import ClassLabel, Dataset, Features

    names = ["Unknown Artist", *[f"artist-{i}" for i in range(30)]]
    rng = np.random.default_rng(0)
    values = rng.integers(0, len(names), 600).tolist()
    return Dataset.from_dict({"artist": values}, features=Features({"artist": ClassLabel(names=names)})), values


def _split_of(splits: dict[str, np.ndarray]) -> dict[int, str]:
    return {int(r): name for name, rows in splits.items() for r in rows.tolist()}


def test_artist_splits_keep_each_artist_in_one_split_and_unknown_artists_by_row():
    from crnn_art.config import resolve_config
    from crnn_art.data.sources import make_splits, split_keys

    dataset, values = _artists_dataset()
    by_row = _split_of(make_splits(len(dataset), resolve_config(None, None, []).data))
    cfg = resolve_config(None, None, ["data.split_by=artist"]).data
    by_artist = _split_of(make_splits(len(dataset), cfg, keys=split_keys(dataset, cfg)))
    for artist in set(values) - {0}:
        assert len({by_artist[r] for r, v in enumerate(values) if v == artist}) == 1
    assert all(by_artist[r] == by_row[r] for r, v in enumerate(values) if v == 0)  # unknown: the row's split
    assert {by_artist[r] for r in range(len(values))} == {"train", "validation", "test"}


def test_duplicate_group_splits_keep_copies_together_and_leave_other_rows_where_they_were(tmp_path):
    from crnn_art.config import resolve_config
    from crnn_art.data.sources import make_splits, split_keys
    from crnn_art.errors import ConfigError, DataError

    dataset, _ = _artists_dataset()
    groups = [{"rows": [5, 300, 599]}, {"rows": [10, 11]}, {"rows": [42, 77, 123, 400]}]
    (tmp_path / "duplicates.json").write_text(json.dumps({"groups": groups}))
    by_row = _split_of(make_splits(len(dataset), resolve_config(None, None, []).data))
    grouped = ["data.split_by=duplicate_group", f"data.duplicates={tmp_path / 'duplicates.json'}"]
    cfg = resolve_config(None, None, grouped).data
    by_group = _split_of(make_splits(len(dataset), cfg, keys=split_keys(dataset, cfg)))
    assert all(len({by_group[r] for r in g["rows"]}) == 1 for g in groups)  # no group crosses splits
    in_groups = {r for g in groups for r in g["rows"]}
    assert all(by_group[r] == by_row[r] for r in range(len(dataset)) if r not in in_groups)
    with pytest.raises(ConfigError, match="data.duplicates"):
        resolve_config(None, None, ["data.split_by=duplicate_group"])
    (tmp_path / "other.json").write_text(json.dumps({"groups": [{"rows": [5, 10_000]}]}))
    other = resolve_config(None, None, ["data.split_by=duplicate_group", f"data.duplicates={tmp_path / 'other.json'}"])
    with pytest.raises(DataError, match="written for another source"):
        split_keys(dataset, other.data)


def test_evaluate_counts_test_copies_in_train_and_outliers_rank_conflicting_copies_first(tmp_path):
    """After `duplicates --checkpoint RUN`: `evaluate` reports how many test paintings have a copy in train and the
    metrics without them (before it, it says the check was not made), and the model card says it too. A copy
    filed under another style is certain evidence: `outliers` flags every such painting `duplicate_conflict` and
    ranks it first, whatever the (weak, 1-epoch) model thinks."""
    root = tmp_path / "paintings"
    styles = ["Impressionism", "Cubism", "Baroque"]
    for i in range(90):
        (root / styles[i % 3]).mkdir(parents=True, exist_ok=True)
        painting(48, seed=2000 + i).save(root / styles[i % 3] / f"artist-{i}_work.jpg")
    for i in range(0, 24, 3):  # 8 paintings of Impressionism also filed under Cubism
        _reencoded(Image.open(root / "Impressionism" / f"artist-{i}_work.jpg")).save(root / "Cubism" / f"copy-{i}.jpg")
    run = tmp_path / "run"
    run_cli(["train", "--output-dir", str(run), f"--set=data.source={root}", "--set=data.image_size=32",
             "--set=data.num_workers=0", "--set=model.backbone_weights=null", "--set=train.epochs=1",
             "--set=train.batch_size=8", "--set=train.eval_batch_size=16", "--set=augment.mixup_prob=0",
             "--set=augment.cutmix_prob=0"])
    unchecked = run_cli(["evaluate", "--checkpoint", str(run), "--split", "test"]).stdout
    assert "not checked (run `crnn-art duplicates --checkpoint" in " ".join(unchecked.split())
    assert "copies_in_train" not in json.loads((run / "eval_test_best" / "metrics.json").read_text())
    run_cli(["duplicates", "--checkpoint", str(run)])
    groups = json.loads((run / "duplicates" / "duplicates.json").read_text())["groups"]
    conflicting = {r for g in groups if g["conflicts"] == ["style"] for r in g["rows"]}
    assert len([g for g in groups if g["conflicts"]]) == 8

    # evaluate now counts the test rows whose copy is in train, and gives the metrics without them
    split = {name: set(rows) for name, rows in json.loads((run / "split.json").read_text()).items()
             if name in ("train", "val", "test")}
    leaked = {r for g in groups for r in g["rows"] if r in split["test"] and split["train"] & set(g["rows"])}
    assert leaked, "the planted copies should put some test paintings' copies in train (fixed seeds)"
    run_cli(["evaluate", "--checkpoint", str(run), "--split", "test"])
    metrics = json.loads((run / "eval_test_best" / "metrics.json").read_text())
    copies = metrics["copies_in_train"]
    assert (copies["rows"], copies["of"]) == (len(leaked), len(split["test"]))
    assert copies["metrics_without_them"]["num_samples"] == metrics["num_samples"] - len(leaked)
    verb = "has" if len(leaked) == 1 else "have"
    card = " ".join((run / "best" / "README.md").read_text().split())
    assert f"{len(leaked)} of these {len(split['test'])} test paintings {verb} a copy in the training split" in card
    # a damaged duplicates file is one line before any work, and the evaluation already written stays
    saved = (run / "duplicates" / "duplicates.json").read_text()
    (run / "duplicates" / "duplicates.json").write_text("{not json")
    damaged = run_cli(["evaluate", "--checkpoint", str(run), "--split", "test"], check=False)
    assert damaged.returncode == 2 and len(damaged.stderr.strip().splitlines()) == 1, damaged.stderr
    assert "is not a duplicates.json" in damaged.stderr and "evaluating" not in damaged.stdout
    assert json.loads((run / "eval_test_best" / "metrics.json").read_text()) == metrics
    (run / "duplicates" / "duplicates.json").write_text(saved)
    run_cli(["outliers", "--checkpoint", str(run), "--split", "train", "--top", "40"])
    ranked = json.loads((run / "outliers_train" / "outliers.json").read_text())["outliers"]
    flagged = [r["row"] for r in ranked if "duplicate_conflict" in r["flagged_by"]]
    in_train = conflicting & {r["row"] for r in ranked} | conflicting & set(
        np.asarray(json.loads((run / "split.json").read_text())["train"]).tolist())
    assert in_train and set(flagged) == in_train  # every conflicting painting of the split, and only those
    assert [r["row"] for r in ranked[:len(flagged)]] == flagged  # ranked first

    # with the run's model, embeddings join near copies too; one and two processes agree
    common = ["duplicates", "--checkpoint", str(run), "--cosine", "0.1"]  # a 1-epoch model: copies reach ~0.2
    run_cli([*common, "--output-dir", str(tmp_path / "cos1")])
    run_cli([*common, "--output-dir", str(tmp_path / "cos2")], processes=2)
    one, two = (json.loads((tmp_path / d / "duplicates.json").read_text()) for d in ("cos1", "cos2"))
    assert one["summary"]["cosine"] == 0.1
    assert [(g["rows"], g["kind"]) for g in one["groups"]] == [(g["rows"], g["kind"]) for g in two["groups"]]
    by_embedding = [m for g in one["groups"] for m in g["matches"] if "cosine" in m]
    assert by_embedding and all(m["cosine"] >= 0.1 for m in by_embedding)
    joined = [set(g["rows"]) for g in one["groups"]]
    assert all(any(set(g["rows"]) <= j for j in joined) for g in groups)  # the hashes' groups are still there


def test_duplicates_refuses_a_bad_cosine_in_one_line(folder_with_copies):
    from crnn_art.errors import DataError
    from crnn_art.evaluation.duplicates import find_duplicates

    with pytest.raises(DataError, match="--cosine compares a trained model's embeddings: give --checkpoint"):
        find_duplicates(source=str(folder_with_copies), cosine=0.95)
    with pytest.raises(DataError, match=r"--cosine 1.5 is not allowed; give a cosine in \(0, 1\]"):
        find_duplicates(source=str(folder_with_copies), cosine=1.5)


def _browser(downloads):
    """Headless Chromium (Debian's, installed by launch/test) driven by Selenium, downloading into ``downloads``."""
    import shutil

    from selenium import webdriver

    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    assert binary and driver, "the review-page test needs Chromium and chromedriver: apt-get install chromium " \
                              "chromium-driver (launch/test does it where it can)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(service=webdriver.ChromeService(driver), options=options)


def test_the_review_page_writes_the_decisions_that_the_next_run_reads(folder_with_copies, tmp_path):
    """In a real (headless) browser, offline: open duplicates.html, relabel one copy of the conflicting pair, drop
    one, keep one; reload (the decisions stay); export decisions.csv; it is what data.label_overrides reads. A page
    written again with other content starts empty, and the same content brings the decisions back."""
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from crnn_art.config import resolve_config
    from crnn_art.data.sources import open_source, task_labels

    command = ["duplicates", "--source", str(folder_with_copies), "--output-dir", str(tmp_path / "dups")]
    run_cli(command)
    groups = json.loads((tmp_path / "dups" / "duplicates.json").read_text())["groups"]
    conflict = next(g for g in groups if g["conflicts"])
    other = next(g for g in groups if not g["conflicts"])
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = _browser(downloads)
    try:
        browser.get((tmp_path / "dups" / "duplicates.html").as_uri())

        def controls(row: int):
            return browser.find_element(By.CSS_SELECTOR, f".review[data-row='{row}'][data-head='style']")

        first = controls(conflict["rows"][0])
        target = conflict["labels"]["style"][1]  # relabel the first copy as the second copy's style
        Select(first.find_element(By.TAG_NAME, "select")).select_by_visible_text(target)
        first.find_element(By.CSS_SELECTOR, "button.relabel").click()
        controls(conflict["rows"][1]).find_element(By.CSS_SELECTOR, "button.keep").click()
        controls(other["rows"][1]).find_element(By.CSS_SELECTOR, "button.drop").click()
        # copies with one label: nothing to suggest, so "relabel as" waits for a class to be chosen
        unsure = controls(other["rows"][0])
        assert Select(unsure.find_element(By.TAG_NAME, "select")).first_selected_option.text == "choose a class"
        unsure.find_element(By.CSS_SELECTOR, "button.relabel").click()
        browser.refresh()  # kept in the browser while reviewing
        assert browser.find_element(By.ID, "reviewcount").text == "3"
        assert controls(other["rows"][1]).get_attribute("data-decision") == "drop"
        browser.find_element(By.ID, "export").click()
        for _ in range(100):
            if (downloads / "decisions.csv").is_file():
                break
            time.sleep(0.1)
        # the page written again with other copies starts empty; written again as it was, the decisions are back
        run_cli([*command, "--near-bits", "32"])
        browser.refresh()
        assert browser.find_element(By.ID, "reviewcount").text == "0"
        run_cli(command)
        browser.refresh()
        assert browser.find_element(By.ID, "reviewcount").text == "3"
    finally:
        browser.quit()
    exported = (downloads / "decisions.csv").read_text().splitlines()
    path_of = {r: p for g in groups for r, p in zip(g["rows"], g["paths"], strict=True)}
    expected = sorted([(conflict["rows"][0], "relabel", target), (conflict["rows"][1], "keep", ""),
                       (other["rows"][1], "drop", "")])
    lines = [f"{r},{path_of[r]},style,{d},{n}" for r, d, n in expected]
    assert exported == ["row,path,head,decision,new_label", *lines]
    (tmp_path / "decisions.csv").write_text("\n".join(exported) + "\n")
    cfg = resolve_config(None, None, [f"data.source={folder_with_copies}",
                                      f"data.label_overrides={tmp_path / 'decisions.csv'}"])
    labels = task_labels(open_source(cfg.data).dataset, cfg.heads, cfg.data)
    assert labels.class_names["style"][labels.labels[conflict["rows"][0], 0]] == target
    assert labels.labels[other["rows"][1], 0] == -1


def test_a_crowded_set_of_hashes_is_grouped_in_bounded_memory_and_every_planted_copy_found():
    """`bench --duplicates` at a small size: near-blank images crowd one average-hash bucket (compared in blocks),
    and every planted copy (up to 6 bits off) still joins its original."""
    from crnn_art.bench import bench_duplicates

    figures = bench_duplicates(n=4000, embedded=300, dim=32)
    assert figures["planted_copies"] == 80 and figures["planted_found"] == 80
    assert figures["groups"] >= 80 and figures["cosine_seconds_at_images"] > 0
