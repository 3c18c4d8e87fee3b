"""The data pipeline end to end: corpus, tokenizer, config checks, batches, packing, host sharding,
checkpointable iterator state, mock TFDS data and the error messages.

Everything runs on a 30-file subset of the stdlib corpus and a 1000-piece vocabulary, built once
per module in a temporary TFDS data dir (a few seconds).
"""
import io
import json
import os
import pathlib
import threading
import time

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from configs import base
from moe_jax import checkpoints, configuration, data
from moe_jax.data import corpus, options, sources, tokenizer

MAX_FILES, PIECES = 30, 1000


def make_config(data_dir, **changes):
    """base config on the small corpus; `changes` maps dotted field names to values."""
    config = base.get_config()
    config.data.data_dir, config.data.corpus_max_files, config.data.spm_vocab_size = (
        str(data_dir), MAX_FILES, PIECES)
    config.batch_size, config.seq_len, config.num_eval_steps = 4, 64, 3
    for name, value in changes.items():
        *parents, leaf = name.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def lm_config(data_dir, **changes):
    return make_config(data_dir, **{"model.kind": "decoder", "data.objective": "lm", **changes})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def tok(data_dir):
    return data.get_tokenizer(make_config(data_dir))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------- corpus and tokenizer

def test_corpus_splits_by_file_and_is_cached(data_dir, tok):
    builder = corpus.prepare(str(data_dir), MAX_FILES)
    assert builder.info.file_format.value == "array_record"
    train, validation = (builder.as_data_source(split=s) for s in ("train", "validation"))
    train_files = {train[i]["path"] for i in range(len(train))}
    validation_files = {validation[i]["path"] for i in range(len(validation))}
    assert train_files and validation_files and not train_files & validation_files
    assert len(train_files | validation_files) <= MAX_FILES
    stamp = os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json"))
    corpus.prepare(str(data_dir), MAX_FILES)  # reuses the prepared files
    assert os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json")) == stamp


def test_split_source_cuts_at_statements_and_loses_nothing():
    text = "".join(f"def f{i}():\n    return {i}\n\n" for i in range(300))
    pieces = corpus.split_source(text, piece_chars=200)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.startswith("def ") for p in pieces)


def test_tokenizer_conventions_and_exact_round_trip(tok, data_dir):
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.base_vocab_size == PIECES and tok.vocab_size == PIECES + 100
    assert tok.sentinel(0) == PIECES + 99 and tok.sentinel(99) == PIECES
    text = 'class A:\n    """Docstring, with  two spaces."""\n\tx = "é€"\n'
    ids = tok.encode(text)
    assert 0 not in ids and 1 not in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids + [1, 7, 7]) == text  # stops at eos
    assert tok.decode([tok.sentinel(2)] + ids[:1] + [0]) == "<extra_id_2>" + tok.decode(ids[:1])
    assert tok.decode([PIECES + 100]) == f"<id_{PIECES + 100}>"  # the model's padded, unused ids
    assert tok.path.startswith(str(data_dir)) and os.path.exists(tok.path)
    assert data.get_tokenizer(make_config(data_dir)).encode(text) == ids  # the cached model is reused


def test_vocab_size_must_cover_tokenizer_and_extra_ids(data_dir, tok):
    with pytest.raises(ValueError, match=r"model\.vocab_size=1050 .*data\.extra_ids=100"):
        data.get_tokenizer(make_config(data_dir, **{"model.vocab_size": 1050, "data.tokenizer": tok.path}))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_tokenizer_file_names_the_file(tmp_path, tok, damage):
    content = open(tok.path, "rb").read()
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model" if damage == "garbage" else content[:len(content) // 3])
    with pytest.raises(ValueError, match=r"data\.tokenizer: .*bad\.model is not a valid SentencePiece") as e:
        tokenizer.load(str(bad), 100)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no library stack trace chained
    with pytest.raises(ValueError, match="no SentencePiece model at"):
        tokenizer.load(str(tmp_path / "missing.model"), 100)


def test_tokenizer_with_other_special_ids_is_refused(tmp_path):
    lines = [f"line {i} of a tiny corpus" for i in range(300)]
    model = io.BytesIO()  # SentencePiece's defaults (LLaMA's too): unk 0, bos 1, eos 2, no pad
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=40,
                                   minloglevel=2)
    (tmp_path / "llama_like.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"llama_like\.model has pad id -1 and eos id 2; .* pad=0, eos=1"):
        tokenizer.load(str(tmp_path / "llama_like.model"), 100)


def test_too_large_vocabulary_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"data\.spm_vocab_size=50000: SentencePiece could not train"):
        tokenizer.train([f"line {i} of a tiny corpus" for i in range(300)], 50000, str(tmp_path / "x.model"))
    assert not (tmp_path / "x.model").exists()


# ---------------------------------------------------------------- config checks

@pytest.mark.parametrize("changes, message", [
    ({"data.dataset": "C4 English"}, r"data\.dataset must be 'default' .* or a TFDS name"),
    ({"data.objective": "mlm"}, r"data\.objective must be one of \('lm', 'span_corruption', 'seq2seq'\)"),
    ({"data.objective": "lm"}, r"data\.objective='lm' needs model\.kind='decoder'"),
    ({"model.kind": "decoder"}, r"data\.objective='span_corruption' needs model\.kind='encoder_decoder'"),
    ({"batch_size": 6}, r"batch_size=6 must be divisible by the number of hosts \(4\)"),
    ({"target_seq_len": 10}, r"target_seq_len=10 is too short for seq_len=64 .* needs >= 14"),
    ({"data.extra_ids": 2}, r"data\.extra_ids=2 is too few: .* uses up to 3 sentinels"),
    ({"data.noise_density": 1.5}, r"data\.noise_density must be in \(0, 1\)"),
    ({"seq_len": 1}, r"seq_len must be an int >= 2"),
    ({"data.shards": 3}, r"data\.shards=3 must divide batch_size=4"),
    ({"data.shards": 2}, r"data\.shards=2 must be a multiple of the 4 hosts"),
    ({"data.shards": -1}, r"data\.shards must be an int >= 0"),
])
def test_config_errors_name_the_field(data_dir, changes, message):
    with pytest.raises(ValueError, match=message):
        options.plan(make_config(data_dir, **changes), process_count=4)


def test_derived_target_length_is_t5s():
    config = base.get_config()
    config.seq_len = 512
    assert options.plan(config).targets_len == 114 and options.plan(config).raw_len == 568


# ---------------------------------------------------------------- batches

def check_packed_rows(tokens, segments, positions):
    """Invariants of packed [B, L] rows: padding only at the end, positions restart per segment."""
    for tok_row, seg_row, pos_row in zip(tokens, segments, positions):
        used = seg_row > 0
        n = used.sum()
        assert used[:n].all() and not used[n:].any()  # padding at the end
        assert (tok_row[~used] == 0).all() and (tok_row[used] != 0).all() and (pos_row[~used] == 0).all()
        segs = seg_row[:n]
        assert segs[0] == 1 and set(np.diff(segs)) <= {0, 1}  # segments 1, 2, ... in order
        for s in np.unique(segs):
            np.testing.assert_array_equal(pos_row[:n][segs == s], np.arange((segs == s).sum()))


def test_lm_batches(data_dir, tok):
    batches = take(data.train_iterator(lm_config(data_dir), tok), 4)
    for b in batches:
        assert set(b) == {"decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                          "decoder_positions", "decoder_loss_weights"}
        assert all(v.shape == (4, 64) for v in b.values())
        assert b["decoder_target_tokens"].dtype == np.int32 and b["decoder_loss_weights"].dtype == np.float32
        check_packed_rows(b["decoder_target_tokens"], b["decoder_segment_ids"], b["decoder_positions"])
        np.testing.assert_array_equal(b["decoder_loss_weights"], b["decoder_segment_ids"] > 0)
        inputs, targets, positions = (b["decoder_input_tokens"], b["decoder_target_tokens"],
                                      b["decoder_positions"])
        assert (inputs[positions == 0] == 0).all()  # 0 at each segment start
        following = (positions[:, 1:] > 0)
        np.testing.assert_array_equal(inputs[:, 1:][following], targets[:, :-1][following])
    assert (np.stack([b["decoder_segment_ids"] for b in batches]) > 0).mean() > 0.9  # packing fills rows


@pytest.mark.parametrize("make", [make_config, lm_config], ids=["span_corruption", "lm"])
def test_the_family_declares_the_batches_the_pipeline_makes(data_dir, tok, make):
    """model.kind's family (moe_jax.models.families) is what the compile check and the benchmarks
    shape their batches by: it must be exactly what the data pipeline yields."""
    config = make(data_dir)
    family = configuration.validate(config).family
    plan = options.plan(config)
    batch = next(data.train_iterator(config, tok))
    declared = family.feature_shapes(config.batch_size, plan.inputs_len, plan.targets_len)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == declared


def test_span_corruption_batches_reconstruct_the_text(data_dir, tok):
    source = sources.open_split("default", "train", str(data_dir), "text", split_field="data.train_split",
                                max_files=MAX_FILES)
    full_text = "".join(sources.text_of(source[i], "text") for i in range(len(source)))
    for b in take(data.train_iterator(make_config(data_dir), tok), 3):
        assert b["encoder_input_tokens"].shape == (4, 64) and b["decoder_target_tokens"].shape == (4, 14)
        check_packed_rows(b["encoder_input_tokens"], b["encoder_segment_ids"], b["encoder_positions"])
        check_packed_rows(b["decoder_target_tokens"], b["decoder_segment_ids"], b["decoder_positions"])
        for row in range(4):
            enc_seg, dec_seg = b["encoder_segment_ids"][row], b["decoder_segment_ids"][row]
            assert set(enc_seg) == set(dec_seg)  # every example has its inputs and targets in one row
            for s in set(enc_seg) - {0}:
                inputs = b["encoder_input_tokens"][row][enc_seg == s]
                targets = b["decoder_target_tokens"][row][dec_seg == s]
                assert inputs[-1] == 1 and targets[-1] == 1
                sentinels = inputs[inputs >= PIECES]
                np.testing.assert_array_equal(sentinels, tok.sentinel(np.arange(len(sentinels))))
                spans = np.split(targets[:-1], np.flatnonzero(targets[:-1] >= PIECES))[1:]
                fill = {int(span[0]): span[1:].tolist() for span in spans}
                original = [t for i in inputs[:-1] for t in (fill[int(i)] if i >= PIECES else [int(i)])]
                text = tok.decode(original)
                assert "\ufffd" in text or text in full_text  # (a chunk may split a multi-byte character)
                noise = sum(len(v) for v in fill.values())
                assert noise == round(len(original) * 0.15) or len(original) < 7


def test_without_packing_one_example_per_row(data_dir, tok):
    b = next(data.train_iterator(lm_config(data_dir, **{"data.packing": False}), tok))
    assert set(np.unique(b["decoder_segment_ids"])) <= {0, 1}
    check_packed_rows(b["decoder_target_tokens"], b["decoder_segment_ids"], b["decoder_positions"])


def test_determinism_and_seed(data_dir, tok):
    config = make_config(data_dir)
    assert_batches_equal(take(data.train_iterator(config, tok), 3), take(data.train_iterator(config, tok), 3))
    other = take(data.train_iterator(make_config(data_dir, seed=1), tok), 1)[0]
    first = take(data.train_iterator(config, tok), 1)[0]
    assert not np.array_equal(first["encoder_input_tokens"], other["encoder_input_tokens"])


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2)])
def test_resume_from_saved_state_gives_the_same_batches(data_dir, tok, process_index, process_count):
    config = make_config(data_dir, batch_size=4 * process_count)
    it = data.train_iterator(config, tok, process_index, process_count)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = take(it, 4)
    resumed = data.train_iterator(config, tok, process_index, process_count)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), expected)


def test_eval_batches_are_fixed(data_dir, tok):
    config = make_config(data_dir)
    batches = data.eval_batches(config, tok)
    assert len(batches) == 3
    first = list(batches)
    assert len(first) == 3
    assert_batches_equal(list(batches), first)
    assert_batches_equal(list(data.eval_batches(config, tok)), first)
    train = next(data.train_iterator(config, tok))
    assert not np.array_equal(train["encoder_input_tokens"], first[0]["encoder_input_tokens"])


def hosts_batches(config, tok, hosts: int, n: int, states=None) -> tuple[list[dict], list]:
    """n global batches read by `hosts` hosts (their rows concatenated in host order), starting from
    the hosts' saved `states` if given; and the hosts' states after them."""
    iterators = [data.train_iterator(config, tok, h, hosts) for h in range(hosts)]
    for it, state in zip(iterators, states or ()):
        it.set_state(state)
    batches = [[next(it) for it in iterators] for _ in range(n)]
    joined = [{k: np.concatenate([b[k] for b in step]) for k in step[0]} for step in batches]
    return joined, [json.loads(json.dumps(it.get_state())) for it in iterators]


def test_fixed_shards_give_the_same_batches_on_any_host_count(data_dir, tok):
    """With data.shards = 4 the global batch is the same on 1, 2 and 4 hosts, train and eval, and a
    data state saved by 2 hosts resumes on 1 or 4 (checkpoints.regroup_host_states)."""
    config = lm_config(data_dir, batch_size=8, **{"data.shards": 4})
    one, _ = hosts_batches(config, tok, 1, 4)
    for hosts in (2, 4):
        assert_batches_equal(hosts_batches(config, tok, hosts, 4)[0], one)
        evals = [list(data.eval_batches(config, tok, h, hosts)) for h in range(hosts)]
        joined = [{k: np.concatenate([e[i][k] for e in evals]) for k in evals[0][i]} for i in range(3)]
        assert_batches_equal(joined, list(data.eval_batches(config, tok)))
    _, saved = hosts_batches(config, tok, 2, 2)
    for hosts in (1, 4):
        regrouped = checkpoints.regroup_host_states(saved, hosts, step=2)
        assert_batches_equal(hosts_batches(config, tok, hosts, 2, regrouped)[0], one[2:])
    with pytest.raises(checkpoints.CheckpointError, match=r"data\.shards=4"):
        checkpoints.regroup_host_states(saved, 3, step=2)
    # one shard per host (data.shards = 0): the states name no shards, so no other host count resumes
    _, per_host = hosts_batches(lm_config(data_dir, batch_size=8), tok, 2, 1)
    with pytest.raises(checkpoints.CheckpointError, match="train with a fixed data.shards"):
        checkpoints.regroup_host_states(per_host, 1, step=1)


# ---------------------------------------------------------------- TFDS datasets by name (mocked)

def mock_lm1b_config(data_dir, tok, **changes):
    return lm_config(data_dir, **{"data.dataset": "lm1b", "data.eval_split": "test",
                                  "data.tokenizer": tok.path, "seq_len": 32, **changes})


def rows(batch):
    """The rows of a batch as hashable tuples of target tokens (padding dropped)."""
    return [tuple(r[r > 0]) for r in batch["decoder_target_tokens"]]


def test_two_hosts_split_the_one_host_stream(data_dir, tok):
    with tfds.testing.mock_data(num_examples=64):  # short random sentences: one example each
        one = data.train_iterator(mock_lm1b_config(data_dir, tok, batch_size=8, **{"data.packing": False}),
                                  tok)
        two = [data.train_iterator(mock_lm1b_config(data_dir, tok, batch_size=8, **{"data.packing": False}),
                                   tok, process_index=h, process_count=2) for h in (0, 1)]
        for _ in range(10):  # more than one epoch: each host's share of every epoch
            host_rows = [rows(next(it)) for it in two]
            assert len(host_rows[0]) == len(host_rows[1]) == 4
            assert not set(host_rows[0]) & set(host_rows[1])
            assert sorted(host_rows[0] + host_rows[1]) == sorted(rows(next(one)))
        # packed: still disjoint documents on the two hosts
        packed = [data.train_iterator(mock_lm1b_config(data_dir, tok, batch_size=8), tok, h, 2)
                  for h in (0, 1)]
        segments = [set(), set()]
        for h, it in enumerate(packed):
            for b in take(it, 3):
                for tokens, segs in zip(b["decoder_target_tokens"], b["decoder_segment_ids"]):
                    segments[h] |= {tuple(tokens[segs == s]) for s in set(segs) - {0}}
        assert segments[0] and segments[1] and not segments[0] & segments[1]


def test_mock_tfds_span_corruption_and_eval(data_dir, tok):
    config = make_config(data_dir, **{"data.dataset": "lm1b", "data.eval_split": "test",
                                      "data.tokenizer": tok.path})
    with tfds.testing.mock_data(num_examples=20):
        b = next(data.train_iterator(config, tok))
        assert b["encoder_input_tokens"].shape == (4, 64)
        assert (b["encoder_input_tokens"] >= PIECES).any()  # sentinels
        assert len(list(data.eval_batches(config, tok))) == 3  # 20 short examples, repeated as needed


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path, tok):
    config = lm_config(tmp_path, **{"data.dataset": "lm1b", "data.tokenizer": tok.path})
    with pytest.raises(ValueError, match=rf"(?s)'lm1b' is not prepared there.*tfds build lm1b "
                                         rf"--data_dir={tmp_path} --file_format=array_record"):
        data.train_iterator(config, tok)
    config.data.dataset = "no_such_dataset/en:1.0.0"
    with pytest.raises(ValueError, match=r"(?s)no such TFDS dataset.*tfds build no_such_dataset --config=en"):
        data.train_iterator(config, tok)


def test_wrong_split_and_text_key_are_named(data_dir, tok):
    with pytest.raises(ValueError, match=r"data\.eval_split='test': .* has splits \['train', 'validation'\]"):
        list(data.eval_batches(make_config(data_dir, **{"data.eval_split": "test"}), tok))
    with pytest.raises(ValueError, match=r"data\.text_key='content' is not a feature"):
        data.train_iterator(make_config(data_dir, **{"data.text_key": "content"}), tok)


def test_a_config_missing_a_data_field_is_refused_naming_it():
    config = configuration.load(
        str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "switch_tiny.py"))
    del config.data["noise_density"]
    with pytest.raises(configuration.ConfigError, match="config.data has no field 'noise_density'"):
        configuration.validate(config)


def test_one_builder_at_a_time_serializes_preparation_of_one_directory(tmp_path):
    """Two runs started together (threads here, each with its own lock file handle, as processes
    have) never prepare one builder directory at once; two directories do not wait for each other."""
    inside, overlaps = [], []

    def prepare(data_dir):
        with corpus._one_builder_at_a_time(data_dir):
            inside.append(data_dir)
            overlaps.append(inside.count(data_dir) > 1)
            time.sleep(0.2)
            inside.remove(data_dir)
    same = [threading.Thread(target=prepare, args=(str(tmp_path / "a"),)) for _ in range(3)]
    for t in same:
        t.start()
    for t in same:
        t.join()
    assert overlaps == [False, False, False]
    overlaps.clear()
    with corpus._one_builder_at_a_time(str(tmp_path / "a")):  # held: another directory goes ahead
        other = threading.Thread(target=prepare, args=(str(tmp_path / "b"),))
        other.start()
        other.join(timeout=5)
        assert not other.is_alive() and overlaps == [False]
