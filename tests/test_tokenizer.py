import numpy as np
import pytest

from e2ettt import data
from e2ettt.demo import load_documents
from e2ettt.tokenizer import TokenizerError, build_byte_tables, decoded_bytes, load_tokenizer


def test_byte_tables_count_the_utf8_bytes_of_real_text(tiny_inputs):
    sp = load_tokenizer(tiny_inputs.tokenizer)
    tables = build_byte_tables(sp)
    docs = load_documents(30)
    for _, text in docs[:12]:
        ids = np.array([data.BOS_ID] + sp.encode(text))
        decoded = sp.decode(ids[1:].tolist())
        counted = int(tables.count_bytes(ids[:-1], ids[1:]).sum())
        assert counted == len(decoded.encode("utf-8"))
        assert decoded == text  # identity normalization: bytes describe the real text


def test_byte_table_rules(tiny_inputs):
    sp = load_tokenizer(tiny_inputs.tokenizer)
    t = build_byte_tables(sp, vocab_size=1030)
    assert t.base_bytes.size == 1030 and t.is_boundary[1024:].all()
    for i in (0, 1, 2, 3):  # pad/bos/eos/unk
        assert t.is_boundary[i] and t.base_bytes[i] == 0
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert byte_ids and all(t.base_bytes[i] == 1 for i in byte_ids)
    space = [i for i in range(sp.vocab_size()) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 1]
    assert space and all(t.has_leading_space[i] for i in space)
    i = space[0]  # after a boundary token the leading space is not counted
    assert t.count_bytes(np.array([1]), np.array([i]))[0] == t.base_bytes[i]
    assert t.count_bytes(np.array([space[1]]), np.array([i]))[0] == t.base_bytes[i] + 1


def test_decoded_bytes_agree_with_the_byte_tables_wherever_a_segment_starts_and_ends(tiny_inputs):
    """The row alarm's count, read off the decoder, equals the tables' count for targets starting and ending anywhere:
    inside words, at document starts, and inside characters that byte-fallback pieces spell."""
    sp = load_tokenizer(tiny_inputs.tokenizer)
    tables = build_byte_tables(sp)
    texts = [t[:400] for _, t in load_documents(30)[:3]] + ["Caf\u00e9 \u2014 d\u00e9j\u00e0 vu \u20ac5 \U0001f600 ok"]
    ids = np.concatenate([[data.BOS_ID] + sp.encode(t) for t in texts])
    byte_pieces = [i for i, t in enumerate(ids) if sp.is_byte(int(t))]
    assert len(byte_pieces) > 8  # the last document is spelled partly in byte-fallback pieces
    cuts = sorted(set(range(1, ids.size, 37)) | set(byte_pieces) | {int(np.flatnonzero(ids == data.BOS_ID)[1])})
    for first in cuts:
        for end in (ids.size, byte_pieces[-2], byte_pieces[-1] + 1):
            if first < end:
                want = int(tables.count_bytes(ids[first - 1 : end - 1], ids[first:end]).sum())
                assert decoded_bytes(sp, ids[:end], first) == want, (first, end)


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tok.model: not a SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
