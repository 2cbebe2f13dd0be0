"""The data modules (trainer/data/tokenizer.py, records.py, chat.py, packing.py, prompts.py): bundled tokenizer
and data, chat masks, packing (shifted labels, seq_lens, dp split, resume) and the RL prompt side."""

import importlib.util
import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch

import cp
from cp.documents import IGNORE_INDEX
from trainer.data.chat import TokenizedDoc, shifted_labels, tokenize_chat, tokenize_sft_records
from trainer.data.packing import PackedLoader
from trainer.rl.prompts import PromptSampler, load_eval_prompts, make_prompts
from trainer.data.records import load_sft_records, to_chat_record
from trainer.data.tokenizer import BUILTIN_TOKENIZER_DIR, load_tokenizer, pad_token_id
from trainer.rl.tasks import ANSWER_FORMAT, SYSTEM_PROMPT, make_examples, task_messages

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4\n<answer>4</answer>"},
        {"role": "user", "content": "And 3 * 3?"},
        {"role": "assistant", "content": "<answer>9</answer>"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


# ---------------------------------------------------------------- tokenizer


def test_builtin_tokenizer_loads_offline_and_round_trips(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(BUILTIN_TOKENIZER_DIR))
    assert len(tok) == len(again) == 512
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and pad_token_id(tok) == tok.pad_token_id
    for text in ["What is 23 + 58?", "<answer>81</answer>", "Grüße, 世界 🙂\n\ttabs  and  spaces ", "z"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]:
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    digits = tok.encode("12345", add_special_tokens=False)
    assert [tok.decode([d]) for d in digits] == list("12345")  # one token per digit


def test_chat_template_is_chatml_with_a_generation_prompt(tok):
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_tokenize_chat_masks_exactly_the_assistant_turns_and_their_end_token(tok):
    ids, mask = tokenize_chat(tok, CHAT)
    assert len(ids) == len(mask) and ids == tok.encode(tok.apply_chat_template(CHAT, tokenize=False),
                                                       add_special_tokens=False)
    spans, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            spans.append(tok.decode(ids[start:i]))
            start = None
    assert spans == [CHAT[2]["content"] + "<|im_end|>", CHAT[4]["content"] + "<|im_end|>"]


def test_templates_without_generation_blocks_get_the_same_mask_from_prefixes(tok):
    plain = load_tokenizer(None)
    plain.chat_template = tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert "{%- generation" not in plain.chat_template
    for messages in (CHAT, CHAT[1:3], task_messages("What is 1 + 2?", "<answer>3</answer>")):
        assert tokenize_chat(plain, messages) == tokenize_chat(tok, messages)


def test_templates_that_render_prefixes_differently_are_refused(tok):
    odd = load_tokenizer(None)
    odd.chat_template = ("{{ messages | length }}|{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="renders a conversation prefix differently"):
        tokenize_chat(odd, CHAT[1:3])
    with pytest.raises(ValueError, match="has no chat template"):
        odd.chat_template = None
        tokenize_chat(odd, CHAT[1:3])


def test_tokenize_chat_truncates_and_rows_without_targets_are_dropped(tok):
    ids, mask = tokenize_chat(tok, CHAT, max_len=7)
    assert len(ids) == len(mask) == 7 and not any(mask)
    docs = tokenize_sft_records(tok, [{"messages": CHAT}, {"messages": CHAT[:2]}], max_len=10_000)
    assert len(docs) == 1 and docs[0].input_ids == tokenize_chat(tok, CHAT)[0]


# ---------------------------------------------------------------- records


def test_builtin_records_are_chat_rows_in_the_answer_format():
    rows = load_sft_records("builtin", limit=50)
    assert len(rows) == 50
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM_PROMPT
        assert row["messages"][2]["content"].endswith("</answer>")


def test_builtin_data_matches_a_fresh_generation_and_eval_is_disjoint():
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_assets.py"
    spec = importlib.util.spec_from_file_location("make_assets", script)
    make_assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_assets)

    fresh = make_assets.sft_rows("mixed", make_assets.SFT_ROWS, make_assets.SFT_SEED)
    assert load_sft_records("builtin") == fresh, "run `python scripts/make_assets.py`"
    arith = [json.loads(line) for line in (script.parents[1] / "trainer" / "data" / "assets" / "small_arith.jsonl").open()]
    assert arith == make_assets.small_arith_rows(make_assets.SMALL_ARITH_SEED), "run `python scripts/make_assets.py`"
    assert len({row["prompt"] for row in arith}) == len(arith), "held-out rows must not repeat training prompts"
    train_prompts = {row["messages"][1]["content"] for row in fresh}
    evals = load_sft_records("builtin", split="eval")
    assert evals and not train_prompts & {row["prompt"] for row in evals}
    assert all(row["messages"][-1]["content"].endswith(ANSWER_FORMAT.format(row["answer"])) for row in evals)


def test_local_jsonl_and_json_sources_and_prompt_completion_rows(tmp_path):
    rows = [{"messages": CHAT[1:3]}, {"prompt": "What is 1 + 1?", "completion": "<answer>2</answer>", "id": 7},
            {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
             "completion": [{"role": "assistant", "content": "a"}]}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows))
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": rows}))
    for source in (jsonl, array, wrapped):
        records = load_sft_records(str(source))
        assert [r["messages"] for r in records] == [
            CHAT[1:3],
            [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "<answer>2</answer>"}],
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}],
        ]
        assert records[1]["id"] == 7
    assert len(load_sft_records(str(jsonl), limit=2)) == 2


def test_bad_sources_and_rows_fail_with_the_fix_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sft_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="is a directory"):
        load_sft_records(str(tmp_path))
    with pytest.raises(ValueError, match="row 0: a row needs `messages` or `prompt` \\+ `completion`"):
        to_chat_record({"text": "hi"}, "row 0")
    with pytest.raises(ValueError, match="message 0 needs a string `role`"):
        to_chat_record({"messages": [{"role": "user", "content": None}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_sft_records(str(bad))
    with pytest.raises(ValueError, match="splits train, eval"):
        load_sft_records("builtin", split="test")


def test_parquet_and_hub_sources_name_the_missing_package(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            load_sft_records(str(tmp_path / "d.parquet"))
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_sft_records("some-org/some-dataset")


class _FakeHubDataset(list):
    def select(self, indices):
        return _FakeHubDataset(self[i] for i in indices)


def test_hub_sources_go_through_datasets_and_its_errors_are_explained(monkeypatch):
    calls = []

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        if name == "org/missing":
            raise ConnectionError("no network")
        return _FakeHubDataset([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    records = load_sft_records("org/chat", split="train_sft", limit=2, subset="default")
    assert calls == [("org/chat", "default", "train_sft")]
    assert [r["messages"][1]["content"] for r in records] == ["a0", "a1"]
    with pytest.raises(RuntimeError, match="could not load Hugging Face dataset 'org/missing'.*no network.*Offline"):
        load_sft_records("org/missing")


# ---------------------------------------------------------------- packing


def test_shifted_labels_keep_only_next_tokens_that_are_targets():
    assert shifted_labels([10, 11, 12, 13], [False, False, True, True]) == [IGNORE_INDEX, 12, 13, IGNORE_INDEX]
    assert shifted_labels([5], [True]) == [IGNORE_INDEX]
    assert shifted_labels([], []) == []


def _synthetic_docs(n=40, seed=0, max_len=30):
    """Documents whose ids name them (doc i holds ids 1000*(i+1) + position), random loss masks."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.randint(1, max_len)
        ids = [1000 * (i + 1) + t for t in range(length)]
        docs.append(TokenizedDoc(ids, [rng.random() < 0.6 for _ in range(length)]))
    return docs


def _rows_as_docs(batch):
    """Split every row by its seq_lens: -> [(doc index or 'pad', ids, labels), ...] (pad ids are < 1000)."""
    out = []
    for b, lens in enumerate(batch.seq_lens):
        start = 0
        for n in lens:
            ids, labels = batch.input_ids[b, start:start + n].tolist(), batch.labels[b, start:start + n].tolist()
            out.append(("pad" if ids[0] < 1000 else ids[0] // 1000 - 1, ids, labels))
            start += n
    return out


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_packed_rows_hold_whole_documents_with_labels_shifted_inside_each(micro_batch_size):
    docs = _synthetic_docs()
    loader = PackedLoader(docs, seq_len=64, micro_batch_size=micro_batch_size, seed=1, pad_token_id=7)
    for _ in range(5):
        batch = loader.next_batch()
        assert batch.input_ids.shape == batch.labels.shape == (micro_batch_size, 64)
        assert batch.input_ids.dtype == batch.labels.dtype == torch.long
        assert all(sum(lens) == 64 and min(lens) > 0 for lens in batch.seq_lens)
        assert batch.num_loss_tokens == int((batch.labels != IGNORE_INDEX).sum())
        for b, lens in enumerate(batch.seq_lens):
            assert int(batch.labels[b, sum(lens) - 1]) == IGNORE_INDEX
        for index, ids, labels in _rows_as_docs(batch):
            if index == "pad":
                assert set(ids) == {7} and set(labels) == {IGNORE_INDEX}
            else:
                doc = docs[index]
                assert ids == doc.input_ids
                assert labels == shifted_labels(doc.input_ids, doc.loss_mask)
                assert labels[-1] == IGNORE_INDEX


def test_a_row_has_at_most_one_pad_document_at_its_end_and_long_documents_are_truncated():
    docs = [TokenizedDoc(list(range(1000, 1050)), [True] * 50), TokenizedDoc([2000, 2001], [False, True])]
    loader = PackedLoader(docs, seq_len=16, seed=0, pad_token_id=0)
    seen = {}
    for _ in range(4):
        batch = loader.next_batch()
        first = int(batch.input_ids[0, 0]) // 1000
        seen[first] = batch.seq_lens[0]
        if first == 1:
            assert batch.labels[0, :16].tolist() == list(range(1001, 1016)) + [IGNORE_INDEX]
    assert seen[1] == [16]  # 50 tokens cut to seq_len; the 2-token doc does not fit after it
    assert seen[2] == [2, 14]  # the short doc, then one pad document (the next epoch starts a new row)


def test_one_epoch_places_every_document_once_and_the_next_epoch_reshuffles():
    docs = _synthetic_docs(n=30)
    loader = PackedLoader(docs, seq_len=48, seed=5, pad_token_id=7)
    orders = {}
    while loader.epoch < 2:
        epoch = loader.epoch
        for index, _, _ in _rows_as_docs(loader.next_batch()):
            if index != "pad":
                orders.setdefault(epoch, []).append(index)
    assert sorted(orders[0]) == list(range(30)) and orders[0] != list(range(30))
    assert sorted(orders[1][:30]) == list(range(30)) and orders[1][:30] != orders[0]


def test_dp_ranks_get_disjoint_rows_whose_union_is_the_single_rank_stream():
    docs = _synthetic_docs(n=60)
    single = PackedLoader(docs, seq_len=40, micro_batch_size=4, seed=3, pad_token_id=7)
    ranks = [PackedLoader(docs, seq_len=40, micro_batch_size=2, dp_rank=r, dp_size=2, seed=3, pad_token_id=7)
             for r in range(2)]
    for _ in range(4):
        full = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        # step k: rows [4k, 4k+4) of the global stream; rank r keeps rows r and r + 2
        assert torch.equal(parts[0].input_ids, full.input_ids[0::2])
        assert torch.equal(parts[1].input_ids, full.input_ids[1::2])
        assert parts[0].seq_lens == full.seq_lens[0::2]
        first = {i for i, _, _ in _rows_as_docs(parts[0])} - {"pad"}
        second = {i for i, _, _ in _rows_as_docs(parts[1])} - {"pad"}
        assert not first & second
        # step_tokens: the document tokens of every dp rank's rows (no padding), the same on each rank
        real = sum(len(ids) for part in parts for i, ids, _ in _rows_as_docs(part) if i != "pad")
        assert parts[0].step_tokens == parts[1].step_tokens == full.step_tokens == real < full.input_ids.numel()


def test_same_seed_same_batches_other_seed_other_batches():
    docs = _synthetic_docs()

    def first_batches(seed):
        loader = PackedLoader(docs, seq_len=32, micro_batch_size=2, seed=seed)
        return [loader.next_batch().input_ids for _ in range(3)]

    assert all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(0)))
    assert not all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(1)))


def test_resume_from_state_dict_continues_with_the_same_batches_across_epochs():
    docs = _synthetic_docs(n=25)
    make = lambda: PackedLoader(docs, seq_len=50, micro_batch_size=2, dp_rank=1, dp_size=2, seed=11,  # noqa: E731
                                pad_token_id=7)
    uninterrupted = make()
    reference = [uninterrupted.next_batch() for _ in range(12)]
    assert uninterrupted.epoch >= 2, "the test should cross epoch boundaries"
    for stop in (1, 5, 9):
        first = make()
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # plain data, survives serialisation
        resumed = make()
        resumed.load_state_dict(state)
        for expected in reference[stop:]:
            batch = resumed.next_batch()
            assert torch.equal(batch.input_ids, expected.input_ids) and torch.equal(batch.labels, expected.labels)
            assert batch.seq_lens == expected.seq_lens
        assert resumed.state_dict() == uninterrupted.state_dict()


def test_resume_refuses_a_position_saved_for_other_data():
    loader = PackedLoader(_synthetic_docs(n=25), seq_len=50, seed=0)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="num_docs was 25 when saved, now 24"):
        PackedLoader(_synthetic_docs(n=24), seq_len=50, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed was 0 when saved, now 1"):
        PackedLoader(_synthetic_docs(n=25), seq_len=50, seed=1).load_state_dict(state)


def test_bad_loader_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="dp_rank"):
        PackedLoader(_synthetic_docs(), seq_len=8, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="data is empty"):
        PackedLoader([([], [])], seq_len=8)
    with pytest.raises(ValueError, match="3 ids but 2 loss-mask"):
        PackedLoader([([1, 2, 3], [True, False])], seq_len=8)


def test_builtin_data_packs_into_batches_that_setup_cp_params_accepts(tok):
    docs = tokenize_sft_records(tok, load_sft_records("builtin", limit=64), max_len=128)
    batch = PackedLoader(docs, seq_len=200, micro_batch_size=2, seed=0, pad_token_id=pad_token_id(tok)).next_batch()
    cp_batch = cp.setup_cp_params(batch.input_ids, labels=batch.labels, seq_lens=batch.seq_lens)
    assert torch.equal(cp_batch.labels, batch.labels)
    starts = [sum(lens[:i]) for lens in batch.seq_lens[:1] for i in range(len(lens))]
    assert all(int(cp_batch.position_ids[0, s]) == 0 for s in starts)
    # the targets are the assistant answers: every target decodes inside "<answer>…</answer><|im_end|>" turns
    targets = tok.decode(batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist())
    assert targets.count("<|im_end|>") == targets.count("</answer>") > 0 and "<|im_start|>" not in targets


# ---------------------------------------------------------------- RL prompts


def test_make_prompts_end_in_the_generation_prompt_and_are_deterministic(tok):
    prompts = make_prompts("add", 8, seed=4, tokenizer=tok)
    assert prompts == make_prompts("add", 8, seed=4, tokenizer=tok)
    examples = make_examples("add", 8, seed=4)
    assert [p.answer for p in prompts] == [ex["answer"] for ex in examples]
    for p, ex in zip(prompts, examples):
        assert p.prompt == ex["prompt"] and p.task == "add"
        text = tok.decode(p.input_ids)
        assert text.endswith(f"<|im_start|>user\n{ex['prompt']}<|im_end|>\n<|im_start|>assistant\n")
        assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")


def test_eval_prompts_load_by_task(tok):
    prompts = load_eval_prompts(tok, tasks=["reverse"], limit=5)
    assert len(prompts) == 5 and {p.task for p in prompts} == {"reverse"}
    assert all(p.answer == p.prompt.split('"')[1][::-1] for p in prompts)


def test_prompt_sampler_splits_dp_ranks_and_resumes(tok):
    prompts = make_prompts("mixed", 10, seed=0, tokenizer=tok)
    ranks = [PromptSampler(prompts, batch_size=3, dp_rank=r, dp_size=2, seed=1) for r in range(2)]
    single = PromptSampler(prompts, batch_size=6, seed=1)
    seen = []
    for _ in range(4):  # 24 prompts: crosses two epoch boundaries
        full = single.next_prompts()
        parts = [s.next_prompts() for s in ranks]
        assert parts[0] == full[0::2] and parts[1] == full[1::2]
        seen += full
    assert {p.prompt for p in seen[:10]} == {p.prompt for p in prompts}  # an epoch is a permutation
    resumed = PromptSampler(prompts, batch_size=3, dp_rank=1, dp_size=2, seed=1)
    resumed.load_state_dict(ranks[1].state_dict())
    assert [resumed.next_prompts() for _ in range(3)] == [ranks[1].next_prompts() for _ in range(3)]
