"""Write the same documents in each input format prepare-data reads (helpers for the data tests)."""

import json
from pathlib import Path


def write_text_dir(documents, root: Path) -> Path:
    """One file per document, named so that sorted order is document order (nested one level, to
    exercise the recursive glob)."""
    for i, text in enumerate(documents):
        path = root / f"part-{i // 20:02d}" / f"doc-{i:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root


def write_jsonl(documents, path: Path, *, field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(documents):
            f.write(json.dumps({"id": i, field: text}, ensure_ascii=False) + "\n")
    return path


def write_parquet(documents, path: Path, *, field: str = "text", row_group_size: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(documents))), field: list(documents)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_hf_dataset(documents, path: Path, *, field: str = "text") -> Path:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"id": list(range(len(documents))), field: list(documents)}).save_to_disk(str(path))
    return path
