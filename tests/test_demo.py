import dataclasses

import numpy as np

import e2ettt.demo as demo
from e2ettt import data
from e2ettt.tokenizer import load_tokenizer
from tests.conftest import TINY_INPUTS


def test_a_second_build_reuses_the_cache_and_other_settings_get_their_own(tiny_inputs, demo_cache, monkeypatch):
    other = demo.build_demo(dataclasses.replace(TINY_INPUTS, max_documents=12, val_every=4), demo_cache, log=lambda *a: None)
    assert other.root != tiny_inputs.root and other.root.parent == tiny_inputs.root.parent
    assert other.info["val_documents"] != tiny_inputs.info["val_documents"]  # really built from its own settings

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached demo was rebuilt")

    monkeypatch.setattr(demo, "pretrain", no_rebuild)
    monkeypatch.setattr(demo, "train_tokenizer", no_rebuild)
    again = demo.build_demo(TINY_INPUTS, demo_cache, log=lambda *a: None)
    assert again.root == tiny_inputs.root and again.info == tiny_inputs.info


def test_split_is_by_document_and_shards_start_documents_with_bos(tiny_inputs):
    docs = demo.load_documents(TINY_INPUTS.max_documents)
    train, val = demo.split_documents(docs, TINY_INPUTS.val_every)
    assert {f for f, _ in train}.isdisjoint({f for f, _ in val})
    assert [f for f, _ in val] == tiny_inputs.info["val_documents"]
    sp = load_tokenizer(tiny_inputs.tokenizer)
    assert sp.vocab_size() == 1024 and sp.bos_id() == 1 and sp.pad_id() == 0 and sp.eos_id() == 2 and sp.unk_id() == 3
    val_tokens = data.load_tokens(tiny_inputs.data_dir, "val")
    assert int((val_tokens == data.BOS_ID).sum()) == len(val) and val_tokens[0] == data.BOS_ID
    np.testing.assert_array_equal(val_tokens, demo.encode_documents(sp, val))
    assert np.isfinite(tiny_inputs.info["val_bpb"]) and tiny_inputs.info["val_bpb"] < 12.0
