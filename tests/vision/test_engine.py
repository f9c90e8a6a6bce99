"""Catalogue + index persistence: snapshots, change replay after a crash, the model-version guard,
corrupt files at start."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from services.vision import model
from services.vision.catalogue import Catalogue, CatalogueError, NewProduct
from services.vision.engine import Engine, EngineOptions
from services.vision.images import ImageLimits, prepare
from tests.vision import imagegen
from tests.vision.conftest import IMAGE_SIZE

LIMITS = ImageLimits()


@pytest.fixture(scope="module")
def pretrained(projector: model.DuplicateProjector, threshold: float) -> model.Embedder:
    spec = model.pretrained_spec(IMAGE_SIZE, threshold)
    return model.Embedder(spec, None, projector, version="20260101T000000000000Z")


@pytest.fixture(scope="module")
def finetuned(
    tiny_head: model.ProjectionHead, projector: model.DuplicateProjector, threshold: float
) -> model.Embedder:
    spec = model.ModelSpec("finetuned", IMAGE_SIZE, tiny_head.out_dim, threshold)
    return model.Embedder(spec, tiny_head, projector, version="20260202T000000000000Z")


@pytest.fixture(scope="module")
def items() -> list[tuple[str, str, str, bytes]]:
    return imagegen.catalogue(n_per=1)  # 20 products: 4 shapes x 5 colours


def add(catalogue: Catalogue, embedder: model.Embedder, items: list[tuple[str, str, str, bytes]]) -> None:
    prepared = [prepare(png, embedder.image_size, LIMITS) for *_, png in items]
    vectors, duplicates = embedder.embed_with_duplicates(np.stack([p.pixels for p in prepared]))
    catalogue.upsert(
        [
            NewProduct(pid, cat, market, p.sha256, png, v, d)
            for (pid, cat, market, png), p, v, d in zip(items, prepared, vectors, duplicates, strict=True)
        ],
        embedder.version,
    )


def query(engine: Engine, png: bytes, k: int = 3, **filters: str) -> list[str]:
    p = prepare(png, engine.embedder.image_size, LIMITS)
    vectors, duplicates = engine.embedder.embed_with_duplicates(p.pixels[None])
    return [
        m.product_id
        for m in engine.search(vectors[0], k, sha256=p.sha256, duplicate=duplicates[0], **filters)
    ]


def options(tmp_path: Path, **overrides: object) -> EngineOptions:
    return EngineOptions(index_dir=tmp_path / "index", **overrides)  # type: ignore[arg-type]


def test_snapshot_is_loaded_not_rebuilt(tmp_path: Path, pretrained: model.Embedder, items: list) -> None:
    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items)
    first = Engine.open(pretrained, catalogue, options(tmp_path))
    assert "no index snapshot" in first.rebuild_reason
    assert first.stats()["size"] == 20
    again = Engine.open(pretrained, catalogue, options(tmp_path))
    assert again.rebuild_reason == ""
    assert again.stats()["size"] == 20
    for pid, *_, png in items[:5]:
        assert query(again, png, 1) == [pid]


def test_changes_after_the_snapshot_are_replayed(
    tmp_path: Path, pretrained: model.Embedder, items: list
) -> None:
    """A process killed after committing products but before its next snapshot loses nothing."""
    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items[:10])
    Engine.open(pretrained, catalogue, options(tmp_path, snapshot_every=10_000))
    add(catalogue, pretrained, items[10:])  # committed, never snapshotted
    removed, missing = catalogue.remove([items[0][0], "never-there"])
    assert removed == [items[0][0]] and missing == ["never-there"]
    catalogue.close()
    catalogue = Catalogue(tmp_path / "c.sqlite")
    engine = Engine.open(pretrained, catalogue, options(tmp_path))
    assert engine.rebuild_reason == ""
    assert engine.stats()["size"] == 19
    assert query(engine, items[15][3], 1) == [items[15][0]]
    assert items[0][0] not in query(engine, items[0][3], 19)


def test_another_model_version_rebuilds_never_mixes(
    tmp_path: Path, pretrained: model.Embedder, finetuned: model.Embedder, items: list
) -> None:
    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items)
    old = Engine.open(pretrained, catalogue, options(tmp_path))
    assert old.stats()["dimension"] == pretrained.dim
    new = Engine.open(finetuned, catalogue, options(tmp_path))
    assert "no index snapshot for model version" in new.rebuild_reason
    stats = new.stats()
    assert stats["model_version"] == finetuned.version
    assert stats["dimension"] == finetuned.dim == 16
    assert stats["size"] == 20
    # Every vector in the new index is the new model's embedding of the stored image.
    stored = catalogue.embeddings(finetuned.version, [p.row_id for p in catalogue.products()], finetuned.dim)
    assert len(stored) == 20
    for product in catalogue.products()[:5]:
        png = next(png for pid, *_, png in items if pid == product.product_id)
        fresh = finetuned.embed(prepare(png, IMAGE_SIZE, LIMITS).pixels[None])[0]
        assert np.allclose(stored[product.row_id], fresh, atol=1e-4)
    # A product indexed through the old engine (e.g. during a model swap) is re-embedded by the new one
    # when it follows the change log (searches never read the store; the change feed drives sync).
    add(
        catalogue,
        pretrained,
        [("late", "circle", "DE", imagegen.encode(imagegen.draw("circle", "blue", 99)))],
    )
    embedded = new.embedded
    assert new.sync() == 1
    assert new.embedded == embedded + 1
    assert "late" in query(new, imagegen.encode(imagegen.draw("circle", "blue", 99)), 1)
    assert new.stats()["size"] == 21
    # The first model's snapshot still opens for that model, untouched by the second.
    back = Engine.open(pretrained, catalogue, options(tmp_path))
    assert back.rebuild_reason == "" and back.stats()["dimension"] == pretrained.dim
    assert back.stats()["size"] == 21


@pytest.mark.parametrize("damage", ["flip", "truncate", "metadata"])
def test_corrupt_snapshot_at_start_rebuilds(
    tmp_path: Path, pretrained: model.Embedder, items: list, damage: str
) -> None:
    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items)
    Engine.open(pretrained, catalogue, options(tmp_path))
    data_path = tmp_path / "index" / f"index-{pretrained.version}.faiss"
    meta_path = tmp_path / "index" / f"index-{pretrained.version}.json"
    payload = bytearray(data_path.read_bytes())
    if damage == "flip":
        payload[-50] ^= 0x55
        data_path.write_bytes(bytes(payload))
    elif damage == "truncate":
        data_path.write_bytes(bytes(payload[:64]))
    else:
        meta_path.write_text("[]")
    engine = Engine.open(pretrained, catalogue, options(tmp_path))
    assert engine.rebuild_reason
    assert engine.stats()["size"] == 20
    for pid, *_, png in items[:4]:
        assert query(engine, png, 1) == [pid]


def test_snapshot_disagreeing_with_catalogue_rebuilds(
    tmp_path: Path, pretrained: model.Embedder, items: list
) -> None:
    """A valid snapshot from another catalogue (restored from a backup, say) is not trusted."""
    first = Catalogue(tmp_path / "c.sqlite")
    add(first, pretrained, items[:5])
    Engine.open(pretrained, first, options(tmp_path))
    first.close()
    (tmp_path / "c.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(tmp_path / "c.sqlite") + suffix).unlink(missing_ok=True)
    second = Catalogue(tmp_path / "c.sqlite")
    add(second, pretrained, items[10:20])
    engine = Engine.open(pretrained, second, options(tmp_path))
    assert "another catalogue" in engine.rebuild_reason
    assert engine.stats()["size"] == 10
    assert query(engine, items[12][3], 1) == [items[12][0]]


def test_catalogue_restored_from_a_backup_and_written_to_rebuilds(
    tmp_path: Path, pretrained: model.Embedder, items: list
) -> None:
    """Same catalogue, but its history after the backup differs from the one the snapshot saw."""
    import shutil

    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items[:5])
    catalogue.close()
    shutil.copy(tmp_path / "c.sqlite", tmp_path / "backup.sqlite")
    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items[5:10])
    Engine.open(pretrained, catalogue, options(tmp_path))  # snapshot at change 10
    catalogue.close()
    shutil.copy(tmp_path / "backup.sqlite", tmp_path / "c.sqlite")
    for suffix in ("-wal", "-shm"):
        Path(str(tmp_path / "c.sqlite") + suffix).unlink(missing_ok=True)
    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items[10:15])  # changes 6..10 again, other products
    engine = Engine.open(pretrained, catalogue, options(tmp_path))
    assert "history differs" in engine.rebuild_reason
    assert query(engine, items[12][3], 1) == [items[12][0]]
    assert engine.stats()["size"] == 10


def test_corrupt_catalogue_refuses(tmp_path: Path, pretrained: model.Embedder) -> None:
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CatalogueError):
        Engine.open(pretrained, Catalogue(path), options(tmp_path))


def test_filters_and_exact_duplicates(tmp_path: Path, pretrained: model.Embedder, items: list) -> None:
    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items)
    engine = Engine.open(pretrained, catalogue, options(tmp_path))
    png = items[0][3]
    p = prepare(png, IMAGE_SIZE, LIMITS)
    vector = pretrained.embed(p.pixels[None])[0]
    only_squares = engine.search(vector, 20, category="square")
    assert only_squares and {m.category for m in only_squares} == {"square"}
    both = engine.search(vector, 20, category="square", market="FR")
    assert both and all(m.category == "square" and m.market == "FR" for m in both)
    assert engine.search(vector, 5, category="no-such-category") == []
    top = engine.search(vector, 3, sha256=p.sha256)
    assert top[0].product_id == items[0][0] and top[0].near_duplicate  # the same bytes


def test_near_duplicates_are_flagged_by_descriptor(
    tmp_path: Path, pretrained: model.Embedder, items: list
) -> None:
    """A re-encoded copy of a product photo is flagged; the other products are not."""
    from PIL import Image

    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items)
    engine = Engine.open(pretrained, catalogue, options(tmp_path))
    flagged = 0
    for pid, *_, png in items[::4]:
        image = Image.open(io.BytesIO(png)).resize((120, 120))
        copy = imagegen.encode(image, "JPEG", quality=80)
        p = prepare(copy, IMAGE_SIZE, LIMITS)
        vectors, duplicates = pretrained.embed_with_duplicates(p.pixels[None])
        matches = engine.search(vectors[0], 5, sha256=p.sha256, duplicate=duplicates[0])
        flagged += matches[0].product_id == pid and matches[0].near_duplicate
        assert not any(m.near_duplicate for m in matches if m.product_id != pid)
    assert flagged >= 4  # of 5


def test_catalogue_grows_into_ivf_and_back(tmp_path: Path, pretrained: model.Embedder) -> None:
    """The exact index becomes IVF past the size limit (tiny limit here) and Flat again when it shrinks."""
    catalogue = Catalogue(tmp_path / "c.sqlite")
    items = imagegen.catalogue(n_per=4, size=(40, 40))  # 80 products
    add(catalogue, pretrained, items[:20])
    engine = Engine.open(pretrained, catalogue, options(tmp_path, exact_max=30, nprobe=16))
    assert engine.stats()["index_type"] == "Flat"
    add(catalogue, pretrained, items[20:])
    engine.sync()
    assert engine.stats()["index_type"].startswith("IVF")
    assert engine.stats()["size"] == 80
    assert query(engine, items[50][3], 1) == [items[50][0]]
    catalogue.remove([pid for pid, *_ in items[:70]])
    engine.sync()
    assert engine.stats()["index_type"] == "Flat" and engine.stats()["size"] == 10


def test_a_market_filter_includes_products_sold_everywhere(
    tmp_path: Path, pretrained: model.Embedder, items: list
) -> None:
    """A product indexed without a market is sold in every market (the demo catalogue's are)."""
    everywhere = [(f"all-{pid}", cat, "", png) for pid, cat, _, png in items[:6]]
    catalogue = Catalogue(tmp_path / "c.sqlite")
    add(catalogue, pretrained, items + everywhere)
    engine = Engine.open(pretrained, catalogue, options(tmp_path))
    vector = pretrained.embed(prepare(items[0][3], IMAGE_SIZE, LIMITS).pixels[None])[0]
    found = engine.search(vector, 40, market="FR")
    assert {m.market for m in found} == {"FR", ""}
    assert {m.product_id for m in found if m.market == ""} == {pid for pid, *_ in everywhere}
    assert all(m.market == "" for m in engine.search(vector, 40, market="JP"))  # no JP products
