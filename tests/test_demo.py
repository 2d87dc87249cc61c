import time

import numpy as np

import e2ettt.demo as demo
from e2ettt import data
from e2ettt.tokenizer import load_tokenizer
from tests.conftest import TINY_DEMO


def test_second_build_reuses_the_cache(tiny_demo, demo_cache, monkeypatch):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached demo was rebuilt")

    monkeypatch.setattr(demo, "pretrain", no_rebuild)
    monkeypatch.setattr(demo, "train_tokenizer", no_rebuild)
    t = time.perf_counter()
    again = demo.build_demo(TINY_DEMO, demo_cache, log=lambda *a: None)
    assert time.perf_counter() - t < 5  # reading a JSON file, not building
    assert again.root == tiny_demo.root and again.info == tiny_demo.info


def test_other_settings_get_their_own_cache_entry(tiny_demo):
    from dataclasses import replace

    from e2ettt.config import config_hash

    other = replace(TINY_DEMO, steps=TINY_DEMO.steps + 1)
    key = config_hash({"format": demo.DEMO_FORMAT, "demo": __import__("dataclasses").asdict(other)})
    assert key != tiny_demo.info["key"]


def test_split_is_by_document_and_shards_start_documents_with_bos(tiny_demo):
    docs = demo.load_documents(TINY_DEMO.max_documents)
    train, val = demo.split_documents(docs, TINY_DEMO.val_every)
    assert {f for f, _ in train}.isdisjoint({f for f, _ in val})
    assert [f for f, _ in val] == tiny_demo.info["val_documents"]
    sp = load_tokenizer(tiny_demo.tokenizer)
    assert sp.vocab_size() == 1024 and sp.bos_id() == 1 and sp.pad_id() == 0 and sp.eos_id() == 2 and sp.unk_id() == 3
    val_tokens = data.load_tokens(tiny_demo.data_dir, "val")
    assert int((val_tokens == data.BOS_ID).sum()) == len(val) and val_tokens[0] == data.BOS_ID
    np.testing.assert_array_equal(val_tokens, demo.encode_documents(sp, val))
    assert np.isfinite(tiny_demo.info["val_bpb"]) and tiny_demo.info["val_bpb"] < 8.0
