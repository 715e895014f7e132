from latentmoe.data import load_corpus, split_documents, split_point
from latentmoe.data.corpus import read_shipped_documents


def test_shipped_corpus_loads_and_is_over_3_mb():
    splits = load_corpus()
    assert len(splits.documents) == 42
    assert "hamlet" in splits.documents and "sonnets" in splits.documents
    assert len(splits.train) + len(splits.val) > 3_000_000
    assert all(val for val in splits.val_parts), "every document contributes to validation"


def test_split_point_cuts_at_the_first_line_start_at_or_after_the_target():
    text = "aaaa\nbbbb\ncccc\ndddd\n"  # 20 chars, lines start at 0, 5, 10, 15
    assert split_point(text, 0.25) == 15  # target 20 - 5 = 15 is a line start
    assert split_point(text, 0.30) == 15  # target 14 -> next line start 15
    assert split_point(text, 0.50) == 10  # target 10
    assert split_point(text, 0.05) == 20  # target 19 -> no line starts there: no val text
    assert split_point(text, 0.0) == 20
    assert split_point("no newline at all", 0.5) == len("no newline at all")


def test_split_is_deterministic():
    first, second = load_corpus(), load_corpus()
    assert first.digest == second.digest
    assert first.train_parts == second.train_parts and first.val_parts == second.val_parts


def test_val_is_the_end_of_each_document_and_not_in_its_train_part():
    documents = read_shipped_documents()
    splits = load_corpus()
    for name, train, val in zip(splits.documents, splits.train_parts, splits.val_parts, strict=True):
        assert train + val == documents[name]
        assert train.endswith("\n"), "cut at a line boundary"
        assert val not in train
        assert 0.04 < len(val) / len(documents[name]) < 0.07
    assert 0.045 < len(splits.val) / (len(splits.train) + len(splits.val)) < 0.055


def test_digest_changes_when_text_moves_between_splits():
    text = {"doc": "one\ntwo\nthree\nfour\n"}
    assert split_documents(text, val_fraction=0.3).digest != split_documents(text, val_fraction=0.6).digest
