"""The published few-shot draw: the authors' pickle imported (read without running anything in
it) and used as data.fewshot_file, and the published sampler (data.fewshot_sampler=published)
against a transcription of the published code's function."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import random
import sys
import types
from collections import defaultdict, namedtuple
from contextlib import contextmanager
from pathlib import Path

import pytest

from savlt.cli import main
from savlt.config import ConfigError, load_config
from savlt.data.discover import DataError, scan_dataset
from savlt.data.prepare import resolve_few_shot
from savlt.data.published import read_published_pickle
from savlt.data.splits import Split, load_few_shot, ratio_split, sample_published
from savlt.engine.inputs import prepare_inputs
from savlt.engine.runfolder import run_identity
from tests.conftest import fast_config, tree_digest, write_png

AUTHORS = "/home/authors/DATA/mixed-center_OCT_images"  # where the published code kept the data
DASSL = "dassl.data.datasets.base_dataset"


def _datum_class() -> type:
    """A stand-in for Dassl's Datum that pickles as dassl.data.datasets.base_dataset.Datum."""

    def init(self, impath: str = "", label: int = 0, domain: int = -1, classname: str = "") -> None:
        self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    cls = type("Datum", (), {"__init__": init})
    cls.__module__ = DASSL
    return cls


DATUM = _datum_class()


@contextmanager
def dassl_installed():
    """The fake Dassl modules in sys.modules while pickling (pickle looks the class up there)."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", DASSL]
    modules = {name: types.ModuleType(name) for name in names}
    modules[DASSL].Datum = DATUM
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module


def write_pickle(path: Path, data: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    with dassl_installed():
        path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


def entry(rel: str, folders: list[str]):
    """The published record of a scan (its path on the authors' machine, label by folder order)."""
    folder = rel.split("/")[1]
    return DATUM(impath=f"{AUTHORS}/{rel}", label=folders.index(folder), classname=folder)


@pytest.fixture(scope="module")
def mixed(synth_root: Path):
    return scan_dataset(synth_root, load_config().class_map(), ["mixed"]).center("mixed")


@pytest.fixture(scope="module")
def draw(mixed) -> dict[str, list[str]]:
    """A 2-shot draw from the default split's train and val parts, a class repeating a shot."""
    split = ratio_split(mixed, [0.45, 0.15, 0.40], 0, by_patient=True)
    by_class: dict[str, dict[str, list[str]]] = {"train": defaultdict(list), "val": defaultdict(list)}
    for part in by_class:
        for rel in split.part(part):
            by_class[part][rel.split("/")[1]].append(rel)
    train = [rel for rels in by_class["train"].values() for rel in rels[:2]]
    train[1] = train[0]  # published random.choices repeats a short class's scans
    val = [rel for rels in by_class["val"].values() for rel in (rels * 2)[:2]]
    return {"train": train, "val": val}


def published_pickle(folder: Path, draw: dict[str, list[str]], name: str = "shot_2-seed_42.pkl") -> Path:
    folders = sorted({rel.split("/")[1] for rel in draw["train"]})
    data = {part: [entry(rel, folders) for rel in rels] for part, rels in draw.items()}
    return write_pickle(folder / name, data)


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("savlt: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def import_args(pkl: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return ["fewshot", "import", str(pkl), "--data", str(root), "--out", str(out), *extra]


# ---------------------------------------------------------------- the import


def test_the_published_pickle_becomes_a_few_shot_file(
    synth_root: Path, mixed, draw, tmp_path: Path, capsys
) -> None:
    pkl = published_pickle(tmp_path, draw)
    out = tmp_path / "fewshot.json"
    assert main(import_args(pkl, synth_root, out)) == 0
    assert f"--set data.fewshot_file={out}" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert (written["train"], written["val"]) == (draw["train"], draw["val"])  # order and repeats kept
    assert (written["shots"], written["seed"], written["protocol"]) == (2, 42, "standard")
    assert str(pkl) in written["source"] and "sha256" in written["source"]
    few = load_few_shot(out, mixed)
    assert few.train == draw["train"] and few.source == written["source"]
    assert main(import_args(pkl, synth_root, out, "--seed", "7")) == 0  # its own file is replaced
    assert json.loads(out.read_text())["seed"] == 7


def test_a_path_is_matched_below_the_class_folder_and_classes_through_aliases(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    for folder in ("HSIL", "cyst"):  # HSIL: a built-in alias of the high-grade class
        for i in range(4):
            write_png(root / "mixed" / "images" / folder / f"{folder}_{i}.png")

    def records(numbers: tuple[int, ...]) -> list:  # the authors' layout: no images/ level
        folders = enumerate(("HSIL", "cyst"))
        return [
            DATUM(impath=f"/x/{f}/{f}_{i}.png", label=n, classname=f) for n, f in folders for i in numbers
        ]

    pkl = write_pickle(tmp_path / "draw.pkl", {"train": records((0, 1)), "val": records((2, 3))})
    out = tmp_path / "fewshot.json"
    assert "its seed is unknown: give it with --seed" in refused(import_args(pkl, root, out), capsys)
    assert main(import_args(pkl, root, out, "--seed", "5")) == 0
    assert json.loads(out.read_text())["train"][:2] == ["images/HSIL/HSIL_0.png", "images/HSIL/HSIL_1.png"]


def test_a_malicious_pickle_runs_nothing(synth_root: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"

    class Opens:  # unpickling would call open(marker, "w"), creating the file
        def __reduce__(self):
            return (builtins.open, (str(marker), "w"))

    class Shell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hidden = DATUM(impath=f"{AUTHORS}/images/cyst/a.png", classname="cyst")
    hidden._classname = Opens()  # inside a Datum's state
    out = tmp_path / "fewshot.json"
    opens = f"{builtins.open.__module__}.open"  # io.open
    for name, data, protocol, refused_global in (
        ("open.pkl", {"train": [Opens()], "val": []}, pickle.HIGHEST_PROTOCOL, opens),
        ("system.pkl", Shell(), pickle.HIGHEST_PROTOCOL, f"{os.system.__module__}.system"),
        ("state.pkl", {"train": [hidden], "val": []}, pickle.HIGHEST_PROTOCOL, opens),
        # protocol 0 writes copyreg._reconstructor under its Python 2 name
        ("copyreg.pkl", {"train": [DATUM()], "val": []}, 0, "copy_reg._reconstructor"),
    ):
        pkl = write_pickle(tmp_path / name, data, protocol)
        err = refused(import_args(pkl, synth_root, out), capsys)
        assert f"published few-shot pickle {pkl} refers to {refused_global}, not Dassl's Datum record" in err
        assert "nothing in it was run" in err
        assert not marker.exists() and not out.exists()
        with pytest.raises(DataError, match="not Dassl's Datum record"):
            read_published_pickle(pkl)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda good: good[: len(good) // 2], "is truncated or not a pickle"),
        (lambda good: b"", "is truncated or not a pickle"),
        (lambda good: b'{"train": [], "val": []}', "is truncated or not a pickle"),
        (lambda good: bytes(range(256)), "is truncated or not a pickle"),
        (lambda good: pickle.dumps([1, 2]), "is not a few-shot pickle"),
        (lambda good: pickle.dumps({"train": "a.png", "val": []}), "is not a few-shot pickle"),
        (lambda good: pickle.dumps({"train": ["a.png"], "val": []}), "train[0] is a str, not a Datum record"),
    ],
)
def test_corrupt_or_foreign_files_are_one_line_errors(
    content, message: str, synth_root: Path, draw, tmp_path: Path, capsys
) -> None:
    good = published_pickle(tmp_path, draw).read_bytes()
    bad = tmp_path / "shot_2-seed_42-bad.pkl"
    bad.write_bytes(content(good))
    err = refused(import_args(bad, synth_root, tmp_path / "fewshot.json"), capsys)
    assert f"published few-shot pickle {bad}" in err and message in err


def test_a_record_without_its_fields_is_named(synth_root: Path, tmp_path: Path, capsys) -> None:
    record = DATUM(impath=f"{AUTHORS}/images/cyst/a.png", classname="cyst")
    record._label = "0"  # not an integer
    pkl = write_pickle(tmp_path / "shot_1-seed_42.pkl", {"train": [record], "val": []})
    err = refused(import_args(pkl, synth_root, tmp_path / "fewshot.json"), capsys)
    assert "train[0] lacks an image path, an integer label or a class name" in err


def test_entries_that_name_no_scan_several_or_another_class_are_refused(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    for folder in ("cyst", "cancer"):
        for name in ("a.png", f"{folder}.png"):
            write_png(root / "mixed" / "images" / folder / name)
    out = tmp_path / "fewshot.json"

    def attempt(*records) -> str:
        pkl = write_pickle(tmp_path / "shot_1-seed_42.pkl", {"train": list(records), "val": []})
        return refused(import_args(pkl, root, out), capsys)

    err = attempt(DATUM(impath="/x/images/cyst/gone.png", classname="cyst"))
    assert "1 entry match no scan of center mixed" in err and "train[0] '/x/images/cyst/gone.png'" in err
    err = attempt(DATUM(impath="/x/elsewhere/a.png", classname="cyst"))  # a.png is in both classes
    assert "match several scans" in err and "images/cancer/a.png or images/cyst/a.png" in err
    err = attempt(DATUM(impath="/x/images/cyst/cyst.png", classname="cancer"))
    assert "is class 'cancer', but SAVLT files images/cyst/cyst.png under 'cyst'" in err
    err = attempt(
        DATUM(impath="/x/images/cyst/cyst.png", label=0, classname="cyst"),
        DATUM(impath="/x/images/cancer/cancer.png", label=0, classname="cancer"),
    )
    assert "train[1] '/x/images/cancer/cancer.png' has label 0 for 'cancer', which train[0]" in err
    assert not out.exists()


def test_the_output_file_is_never_one_savlt_did_not_write(
    synth_root: Path, draw, tmp_path: Path, capsys
) -> None:
    pkl = published_pickle(tmp_path, draw)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    err = refused(import_args(pkl, synth_root, notes), capsys)
    assert "is not a few-shot JSON SAVLT wrote" in err and notes.read_text() == '{"mine": 1}'
    assert "is not a few-shot JSON SAVLT wrote" in refused(import_args(pkl, synth_root, pkl), capsys)
    before = tree_digest(synth_root)
    err = refused(import_args(pkl, synth_root, synth_root / "fewshot.json"), capsys)
    assert "SAVLT never writes its outputs into a data set" in err and tree_digest(synth_root) == before


# ---------------------------------------------------------------- data.fewshot_file in a run


def test_a_run_uses_the_imported_file_checked_against_its_split(
    synth_root: Path, draw, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "fewshot.json"
    assert main(import_args(published_pickle(tmp_path, draw), synth_root, out)) == 0
    cfg = fast_config(synth_root, "train.shots=2", f"data.fewshot_file={out}")
    inputs = prepare_inputs(cfg)
    assert (inputs.few_shot.train, inputs.few_shot.val) == (draw["train"], draw["val"])
    with pytest.raises(DataError, match=r"holds a 2-shot draw but train\.shots is 4: run with --shots 2"):
        prepare_inputs(fast_config(synth_root, f"data.fewshot_file={out}"))
    with pytest.raises(DataError, match="was drawn for protocol standard but the run's protocol is coop"):
        prepare_inputs(fast_config(synth_root, "train.shots=2", "protocol=coop", f"data.fewshot_file={out}"))
    folder = draw["train"][0].split("/")[1]
    unseen = next(rel for rel in inputs.split.test if rel.split("/")[1] == folder)
    leaked = {**draw, "train": [unseen, *draw["train"][1:]]}
    assert main(import_args(published_pickle(tmp_path, leaked), synth_root, out)) == 0
    with pytest.raises(DataError, match=rf"{unseen} in 'train' is in the split's 'test' part"):
        prepare_inputs(cfg)


# ---------------------------------------------------------------- the published sampler


Item = namedtuple("Item", "impath label")


def published_generate_fewshot_dataset(data_source: list, num_shots: int) -> list:
    """Dassl's DatasetBase.generate_fewshot_dataset (one data source, repeat=True), transcribed."""
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for _, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        else:
            sampled_items = random.choices(items, k=num_shots)
        dataset.extend(sampled_items)
    return dataset


def published_draw(split: Split, labels: dict[str, int], shots: int, seed: int) -> tuple[list, list]:
    """What the published code draws: random.seed(args.seed) at start-up, then train and val."""
    state = random.getstate()
    try:
        random.seed(seed)
        items = {p: [Item(r, labels[r.split("/")[1]]) for r in split.part(p)] for p in ("train", "val")}
        train = published_generate_fewshot_dataset(items["train"], shots)
        val = published_generate_fewshot_dataset(items["val"], min(shots, 16))
    finally:
        random.setstate(state)
    return [i.impath for i in train], [i.impath for i in val]


def test_the_published_sampler_draws_what_the_published_code_draws(tmp_path: Path) -> None:
    root = tmp_path / "data"
    sizes = {"cyst": 9, "cancer": 3, "ectropion": 6}
    for folder, n in sizes.items():
        for i in range(n + 4):
            write_png(root / "mixed" / "images" / folder / f"{folder}_{i:02d}.png")
    center = scan_dataset(root, load_config().class_map(), ["mixed"]).center("mixed")
    rels = {f: sorted(r for r in center.by_rel() if f"/{f}/" in r) for f in sizes}
    shuffler = random.Random(3)  # the split's order is the published split file's: shuffled, interleaved
    train = [r for f, n in sizes.items() for r in rels[f][:n]]
    val = [r for f, n in sizes.items() for r in rels[f][n:]]
    shuffler.shuffle(train)
    shuffler.shuffle(val)
    split = Split("mixed", train, val, [], source="test")
    labels = {f: i for i, f in enumerate(sorted(sizes))}
    for shots, seed in ((4, 5), (8, 42), (2, 123)):
        few = sample_published(split, center, shots, seed)
        assert (few.train, few.val) == published_draw(split, labels, shots, seed), (shots, seed)
    assert len(set(sample_published(split, center, 8, 42).train)) < 24  # short classes repeat


def test_the_samplers_are_separate_settings_and_cache_files(synth_root: Path, mixed, tmp_path: Path) -> None:
    savlt, published = (
        fast_config(synth_root, f"data.fewshot_sampler={name}") for name in ("savlt", "published")
    )
    assert run_identity(savlt) != run_identity(published)
    with pytest.raises(ConfigError, match="data.fewshot_sampler=published draws K scans per class"):
        load_config(overrides=["data.fewshot_sampler=published", "protocol=realistic"])
    split = ratio_split(mixed, [0.45, 0.15, 0.40], 0)
    cache = tmp_path / "cache"
    cache.mkdir()
    first = {
        name: resolve_few_shot(split, mixed, 3, 5, cache, "image", sampler=name)
        for name in ("savlt", "published")
    }
    assert len(list(cache.glob("fewshot_*.json"))) == 2
    assert first["published"].train == sample_published(split, mixed, 3, 5).train
    for name, few in first.items():  # each read back from its own cache file
        assert resolve_few_shot(split, mixed, 3, 5, cache, "image", sampler=name).train == few.train
