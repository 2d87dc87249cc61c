import numpy as np
import pytest

from e2ettt import data
from e2ettt.demo import load_documents
from e2ettt.tokenizer import SPACE, TokenizerError, build_byte_tables, decoded_bytes, load_tokenizer, train_tokenizer


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
    assert t.base_bytes.dtype == np.int16 and t.count_bytes(np.array([1]), np.array([i])).dtype == np.int64


def test_decoded_bytes_count_no_text_for_pieces_that_are_none(tiny_inputs):
    """The unknown piece (which SentencePiece decodes as " \u2047 ") and ids beyond the tokenizer are no text: each
    ends a document, as the tables' boundaries do, and an empty stream has no bytes."""
    sp = load_tokenizer(tiny_inputs.tokenizer)
    vocab = sp.vocab_size()
    tables = build_byte_tables(sp, vocab + 8)
    word = sp.encode("ab")
    assert sp.decode([3]).strip() and not sp.id_to_piece(word[0]).startswith(SPACE)
    ids = np.array([data.BOS_ID, *word, 3, *word, vocab + 5, *word, vocab], dtype=np.int64)
    for first in range(1, ids.size):
        want = int(tables.count_bytes(ids[first - 1 : -1], ids[first:]).sum())
        text = sum(len(sp.id_to_piece(int(t)).encode()) for t in ids[first:] if t in word)
        assert decoded_bytes(sp, ids, first) == want == text, first
    assert decoded_bytes(sp, np.array([], dtype=np.int64), 0) == 0


def test_decoded_bytes_agree_with_the_byte_tables_wherever_a_segment_starts_and_ends(tiny_inputs):
    """The row alarm's count, read off the decoder, equals the tables' count for streams and targets starting and
    ending anywhere: inside words, at document starts, and inside characters that byte-fallback pieces spell."""
    sp = load_tokenizer(tiny_inputs.tokenizer)
    tables = build_byte_tables(sp)
    spelled = "Caf\u00e9 \u2014 d\u00e9j\u00e0 vu \u20ac5 \U0001f600 ok \u0905\u00e9x\u00ff"
    texts = [t[:400] for _, t in load_documents(30)[:3]] + [spelled]
    ids = np.concatenate([[data.BOS_ID] + sp.encode(t) for t in texts])
    byte_pieces = [i for i, t in enumerate(ids) if sp.is_byte(int(t))]
    assert len(byte_pieces) > 8  # the last document is spelled partly in byte-fallback pieces
    cuts = sorted(set(range(1, ids.size, 37)) | set(byte_pieces) | {int(np.flatnonzero(ids == data.BOS_ID)[1])})
    ends = sorted(set(range(2, ids.size, 29)) | {b + 1 for b in byte_pieces} | {ids.size})  # inside and after characters
    for first in cuts:
        for end in ends:
            if first < end:
                want = int(tables.count_bytes(ids[first - 1 : end - 1], ids[first:end]).sum())
                assert decoded_bytes(sp, ids[:end], first) == want, (first, end)
    # a stream that itself begins anywhere in the last document: inside a word, or inside a character of 2, 3 or 4
    # bytes (U+0905 leads with 0xE0, the smallest lead of three; U+00FF ends with 0xBF, the largest continuation)
    last = int(np.flatnonzero(ids == data.BOS_ID)[-1]) + 1
    assert {int(sp.id_to_piece(int(t))[3:5], 16) for t in ids[byte_pieces]} >= {0xC3, 0xE0, 0xE2, 0xF0, 0xBF}
    for start in [last, last + 1, *(b for b in byte_pieces if b > last)]:
        for end in sorted({b + 1 for b in byte_pieces if b > start} | {ids.size}):
            for first in range(start + 1, min(end, start + 6)):
                want = int(tables.count_bytes(ids[first - 1 : end - 1], ids[first:end]).sum())
                assert decoded_bytes(sp, ids[start:end], first - start) == want, (start, first, end)


def test_a_trained_tokenizer_has_the_documented_settings_and_keeps_the_text_as_it_is(tmp_path):
    """Byte-fallback BPE, pad/bos/eos/unk = 0/1/2/3, identity normalization (no dummy prefix, whitespace kept),
    digits split, and no paragraph skipped: the longest sets max_sentence_length."""
    from sentencepiece import sentencepiece_model_pb2

    longest = "zebraquokka " * 600  # 7,200 bytes: past SentencePiece's default limit of 4,192
    docs = ["The year 2024 was  long.\nCaf\u00e9 \u00e0 la carte \ufb01ne.\n" + "word " * 50,
            "Another document.\n" + longest]
    path = train_tokenizer(docs, tmp_path / "tok", 300)
    assert path == tmp_path / "tok.model" and path.is_file()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == sentencepiece_model_pb2.TrainerSpec.BPE and t.vocab_size == 300 and t.byte_fallback
    assert (t.pad_id, t.bos_id, t.eos_id, t.unk_id) == (0, 1, 2, 3)
    assert t.split_digits and t.character_coverage == pytest.approx(0.9995) and t.input_sentence_size == 0
    assert t.max_sentence_length == len(longest.encode()) + 1 and t.num_threads == 2
    assert n.name == "identity" and not n.add_dummy_prefix and not n.remove_extra_whitespaces
    sp = load_tokenizer(path)
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256
    text = "The year 2024 was  long. Caf\u00e9 \ufb01ne"
    assert sp.decode(sp.encode(text)) == text  # no normalization, no extra or lost spaces
    assert [sp.id_to_piece(i) for i in sp.encode("2024")] == ["2", "0", "2", "4"]
    assert not sp.id_to_piece(sp.encode("The")[0]).startswith(SPACE)
    assert "zebraquokka" in {sp.id_to_piece(i).strip(SPACE) for i in range(sp.vocab_size())}  # learned from the longest


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tok.model: not a SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
