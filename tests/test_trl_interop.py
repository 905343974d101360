"""A clean shard is OpenAI-format chat data: TRL's SFTTrainer trains on it as it is, read
straight from the Arrow shards or from `distill shards export --format parquet` (trl is a
test-only dependency)."""

from __future__ import annotations

import math

import datasets
import pytest
from tiny_artifacts import ARCH, make_tokenizer, tool_trace

from distill.chat.render import render_text
from distill.messages import Trace, Verdict, to_openai
from distill.models import build_model
from distill.shards import ShardWriter, shard_files
from distill.shards.view import export
from teachers.toolenv import TOOLS  # three tools, each with its own parameters

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    tok = make_tokenizer(root / "tok")
    with ShardWriter(root / "clean" / "agents", max_rows=3) as w:
        w.write(
            Trace(
                id=f"a{i}",
                task_id=f"t{i}",
                domain="agents",
                messages=tool_trace(),
                tools=TOOLS,
                reference={"answer": 85, "state": {"alice": 40}},
                verdict=Verdict.ok(),
            )
            for i in range(4)
        )
    export(root / "clean", "parquet", root / "clean.parquet")
    return root, tok


def _datasets(root):
    cache = str(root / "hf_cache")
    files = [str(p) for p in shard_files(root / "clean" / "agents")]
    arrow = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=cache)
    parquet = datasets.load_dataset(
        "parquet", data_files=str(root / "clean.parquet"), split="train", cache_dir=cache
    )
    return {"arrow": arrow, "parquet": parquet}


def test_shards_read_as_openai_chat_data(clean):
    root, _ = clean
    for name, data in _datasets(root).items():
        row = data[1]
        assert row["tools"] == TOOLS, name  # structured as the API takes them, not JSON text
        assert row["reference"] == {"answer": 85, "state": {"alice": 40}}, name
        call = row["messages"][2]["tool_calls"][0]
        assert call == {
            "id": "c1",
            "type": "function",
            "function": {"name": "calc", "arguments": '{"expr": "12*7"}'},
        }, name


@pytest.mark.parametrize("source", ["arrow", "parquet"])
def test_sft_trainer_trains_on_a_clean_shard_as_is(clean, tmp_path, source):
    from trl import SFTConfig, SFTTrainer

    root, tok = clean
    data = _datasets(root)[source]
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # what our trainer's Accelerator uses on CPU: one process-wide state
        max_length=512,
    )
    model = build_model(ARCH, tok)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    try:
        out = trainer.train()
    finally:  # the Trainer's accelerate state is process-wide: later tests make their own
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert out.global_step == 2 and math.isfinite(out.training_loss)
    # what TRL trained on is the render our trainer uses: tool signatures, nested calls
    # as <tool_call> JSON, the tool result, reasoning of the last user turn only
    ids = trainer.train_dataset[0]["input_ids"]
    want = render_text(tok, to_openai(tool_trace()), tools=TOOLS)
    assert tok.decode(ids) == want
    assert "tools: balance(account: string) Read a balance.;" in want
    assert '<tool_call>{"name": "calc", "arguments": {"expr": "12*7"}}</tool_call>' in want
