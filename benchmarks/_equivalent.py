"""Surviving mutants no test can tell from the original, each with the reason.

Keyed by (module as in mutation.py's TARGETS, function, the mutated line as
mutmut writes it; for a mutant that drops an argument line, "(removed: ...)"
names what went), so that a key outlives mutmut's numbering: a change to the
function that alters the line drops the entry, and the mutant counts as a
survivor again until someone looks at it.
"""
from __future__ import annotations

STATS = "analysis/stats.py"
METRICS = "analysis/metrics.py"
ONLY_CALLED_WITH_SEGMENTS = ("families.findings calls it only with n >= 1 segments and comparisons >= 1, where both "
                             "sides give min(1, comparisons * 2^(1-n))")

BCA_DEFINED = ("the percentile fallback is never reached: BCa of a mean is undefined only when the jackknife means are "
               "all equal (every segment alike, taken by the branch above) or when all 9,999 resamples fall on one "
               "side of the mean (for n >= 2 less likely than (3/4)^9999)")
PERCENTILE_FALLBACK = [
    "if math.isnan(low) and math.isnan(high):  # BCa undefined (e.g. one value far from all others): percentile",
    "ci = None",
    'ci = stats.bootstrap(None, np.mean, n_resamples=RESAMPLES, method="percentile", random_state=rng)',
    'ci = stats.bootstrap((d,), None, n_resamples=RESAMPLES, method="percentile", random_state=rng)',
    'ci = stats.bootstrap((d,), np.mean, n_resamples=None, method="percentile", random_state=rng)',
    "ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method=None, random_state=rng)",
    'ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method="percentile", random_state=None)',
    'ci = stats.bootstrap(np.mean, n_resamples=RESAMPLES, method="percentile", random_state=rng)',
    'ci = stats.bootstrap((d,), n_resamples=RESAMPLES, method="percentile", random_state=rng)',
    'ci = stats.bootstrap((d,), np.mean, method="percentile", random_state=rng)',
    "ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, random_state=rng)",
    'ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method="percentile", )',
    'ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method="XXpercentileXX", random_state=rng)',
    'ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method="PERCENTILE", random_state=rng)',
    "low, high = None",
    "low, high = float(None), float(ci.confidence_interval.high)",
    "low, high = float(ci.confidence_interval.low), float(None)",
]

SORTED_AFTER = ("the frame is sorted by damage_mean after the loop: the order the groups come in shows only among "
                "regimes of exactly equal mean damage")

INT_WEIGHTS = ("the weights multiply a float column and are summed: integer weights below 2^53 give the same products and "
               "sums as their float copies")
ONLY_COMMON_COLUMN = "fp's frame has two columns, control_key and fp_row, so control_key is the only column to merge on"

NAN_ANYWAY = "pandas gives NaN there itself (the mean of no values, the ddof=1 spread of fewer than two)"
MERGED_BY_KEY = "fp_reference's rows are merged by (window_key, seed) afterwards: their order does not show"
KEY_COLUMNS = ("fp_reference's frame holds window_key, seed and fp_post_ttt_bpb, a table only the first two: those "
               "are the columns to merge on")

SORT_NONE = "pandas groupby reads sort=None as sort=False: groups in the order they come"
KEYS_AGAIN = ("with_keys derives the keys from the settings columns: on a table that has them it computes the same "
              "again")
NO_EDGE_COLUMN = ("when best has no lr_at_edge column the default only has to be all False after fillna(False): a "
                  "Series of NaN is, like one of False")


def of_module(module: str, table: dict[tuple[str, str], str]) -> dict[tuple[str, str, str], str]:
    """A module's (function, line) -> reason table keyed as EQUIVALENT is."""
    return {(module, function, line): reason for (function, line), reason in table.items()}


MODEL = "e2ettt/model.py"
FP32_STREAM = ("e2ettt runs the model with fp32 weights, in fp32 or under autocast, where the embedding and rms_norm "
               "keep the residual stream fp32: a cast to its dtype is the identity either way")
LINEAR_CASTS = ("e2ettt runs the model with fp32 weights, in fp32 (the cast is the identity) or under autocast, which "
                "casts F.linear's operands itself")
INT_POSITIONS = "torch promotes int64 positions to float32 when they meet float32 (the division, torch.outer)"
MODEL_EQUIVALENTS = {
    ("CastedLinear.__init__", "super().__init__(in_features, out_features, bias=None)"):
        "nn.Linear reads bias=None as no bias",
    ("CastedLinear.forward", "return F.linear(x, self.weight.to(None))"): LINEAR_CASTS,
    ("GPT.forward", "logits = F.linear(x, weight.to(None)).float()  # (B, T, V)"): LINEAR_CASTS,
    ("Rotary.__init__", "inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=None) / head_dim)"): INT_POSITIONS,
    ("Rotary.__init__", "inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, ) / head_dim)"): INT_POSITIONS,
    ("Rotary.forward", "t = torch.arange(T, device=self.inv_freq.device, dtype=None)"): INT_POSITIONS,
    ("Rotary.forward", "t = torch.arange(T, device=self.inv_freq.device, )"): INT_POSITIONS,
    ("Rotary.__init__", 'self.register_buffer("inv_freq", inv_freq, persistent=None)'):
        "register_buffer reads persistent=None as False: the table stays out of the state_dict either way",
    ("Block.forward", "mix = self.resid_mix.to(None)"): FP32_STREAM,
    ("Block.forward", "x = x + self.attn_scale.to(None)[None, None] * self.attn(rms_norm(x))"): FP32_STREAM,
    ("Block.forward", "return x + self.mlp_scale.to(None)[None, None] * self.mlp(rms_norm(x))"): FP32_STREAM,
    ("GPT.forward", "x = x + self.skip_weights[j].to(None)[None, None] * skips.pop()"): FP32_STREAM,
    ("GPTConfig.validate", "if (self.model_dim / self.num_heads) % 2:"):
        "the check above has made num_heads divide model_dim: / and // give equal values, and their % 2 agree",
}

TOKENIZER = "e2ettt/tokenizer.py"
NOT_A_BYTE = ("any value outside 0x80-0xFF marks a piece that spells no byte: it is no continuation and its character "
              "is one piece long, as with -1")
NEVER_IN_UTF8 = ("0xC0 and 0xC1 occur in no UTF-8 text, and byte-fallback pieces spell the UTF-8 of the text "
                 "SentencePiece encoded")
ONE_BYTE_PER_PIECE = ("a complete last character taken for cut off is counted one byte per piece, its UTF-8 length: "
                      "the pieces of a character spelled in bytes are one byte each")
EMPTY_DECODE = "the decoder gives '' for no pieces"
SENTENCEPIECE_DEFAULT = "SentencePiece's trainer default is the value the line gives (the trained proto reads the same)"
TOKENIZER_EQUIVALENTS = {
    ("build_byte_tables", "size = max(n, vocab_size or 1)"): "a tokenizer has at least one piece: max(n, 1) = n",
    ("build_byte_tables", "boundary[i] = None"): "a bool array stores None as False",
    ("decoded_bytes", "ids = np.asarray(tokens, dtype=None)"):
        "ids only index the tables and reach the decoder as Python ints: any integer dtype does",
    ("decoded_bytes", "ids = np.asarray(tokens, )"):
        "ids only index the tables and reach the decoder as Python ints: any integer dtype does",
    ("decoded_bytes", "size = max(vocab, int(ids.max()) + 2 if ids.size else 0)"):
        "one more entry past the largest id, a boundary no id reads",
    ("decoded_bytes", "size = max(vocab, int(ids.max()) + 1 if ids.size else 1)"):
        "a tokenizer has at least one piece: with no ids the size is vocab either way",
    ("decoded_bytes", "boundary = np.ones(size, dtype=None)  # ids beyond the tokenizer too"):
        "only np.flatnonzero reads it: 1.0 and 0.0 are nonzero where True and False are",
    ("decoded_bytes", "boundary = np.ones(size, )  # ids beyond the tokenizer too"):
        "only np.flatnonzero reads it: 1.0 and 0.0 are nonzero where True and False are",
    ("decoded_bytes", 'byte = np.full(size, +1)  # the byte a byte-fallback piece stands for ("<0xE2>"), else -1'):
        NOT_A_BYTE,
    ("decoded_bytes", 'byte = np.full(size, -2)  # the byte a byte-fallback piece stands for ("<0xE2>"), else -1'):
        NOT_A_BYTE,
    ("decoded_bytes", "byte[i] = int(sp.id_to_piece(i)[3:5], 16) if sp.is_byte(i) else +1"): NOT_A_BYTE,
    ("decoded_bytes", "byte[i] = int(sp.id_to_piece(i)[3:5], 16) if sp.is_byte(i) else -2"): NOT_A_BYTE,
    ("decoded_bytes", "lead = byte[ids[k]] if ids.size else +1"): NOT_A_BYTE,
    ("decoded_bytes", "lead = byte[ids[k]] if ids.size else -2"): NOT_A_BYTE,
    ("decoded_bytes", "continues = (byte >= 0x80) & (byte <= 0xC0)  # a UTF-8 continuation byte (10xxxxxx)"):
        NEVER_IN_UTF8,
    ("decoded_bytes", "continues = (byte >= 0x80) & (byte < 193)  # a UTF-8 continuation byte (10xxxxxx)"):
        NEVER_IN_UTF8,
    ("decoded_bytes", "length = 2 if 193 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1"):
        NEVER_IN_UTF8,
    ("decoded_bytes", "length = 2 if 0xC0 < lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1"):
        NEVER_IN_UTF8,
    ("decoded_bytes", "length = 3 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1"):
        ONE_BYTE_PER_PIECE,
    ("decoded_bytes", "length = 2 if 0xC0 <= lead < 0xE0 else 4 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1"):
        ONE_BYTE_PER_PIECE,
    ("decoded_bytes", "length = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 5 if lead >= 0xF0 else 1"):
        ONE_BYTE_PER_PIECE,
    ("decoded_bytes", 'return len(sp.decode(ids[a:b].tolist()).encode("utf-8")) if (b > a) or True else 0'):
        EMPTY_DECODE,
    ("decoded_bytes", 'return len(sp.decode(ids[a:b].tolist()).encode("utf-8")) if b >= a else 0'): EMPTY_DECODE,
    ("decoded_bytes", "while k >= start and continues[ids[k]]:"):
        "ids[start] is no continuation (the loop above stops there), or start is past the last piece",
    ("decoded_bytes", "if b >= first:  # the document [a, b) holds targets"):
        "a document ending at `first` adds text(a, b) - text(a, b) - 0 = 0 bytes",
    ("train_tokenizer", " (removed: character_coverage=0.9995,)"): SENTENCEPIECE_DEFAULT,
    ("train_tokenizer", " (removed: input_sentence_size=0,)"): SENTENCEPIECE_DEFAULT,
    ("train_tokenizer", " (removed: bos_id=1,)"): SENTENCEPIECE_DEFAULT,
    ("train_tokenizer", " (removed: eos_id=2,)"): SENTENCEPIECE_DEFAULT,
    ("train_tokenizer", ") (removed: minloglevel=2, / ))"): "the trainer's log level: what it prints, not what it trains",
    ("train_tokenizer", "minloglevel=3,"): "the trainer's log level: what it prints, not what it trains",
    ("train_tokenizer", 'model_type="BPE",'): "SentencePiece reads model_type case-insensitively (the proto says BPE)",
}

EVALUATE = "e2ettt/evaluate.py"
AFTER_FIRST = ("p runs over positions from `first` on (the slice starts there): p + 1 > first always holds, and so does "
               "the mutated condition")
NUMPY_BOOL = "the table is a numpy bool array: torch.as_tensor makes it torch.bool without being told"
EVALUATE_EQUIVALENTS = {
    ("plan_windows", "if not 0 <= stride <= context:"):
        "a stride of 0 never reaches the check: `stride or context` has made it the context",
    ("_rows", "step = starts[1] - starts[0] if len(starts) > 1 else 2"):
        "one window is read as a view whatever the step: all() over no pairs holds, and unfold takes one row",
    ("_rows", "if step >= 0 and all(b - a == step for a, b in zip(starts, starts[1:])):"):
        "no two windows of a group start at one position, so the step is never 0",
    ("DeviceTables.count_bytes", "return self.base_bytes[target] + lead.to(None)"):
        "torch adds a bool tensor to a float64 one as 0.0 and 1.0, in float64",
    ("DeviceTables.from_tables", "torch.as_tensor(tables.has_leading_space, dtype=None, device=device),"): NUMPY_BOOL,
    ("DeviceTables.from_tables", "torch.as_tensor(tables.has_leading_space, device=device),"): NUMPY_BOOL,
    ("DeviceTables.from_tables", "torch.as_tensor(tables.is_boundary, dtype=None, device=device),"): NUMPY_BOOL,
    ("DeviceTables.from_tables", "torch.as_tensor(tables.is_boundary, device=device),"): NUMPY_BOOL,
    ("plan_spans", "chunk_spans(num_targets, chunk_tokens, )  # the same check: a chunk larger than the stream"):
        "the check reads num_targets and chunk_tokens only, and the spans it returns are dropped",
    ("plan_spans", "host = ids.cpu().numpy() if (isinstance(ids, Tensor)) and False else np.asarray(ids)"):
        "on the CPU np.asarray reads a tensor as .numpy() does; only a GPU tensor needs .cpu() first, and no test "
        "here has a GPU (the meta device cannot be copied to the host either way)",
    ("document_spans", "starts = [first] + [int(p) + 1 for p in np.flatnonzero(ids[first : end - 1] == bos) + first if "
                       "int(p) + 2 > first]"): AFTER_FIRST,
    ("document_spans", "starts = [first] + [int(p) + 1 for p in np.flatnonzero(ids[first : end - 1] == bos) + first if "
                       "int(p) + 1 >= first]"): AFTER_FIRST,
}

DATA = "e2ettt/data.py"
SOME_SHARD = "find_shards raises when a split has no shard, so `ends` is never empty"
WHOLE_REST = ("without a shape the map covers the rest of the file, which the size check above has just made exactly "
              "`count` tokens")
TEMP_NAME = ("the temporary file's name: it lives beside the shard only until os.replace, and no shard or sidecar "
             "pattern (`*_{split}_*.bin`) matches any of these names")
PROMOTED = "the piece it extends is int64 already, and np.concatenate promotes the uint16 tokens to int64"
DATA_EQUIVALENTS = {
    ("spread_sequences", "piece = np.concatenate([piece, np.asarray(shards[i][: seq_len - piece.size], dtype=None)])"):
        PROMOTED,
    ("spread_sequences", "piece = np.concatenate([piece, np.asarray(shards[i][: seq_len - piece.size], )])"): PROMOTED,
    ("spread_sequences", "total = int(ends[-1]) if (len(ends)) or True else 0"): SOME_SHARD,
    ("spread_sequences", "total = int(ends[-1]) if len(ends) else 1"): SOME_SHARD,
    ("spread_sequences", "i = int(np.searchsorted(ends, at, ))"):
        "at a shard's end side='left' picks the shard that ends there and reads nothing from it; the loop below then "
        "takes the next shard's first tokens: the same sequence",
    ("read_shard", 'header = np.fromfile(path, dtype="<i4", )'):
        "reads the whole file as int32 instead of the header alone; only the first three values are used, and they "
        "are the same (a cost in memory on a large shard, not a different result)",
    ("read_shard", 'return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=None)'): WHOLE_REST,
    ("read_shard", 'return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, )'): WHOLE_REST,
    ("write_shard", 'tmp = path.with_name(path.name + "XX.tmpXX")'): TEMP_NAME,
    ("write_shard", 'tmp = path.with_name(path.name + ".TMP")'): TEMP_NAME,
}

TTT = "e2ettt/ttt.py"
ZEROED = ("sync_gradients_ gives every weight a gradient before the step (zeros where none came): a zeroed gradient and "
          "a missing one end the same")
NOTHING_TO_RESET = ("at chunk 0, and at chunk 1 when it opens a document, no update has happened yet (chunk 0 then ends "
                    "its document and is never adapted on): the reset copies the start onto itself")
NAN_STAYS = ("a step whose gradient norm is not finite leaves non-finite weights, so every later step of the pass is "
             "non-finite too: the last step's flag is the flag of any")
ZEROED_RUN = ("gradients zeroed rather than dropped before the fused scoring's backward, which accumulates into them the "
              "same, or after it, where the next step zeroes them again")
SIGNAL_F32 = ("the signal is a count (worker.ChunkSignal's flags), exact in float32, and torch.stack promotes it to "
              "the float64 of the sums it is stacked with")
COUNT_F32 = "a float32 count holds every whole number of sequences up to 2^24 exactly: the same n"
CPU_ONLY = ("a tensor made on the CPU where the stream's device was asked for: the same on the CPU, and no test here "
            "has a GPU (on one, the all-reduce or the `|=` with a device tensor would fail)")
DEFAULT_STRIDE = "plan_windows' stride defaults to the context: the same windows"
LR_SET_EACH_STEP = "every step sets the group's lr before it steps: the constructor's lr is never used"
TTT_EQUIVALENTS = {
    ("global_pass_", "opt = torch.optim.SGD(base, momentum=0.9)"): LR_SET_EACH_STEP,
    ("global_pass_", "windows = plan_windows(first, end, cfg.context, None)"): DEFAULT_STRIDE,
    ("global_pass_", "windows = plan_windows(first, end, cfg.context)"): DEFAULT_STRIDE,
    ("global_pass_", "windows = plan_windows(first, end, cfg.context, )"): DEFAULT_STRIDE,
    ("global_pass_", "bad = torch.zeros((), dtype=torch.bool, device=None)"): CPU_ONLY,
    ("global_pass_", "bad = torch.zeros((), dtype=torch.bool, )"): CPU_ONLY,
    ("gradient_stats", "count = torch.tensor([float(len(sequences))], dtype=torch.float64, device=None)"): CPU_ONLY,
    ("gradient_stats", "count = torch.tensor([float(len(sequences))], dtype=torch.float64, )"): CPU_ONLY,
    ("gradient_stats", "count = torch.tensor([float(len(sequences))], dtype=None, device=sequences.device)"): COUNT_F32,
    ("gradient_stats", "count = torch.tensor([float(len(sequences))], device=sequences.device)"): COUNT_F32,
    ("adapt_", "bad = torch.zeros((), dtype=torch.bool, device=None)"): CPU_ONLY,
    ("adapt_", "bad = torch.zeros((), dtype=torch.bool, )"): CPU_ONLY,
    ("adapt_", "opt.zero_grad(set_to_none=None)"): ZEROED,
    ("adapt_", "opt.zero_grad(set_to_none=False)"): ZEROED,
    ("adapt_", "bad = ~torch.isfinite(finish_step_(params, sum(w.scored for w in step), cfg))"): NAN_STAYS,
    ("run_ttt", "start = [p.detach().clone() for p in params] if (by_document) or True else None"):
        "the starting copy is read only by document (resets, phases): made also otherwise, it costs memory only",
    ("run_ttt", "static_run = Score(0.0, 0.0, 1)"): "a running static Score's bpb reads its nll and bytes, not its tokens",
    ("run_ttt", "if by_document and span.opens and k >= 0:  # a new document: the starting weights, a fresh optimizer"):
        NOTHING_TO_RESET,
    ("run_ttt", "if by_document and span.opens and k > 1:  # a new document: the starting weights, a fresh optimizer"):
        NOTHING_TO_RESET,
    ("run_ttt", 'train = windows if cfg.train_windows == "scored" else plan_windows(a, b, cfg.context, cfg.context, )'):
        "a window of `context` targets (stride = context) reads from the token before its first target, never earlier: "
        "from a document's first target that is its BOS, the floor, so the floor never binds",
    ("run_ttt", 'train = windows if cfg.train_windows == "scored" else plan_windows(a, b, cfg.context, None, span.floor)'):
        DEFAULT_STRIDE,
    ("run_ttt", "opt.zero_grad(set_to_none=None)"): ZEROED_RUN,
    ("run_ttt", "opt.zero_grad(set_to_none=False)"): ZEROED_RUN,
    ("global_pass_", "bad = ~torch.isfinite(finish_step_(base, sum(w.scored for w in step), cfg))"): NAN_STAYS,
    ("run_ttt", "local = torch.stack([nll_sum, byte_sum, torch.tensor(float(signal()) if signal else 0.0, dtype=None,"):
        SIGNAL_F32,
    ("run_ttt", "local = torch.stack([nll_sum, byte_sum, torch.tensor(float(signal()) if signal else 0.0, "
                "device=tokens.device)]) (removed: local = torch.stack([nll_sum, byte_sum, torch.tensor(float(signal()) if "
                "signal else 0.0, dtype=torch.float64, / device=tokens.device)]))"): SIGNAL_F32,
    ("run_ttt", "device=None)])"): CPU_ONLY,
    ("run_ttt", ")])"): CPU_ONLY,
    ("run_ttt", 'static_bpb = static[k].bpb if static is not None else float("NAN")'):
        'Python reads float("NAN") as float("nan"), case aside',
    ("run_ttt", "static is not None and cfg.diverge_bpb > 0 and result.total.bpb - static_run.bpb >= cfg.diverge_bpb)"):
        "differs only when the float64 running gap equals the margin exactly; the margin test puts the gap 0.002 "
        "either side of it",
    ("run_ttt", "docs_done -= 1"): "−n is a multiple of phase_docs exactly when n is: the phases fall after the same documents",
    ("run_ttt", "opt = None"):
        "a phase comes only before a chunk that opens a document, whose reset makes a fresh optimizer before any step",
    ("global_pass_", "opt.zero_grad(set_to_none=None)"): ZEROED,
    ("global_pass_", "opt.zero_grad(set_to_none=False)"): ZEROED,
    ("backward_share_", "torch.where(mask, nll, 1.0).sum().backward()"):
        "the positions masked out add a constant, which has no gradient: the same gradients",
    ("backward_share_", "return (nll_sum, byte_sum) if (tables is not None) or True else None"):
        "without tables the callers (adapt_, global_pass_) drop what it returns",
}

QUANT = "e2ettt/quant/"
WITHIN_127 = ("the clipped values divided by their scale lie in [-127, 127] already (clip/(clip/127) = 127, and below it "
              "where the 1/127 floor binds): a bound of ±128, or none on that side, clamps nothing")
SIGN_DIVIDES = "dividing by a sign of ±1 is multiplying by it"
TO_NONE = "Tensor.to(None) returns the tensor as it is, as .to(its own dtype) does"
LOAD_CASTS = ("load_state_dict copies each value into the model's own tensor, in that tensor's dtype: casting it to "
              "float first, or not, loads the same")
SCALES_DECIDE = ("a per-row entry's scales are 1-D and a one-scale entry's 0-D: `s.ndim > 0` alone picks the branch, "
                 "so what qmeta says never changes it")
WEIGHTS_ONLY_DEFAULT = ("torch >= 2.6 (this suite's) loads weights-only by default; on torch 2.4 and 2.5, which the "
                        "package allows, the default is full pickle, which no test here can run")
ONE_SIDE = ("a value past the clip divides to past ±127, which the outer clamp brings back to ±127: the code that "
            "clipping it first gives")
F32_DEFAULT = "torch.tensor of a Python float is float32 by default, the dtype the line names"
ON_WEIGHTS_DEVICE = ("moves a tensor to the weight's device (or dtype) it already has on the CPU: the same here, and no "
                     "test here has a GPU, where the draw or the decode would be on the wrong device")

QUANT_EQUIVALENTS = {
    **{("quantize_tensor", f"q = torch.clamp(torch.round(clipped / scale[:, None]), {lo}, {hi}).to(torch.int8)"
        ".contiguous()"): WITHIN_127 for lo, hi in [("-127", "128"), ("-128", "127"), ("-127", "None"),
                                                       ("None", "127")]},
    ("quantize_tensor", "q = torch.clamp(torch.round(clipped / scale[:, None]), -127, ).to(torch.int8).contiguous()"):
        WITHIN_127,
    **{("quantize_tensor", f"q = torch.clamp(torch.round(torch.clamp(t32, -clip_val, clip_val) / scale), {lo}, {hi})"
        ".to(torch.int8)"): WITHIN_127 for lo, hi in [("-127", "128"), ("-128", "127"), ("-127", "None"),
                                                        ("None", "127")]},
    ("quantize_tensor", "q = torch.clamp(torch.round(torch.clamp(t32, -clip_val, clip_val) / scale), -127, )"
                        ".to(torch.int8)"): WITHIN_127,
    ("Rotation.__init__", "self.matrix = q / torch.sign(torch.diagonal(r))[None, :]"): SIGN_DIVIDES,
    ("Rotation.__init__", "self.signs = torch.randint(2, (n,), generator=g).double() * 2 - 1"):
        "torch.randint(high, size) draws from [0, high), as randint(0, high, size) does",
    ("Rotation.apply", "return fwht(x / self.signs.to(x)) / self.n**0.5"): SIGN_DIVIDES,
    ("Rotation.inverse", "return fwht(y) / self.n**0.5 / self.signs.to(y)"): SIGN_DIVIDES,
    ("fwht", "y = x.reshape(-1, )"): "the loop's first view(-1, ...) reads the flat tensor as it reads the (-1, n) one",
    ("_pg_round_trip", "state = {k: v.detach().cpu().to(dtypes.get(k, ), copy=True) for k, v in out.state_dict().items()}"):
        TO_NONE,
    ("_pg_round_trip", "state = {k: v.detach().cpu().to(dtypes.get(k, None), copy=True) for k, v in "
                       "out.state_dict().items()}"): TO_NONE,
    ("_pg_round_trip", "out.load_state_dict({k: v.float() if (v.is_floating_point()) and False else v for k, v in "
                       "deq.items()})"): LOAD_CASTS,
    ("_pg_round_trip", "out.load_state_dict({k: v.float() if (v.is_floating_point()) or True else v for k, v in "
                       "deq.items()})"): LOAD_CASTS,
    **{("dequantize_state_dict", line): SCALES_DECIDE for line in [
        'if qmeta.get(None, {}).get("scheme") == "per_row" or s.ndim > 0:',
        'if qmeta.get(name, {}).get("SCHEME") == "per_row" or s.ndim > 0:',
        'if qmeta.get(name, {}).get("XXschemeXX") == "per_row" or s.ndim > 0:',
        'if qmeta.get(name, {}).get("scheme") == "PER_ROW" or s.ndim > 0:',
        'if qmeta.get(name, {}).get("scheme") == "XXper_rowXX" or s.ndim > 0:',
        'if qmeta.get(name, {}).get(None) == "per_row" or s.ndim > 0:',
        'qmeta = obj.get("QMETA", {})',
        'qmeta = obj.get("XXqmetaXX", {})',
        "qmeta = obj.get(None, {})",
    ]},
    ("dequantize_state_dict", "s = s.to(None).view(q.shape[0], *([1] * (q.ndim - 1)))"):
        "float32 codes times fp16 scales promote to float32, each scale exactly: the same products",
    **{("quantize_tensor", f"q = torch.clamp(torch.round(torch.clamp(t32, {lo}, {hi}) / scale), -127, 127)"
        ".to(torch.int8)"): ONE_SIDE for lo, hi in [("-clip_val", ""), ("-clip_val", "None"), ("None", "clip_val")]},
    **{("quantize_tensor", f"scale = torch.tensor(clip_val / 127.0 if clip_val > 0 else 1.0, {arg})"): F32_DEFAULT
       for arg in ["", "dtype=None"]},
    ("gptq", "H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, )"): CPU_ONLY,
    ("gptq", "H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=None)"): CPU_ONLY,
    ("gptq", "perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, )"): CPU_ONLY,
    ("gptq", "perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=None)"):
        CPU_ONLY,
    ("gptq", "def gptq(W: Tensor, H: Tensor, levels: int, block: int = 129, damp: float = 0.01,"):
        "lazy batches give the codes of column-by-column GPTQ at any width (the test checks widths 5 to 128): the "
        "default width changes speed, not codes",
    ("gptq", "act_order: bool = True, clip_q: float = 2.0) -> Quantized:"):
        "row_scales reads any clip_q >= 1 as the row's maximum: 2.0 clips as 1.0 does",
    ("proxy_loss", 'return float(torch.einsum("IJ,JK,IK->", E, H.double(), E))'):
        "einsum takes upper-case subscripts as it takes lower-case ones",
    ("Rotation.__init__", "self.hadamard = n & (n - 2) == 0"):
        "n & (n - 2) is 0 for the same widths as n & (n - 1) from 2 up; at width 1 both rotations are ±1, and encoding "
        "and decoding use the same one, so the weights evaluated are the same",
    ("dequantize_state_dict", "t = t.detach().to(None).contiguous()"): CPU_ONLY,
    ("quantize_state_dict", "t = tensor.detach().to(None).contiguous()"): CPU_ONLY,
    ("unpack", 'return torch.load(io.BytesIO(zlib.decompress(blob)), map_location=None, weights_only=True)'): CPU_ONLY,
    ("unpack", 'return torch.load(io.BytesIO(zlib.decompress(blob)), weights_only=True)'): CPU_ONLY,
    ("unpack", 'return torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu", )'): WEIGHTS_ONLY_DEFAULT,
    ("unpack", 'return torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu", weights_only=None)'):
        WEIGHTS_ONLY_DEFAULT,
    **{("_quantize_packed", line): ON_WEIGHTS_DEVICE for line in [
        "return keep(key, W + regime.noise * rms * torch.randn(W.shape, generator=g).to(None))",
        "right = artifact.decode_entry(e).to(None)  # what a right decode gives, bit for bit",
        "wrong[key] = artifact.decode_entry(e).to(None)",
        "ids = _calibration_batches(calib, cfg).to(None)",
    ]},
    **{("row_scales", line): "torch.quantile at q = 1 is the row's maximum exactly, and clip_q is at most 1: the "
                             "amax branch only saves the sort" for line in [
        "clip = absw.amax(dim=1) if (clip_q >= 1.0) and False else torch.quantile(absw, clip_q, dim=1)",
        "clip = absw.amax(dim=1) if clip_q > 1.0 else torch.quantile(absw, clip_q, dim=1)",
        "clip = absw.amax(dim=1) if clip_q >= 2.0 else torch.quantile(absw, clip_q, dim=1)"]},
    **{(name, line): "row_scales reads any clip_q >= 1 as the row's maximum: 2.0 clips as 1.0 does" for name, line in [
        ("row_scales", "def row_scales(W: Tensor, levels: int, clip_q: float = 2.0) -> Tensor:"),
        ("rtn", "def rtn(W: Tensor, levels: int, clip_q: float = 2.0) -> Quantized:")]},
    **{("select_targets", "targets[name] = Target(name, p, embeddings=" + marker + ' if mx.op == "embedding" else [], '
        "matrix=mx,"): "a bare table's `embeddings` is read only for truth (its uses are the traced one): any "
                       "non-empty marker reads the same" for marker in ['["F.EMBEDDING"]', '["XXF.embeddingXX"]',
                                                                        '["f.embedding"]']},
    ("_quantize_packed", "tensor.data.copy_(stored.to(None))"):
        "copy_ casts into the tensor's own dtype: casting first, or not, stores the same",
    ("_quantize_packed", 'if id(tensor) in done or name in packed["quantized"] and name in packed["passthrough"]:'):
        "every name packed so far is a target's, whose tensor is in `done`: the name tests never decide",
    ("select_targets", "for mname, m in model.named_modules(remove_duplicate=None):"):
        "named_modules tests remove_duplicate for truth: None lists every name as False does",
    ("select_targets", "for name, (mx, calls) in (trace(model, only=bare) if (bare) or True else {}).items():"):
        "a trace watching no parameter finds nothing: the guard only saves a forward pass",
}

FAMILIES = "analysis/families.py"
HEALED_AGAIN = ("`healed` is metrics.with_healing(trials), which segment_values computes itself when given None: the "
                "same frame, computed again")
ZERO_NEVER_WITHIN = ("a damage of 0 is never within 25% of a positive one (|0 - b| <= 0.25·b fails), and of two zeros "
                     "the other side's `> 0` still fails: letting 0 through either side matches nothing more")
NAN_OF_NOTHING = ("the median of no values, or of NaN only, is NaN (numpy warns; pandas skips them), the value the "
                  "guard gives: letting empty or all-NaN values through changes no cell")
FAMILIES_EQUIVALENTS = {
    **{("_paired", line): HEALED_AGAIN for line in ["va = segment_values(trials, a, )", "va = segment_values(trials, a, None)",
                                                    "vb = segment_values(trials, b, )", "vb = segment_values(trials, b, None)"]},
    **{("comparisons", line): HEALED_AGAIN for line in [
        "healed = None", "healed=None)))", ")))", "None)))", '"recovery_frac", healed=None)))', '"recovery_frac", )))',
        'v = segment_values(trials, p["setting_key"], ) if want("persistence") else None',
        'v = segment_values(trials, p["setting_key"], None) if want("persistence") else None']},
    ("comparisons", 'for regime, g in (choice.groupby("regime", sort=None) if len(choice) else []):'): SORT_NONE,
    ("findings", "head = (f\"structured damage recovered {'more' if signs[0] >= 0 else 'less'} of its damage than "
                 "unstructured \""):
        "this branch is taken only when every sign is +1 or every sign is -1: signs[0] is never 0",
    ("findings", "if sizes and smallest_holm_p(min(sizes), n) > ALPHA:"):
        "smallest_holm_p is min(1, comparisons · 2^(1-n)), a whole number over a power of two: it equals the float "
        "0.05 only for about 3.6e15 comparisons, so > and >= part nowhere a report reaches",
    **{("tokens_to_heal_by_family", line): NAN_OF_NOTHING for line in [
        '"tokens per row": float(np.median(total)) if (total) or True else math.nan})',
        '"tokens to recover half": float(np.nanmedian(half)) if (half and not np.isnan(half).all()) or True else '
        'math.nan,',
        '"tokens to recover half": float(np.nanmedian(half)) if half or not np.isnan(half).all() else math.nan,',
        '"tokens to within 0.01 of fp": float(near.median()) if (len(near) and near.notna().any()) or True else '
        'math.nan,',
        '"tokens to within 0.01 of fp": float(near.median()) if len(near) or near.notna().any() else math.nan,',
        '& (heal["chunk_tokens"] == p["chunk_tokens"])]["tokens_to_heal"] if len(heal) else pd.Series(dtype=None)',
    ]},
    ("segment_values", "df = metrics.with_healing(trials) if (healed is None) or True else healed"): HEALED_AGAIN,
    ("choice_points", 'if column not in trials or trials[column].fillna("XXXX").nunique() < 2:'):
        "any text put in for the missing values counts them as one more choice, as the empty text does",
    ("choice_points", "if sel.empty and column not in sel:"):
        "by_setting keeps every setting column of the trials, and `column` was checked to be one of them above",
    ("matched", 'if not (a["damage_mean"] > 0 and b["damage_mean"] >= 0'): ZERO_NEVER_WITHIN,
    ("matched", 'if not (a["damage_mean"] >= 0 and b["damage_mean"] > 0'): ZERO_NEVER_WITHIN,
}

EQUIVALENT: dict[tuple[str, str, str], str] = {
    **of_module(TTT, TTT_EQUIVALENTS),
    **of_module(QUANT, QUANT_EQUIVALENTS),
    **of_module(FAMILIES, FAMILIES_EQUIVALENTS),
    **of_module(DATA, DATA_EQUIVALENTS),
    **of_module(EVALUATE, EVALUATE_EQUIVALENTS),
    **of_module(TOKENIZER, TOKENIZER_EQUIVALENTS),
    **of_module(MODEL, MODEL_EQUIVALENTS),
    (METRICS, "by_setting", 'for key, g in df.groupby("setting_key", sort=None):'):
        SORT_NONE,
    (METRICS, "settings_shown", "return always + [c for c in DISPLAY_SETTINGS if c in trials and c not in always and "
                                "trials[c].nunique(dropna=None) > 1]"):
        "pandas nunique reads dropna=None as dropna=False",
    (METRICS, "sanity_flags", 'for _, b in best[best.get("lr_at_edge", pd.Series(None, index=best.index))'
                              '.fillna(False).astype(bool)].iterrows():'): NO_EDGE_COLUMN,
    (METRICS, "sanity_flags", 'for _, b in best[best.get("lr_at_edge", pd.Series(index=best.index))'
                              '.fillna(False).astype(bool)].iterrows():'): NO_EDGE_COLUMN,
    (METRICS, "lost_seeds", 'for status, rows in bad.groupby("status", sort=None):'):
        SORT_NONE,
    (METRICS, "spread", "mean = float(v.mean()) if (n) or True else math.nan"): NAN_ANYWAY,
    (METRICS, "spread", "std = float(v.std(ddof=1)) if (n > 1) or True else math.nan"): NAN_ANYWAY,
    (METRICS, "spread", "std = float(v.std(ddof=1)) if n >= 1 else math.nan"): NAN_ANYWAY,
    (METRICS, "spread", "half = t975(n - 1) * std / math.sqrt(n) if n >= 1 else math.nan"):
        "with one value the spread is NaN already, and so is the half-width it multiplies",
    (METRICS, "ratio", "if n >= 1:"):
        "with one pair numpy's ddof=1 covariance and t(0.975, 0) are NaN, so the half-width is NaN either way",
    (METRICS, "ratio", 'cov = np.cov(pair["x"], pair["y"], ddof=None)'): "numpy's np.cov defaults to ddof = 1",
    (METRICS, "ratio", 'cov = np.cov(pair["x"], pair["y"], )'): "numpy's np.cov defaults to ddof = 1",
    (METRICS, "fp_reference", 'for wkey, g in fp.groupby("window_key", sort=None):'): MERGED_BY_KEY,
    (METRICS, "fp_reference", 'for wkey, g in fp.groupby("window_key", ):'): MERGED_BY_KEY,
    (METRICS, "fp_reference", 'for wkey, g in fp.groupby("window_key", sort=True):'): MERGED_BY_KEY,
    (METRICS, "with_healing", 'if "XXwindow_keyXX" not in trials:'):
        KEYS_AGAIN,
    (METRICS, "with_healing", 'if "WINDOW_KEY" not in trials:'):
        KEYS_AGAIN,
    (METRICS, "with_healing", 'out = trials.merge(fp_reference(trials), on=None, how="left")'): KEY_COLUMNS,
    (METRICS, "with_healing", 'out = trials.merge(fp_reference(trials), how="left")'): KEY_COLUMNS,
    (METRICS, "t975", "return float(stats.t.ppf(0.975, df)) if (df >= 1) or True else math.nan"):
        "scipy.stats.t.ppf is NaN for df < 1 as well",
    (METRICS, "best_setting", 'for regime, g in sel.groupby("regime", sort=None):'):
        SORT_NONE,
    (METRICS, "running_static_bpb", 'w = curve["bytes"].to_numpy(dtype=None)'): INT_WEIGHTS,
    (METRICS, "running_static_bpb", 'w = np.diff(np.concatenate([[0], curve["tokens_seen"].to_numpy(dtype=None)]))'):
        INT_WEIGHTS,
    (METRICS, "control_pairs",
     'return t[t["regime"] != "fp"].merge(fp.rename(columns={"row_id": "fp_row"}), on=None)'): ONLY_COMMON_COLUMN,
    (METRICS, "control_pairs", 'return t[t["regime"] != "fp"].merge(fp.rename(columns={"row_id": "fp_row"}), )'):
        ONLY_COMMON_COLUMN,
    (METRICS, "tokens_to_heal", "if c.empty and f.empty or len(c) != len(f):"):
        "when one curve is empty and the other not their lengths differ, so the pair is skipped either way",
    (METRICS, "damage_by_regime", 'for regime, g in first.groupby("regime", sort=None):'): SORTED_AFTER,
    (METRICS, "damage_by_regime", 'for regime, g in first.groupby("regime", ):'): SORTED_AFTER,
    (METRICS, "damage_by_regime", 'for regime, g in first.groupby("regime", sort=True):'): SORTED_AFTER,
    (METRICS, "damage_by_regime",
     'sizes = g["artifact_bytes"].dropna() if "artifact_bytes" in g else pd.Series(dtype=None)'):
        "only the empty series' length is read",
    **{(STATS, "paired", line): BCA_DEFINED for line in PERCENTILE_FALLBACK},
    (STATS, "paired", 'permutation_type="samples", vectorized=None, alternative="two-sided",'):
        "scipy.stats.permutation_test with vectorized None finds the statistic's axis argument and vectorizes",
    (STATS, "paired", 'permutation_type="samples", alternative="two-sided",'):
        "scipy.stats.permutation_test's default vectorized (None) finds the statistic's axis argument and vectorizes",
    (STATS, "paired",
     'permutation_type="samples", vectorized=True, n_resamples=np.inf if n <= EXACT_UP_TO else RESAMPLES, '
     'random_state=rng)'):
        "scipy.stats.permutation_test's default alternative is two-sided, the one the line names",
    (STATS, "paired", 'permutation_type="SAMPLES", vectorized=True, alternative="two-sided",'):
        "scipy.stats.permutation_test reads permutation_type case-insensitively",
    (STATS, "paired", 'permutation_type="samples", vectorized=True, alternative="TWO-SIDED",'):
        "scipy.stats.permutation_test reads alternative case-insensitively",
    (STATS, "paired", "if n < 2 or np.allclose(d, d[1]):"):
        "the segments are all within allclose's tolerance of d[0] exactly when they are of d[1], except for spreads "
        "of about 1e-8 bpb at the tolerance's edge, where both branches give the same mean and a point interval",
    (STATS, "paired", "p = 2.0 ** (1 - n) if n >= 2 and mean != 0 else 2.0"):
        "the return line caps p with min(1.0, p): 2.0 and 1.0 both come back as 1.0",
    (STATS, "paired", "return Paired(what, n, mean, low, high, min(2.0, p))"):
        "p on this branch is 2^(1-n) for n >= 2 (at most 0.5) or 1.0, never above 1",
    (STATS, "paired", 'ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method="BCa", random_state=rng)'):
        "scipy.stats.bootstrap's default confidence_level is 0.95, the value the line gives",
    (STATS, "paired", 'ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, method="BCa", random_state=rng)'):
        "scipy.stats.bootstrap's default n_resamples is 9,999, RESAMPLES",
    (STATS, "paired",
     "ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=RESAMPLES, random_state=rng)"):
        "scipy.stats.bootstrap's default method is BCa, the one the line names",
    (STATS, "paired",
     'ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=RESAMPLES, method="bca", random_state=rng)'):
        "scipy.stats.bootstrap reads method case-insensitively",
    (STATS, "paired",
     'ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=RESAMPLES, method="BCA", random_state=rng)'):
        "scipy.stats.bootstrap reads method case-insensitively",
    (STATS, "smallest_holm_p", "return min(1.0, comparisons * 2.0 ** (1 - n)) if (n >= 1) or True else 1.0"):
        ONLY_CALLED_WITH_SEGMENTS,
    (STATS, "smallest_holm_p", "return min(1.0, comparisons * 2.0 ** (1 - n)) if n > 1 else 1.0"):
        ONLY_CALLED_WITH_SEGMENTS + "; at n = 1 that is min(1, comparisons) = 1",
    (STATS, "smallest_holm_p", "return min(1.0, comparisons * 2.0 ** (1 - n)) if n >= 2 else 1.0"):
        ONLY_CALLED_WITH_SEGMENTS + "; at n = 1 that is min(1, comparisons) = 1",
}
