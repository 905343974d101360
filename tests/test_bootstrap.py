"""The teachers stage: tokenizer on oracle renders, oracle shards, reference-teacher
checks against real model directories and a real HTTP endpoint, resumable training."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from gen_fixtures import tiny_model_dir

from distill import teachers as bootstrap
from distill.errors import UserError
from distill.recipe.schema import validate
from teachers.base import get_domain

pytestmark = pytest.mark.integration


def micro_recipe(tmp_path, domains=("math", "logic"), **teacher):
    t = {
        "kind": "bootstrap",
        "oracle_tasks": 24,
        "arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train": {
            "max_steps": 3,
            "warmup_steps": 0,
            "batch_tokens": 1024,
            "micro_batch_tokens": 1024,
            "max_length": 512,
            "logging_steps": 1,
        },
    }
    t.update(teacher)
    return validate(
        {
            "name": "micro",
            "output_dir": str(tmp_path / "run"),
            "tokenizer": {"kind": "train", "vocab_size": 320, "corpus_tasks": 20},
            "domains": {d: {"difficulty": 1} for d in domains},
            "teachers": {d: t for d in domains},
        }
    )


def test_tokenizer_learns_the_rendered_oracle_text_and_is_reused(tmp_path):
    from transformers import AutoTokenizer

    from distill.chat.template import CHAT_TEMPLATE

    r = micro_recipe(tmp_path, domains=("math", "agents"))
    out = bootstrap.build_tokenizer(r)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|end|>"
    dom = get_domain("agents")
    task = next(iter(dom.tasks("train", 1, 0, 1)))
    text = bootstrap.render_text(dom.oracle(task), task.tools)
    assert (
        '<tool_call>{"name": ' in text and "tools: balance(" in text
    )  # tool signatures rendered too
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # merges learned on the corpus: far fewer tokens than bytes
    assert len(ids) < 0.6 * len(text.encode())
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    bootstrap.build_tokenizer(r)
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    r2 = micro_recipe(tmp_path, domains=("math", "agents")).model_copy(deep=True)
    r2.tokenizer.vocab_size = 330
    bootstrap.build_tokenizer(r2)
    record = r2.out / "runs" / "tokenizer" / "_tokenizer.json"  # its record: in the run dir
    assert json.loads(record.read_text())["vocab"] > 320


def test_oracle_shards_load_with_datasets_and_verify(tmp_path):
    import datasets

    r = micro_recipe(tmp_path)
    d = tmp_path / "oracle"
    rows = bootstrap.write_oracle_shards(r, "logic", d, "fp1")
    assert rows == 24
    ds = datasets.load_dataset(
        "arrow", data_files=[str(p) for p in sorted(d.glob("*.arrow"))], split="train"
    )
    assert len(ds) == 24 and set(ds["domain"]) == {"logic"} and len(set(ds["task_id"])) == 24
    dom = get_domain("logic")
    tasks = {t.id: t for t in dom.tasks("train", 24, 0, 1)}
    from distill.shards import iter_traces

    for tr in iter_traces(d):
        assert tr.verdict.passed and dom.verify(tasks[tr.task_id], tr.messages).passed
    # resumed: nothing is written twice
    assert bootstrap.write_oracle_shards(r, "logic", d, "fp1") == 24


def oracle_rows(tmp_path, domain: str, n: int = 24, **teacher):
    """The oracle shard rows of ``n`` tasks of a micro recipe, and those tasks by id."""
    from distill.shards import iter_traces

    r = micro_recipe(tmp_path, domains=(domain,), oracle_tasks=n, **teacher)
    d = tmp_path / "oracle"
    assert bootstrap.write_oracle_shards(r, domain, d, "fp1") == n
    tasks = {t.id: t for t in get_domain(domain).tasks("train", n, 0, 1)}
    return list(iter_traces(d)), tasks


def test_short_prompt_share_cuts_system_and_tools_from_that_share_of_the_oracle(tmp_path):
    rows, tasks = oracle_rows(tmp_path, "agents", oracle_short_prompt_share=0.25)
    dom = get_domain("agents")
    short = 0
    for tr in rows:
        roles = [m["role"] for m in tr.messages]
        if tr.tools is None:  # short: the user turn first, the rest as the oracle wrote it
            short += 1
            assert roles[0] == "user" and "system" not in roles
        else:
            assert roles[0] == "system" and tr.tools == tasks[tr.task_id].tools
        assert dom.verify(tasks[tr.task_id], tr.messages).passed
    assert short == 6  # which rows: tests/test_packing.py checks short_prompt_at


@pytest.mark.parametrize("domain", ["math", "code", "logic", "agents"])
def test_the_oracle_self_check_is_correct_longer_and_only_where_asked(domain):
    from teachers.base import check_at

    dom = get_domain(domain)
    for task in dom.tasks("train", 40, 0, 3):
        plain, checked = dom.oracle(task), dom.oracle(task, check=True)
        assert dom.verify(task, checked).passed

        def checks(trace):
            return str([m for m in trace if m["role"] == "assistant"]).count("Check")

        assert len(str(checked)) > len(str(plain)) and checks(checked) > checks(plain)
        assert dom.oracle(task, check=False) == plain  # the default trace is unchanged
    ids = [f"t{i}" for i in range(4000)]
    share = sum(check_at(i, 0.6) for i in ids) / len(ids)
    assert abs(share - 0.6) < 0.03 and [check_at(i, 0.6) for i in ids[:50]] == [
        check_at(i, 0.6) for i in ids[:50]
    ]
    assert not any(check_at(i, 0.0) for i in ids) and all(check_at(i, 1.0) for i in ids)


def test_oracle_check_share_writes_that_share_of_checked_traces(tmp_path):
    from teachers.base import check_at

    rows, tasks = oracle_rows(tmp_path, "logic", 60, oracle_check_share=0.5)
    r = micro_recipe(tmp_path, domains=("logic",), oracle_tasks=60, oracle_check_share=0.5)
    dom = get_domain("logic")
    checked = 0
    for tr in rows:
        has = "\nCheck: " in tr.messages[-1]["reasoning_content"]
        assert (
            has == check_at(tr.task_id, 0.5) and dom.verify(tasks[tr.task_id], tr.messages).passed
        )
        checked += has
    assert 15 <= checked <= 45
    # the tokenizer's corpus follows the share, and its fingerprint changes with it
    plain = micro_recipe(tmp_path, domains=("logic",), oracle_tasks=60)
    assert bootstrap._corpus_fingerprint(r) != bootstrap._corpus_fingerprint(plain)


def test_teacher_and_student_short_prompts_are_the_same_cut(tmp_path):
    """oracle_short_prompt_share cuts the oracle shards where the student's
    short_prompt_share cuts its tokenized rows (both call teachers.base.shorten_prompt):
    short shards tokenize exactly as full shards tokenized with the same share."""
    import numpy as np
    from tiny_artifacts import make_tokenizer

    from distill.train.data import tokenize_domain

    cut, full = tmp_path / "cut", tmp_path / "full"
    share = 0.25
    short = micro_recipe(tmp_path, domains=("agents",), oracle_short_prompt_share=share)
    bootstrap.write_oracle_shards(short, "agents", cut, "fp1")
    whole = micro_recipe(tmp_path, domains=("agents",))
    bootstrap.write_oracle_shards(whole, "agents", full, "fp1")
    tok = make_tokenizer(tmp_path / "tok")
    a = tokenize_domain("agents", cut, tok, 4096, tmp_path / "cache")
    b = tokenize_domain("agents", full, tok, 4096, tmp_path / "cache", short_share=share)
    c = tokenize_domain("agents", full, tok, 4096, tmp_path / "cache")
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask)
    assert len(a.ids) < len(c.ids)  # the cut took something out


def test_arch_initializer_range_sets_the_initial_weights(tmp_path):
    from distill.chat.template import train_tokenizer
    from distill.models import build_model
    from distill.recipe.schema import ModelArch

    tok = train_tokenizer(["What is 1 + 2? Answer: 3"] * 20, 300, tmp_path / "tok")
    stds = [
        build_model(ModelArch(hidden_size=32, num_layers=1, num_heads=2, initializer_range=r), tok)
        .get_input_embeddings()
        .weight.std()
        .item()
        for r in (0.02, 0.1)
    ]
    assert stds[0] == pytest.approx(0.02, rel=0.15) and stds[1] == pytest.approx(0.1, rel=0.15)


def test_hf_teacher_check_loads_a_real_directory_and_names_a_broken_one(tmp_path):
    d = tiny_model_dir(tmp_path / "hf", corpus=["What is 1 + 2? \\boxed{3}"])
    info = bootstrap.check_hf("math", str(d))
    assert info["params"] > 10_000
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        UserError, match=r"teachers\.code\.path: cannot load an HF causal LM from .*empty"
    ):
        bootstrap.check_hf("code", str(tmp_path / "empty"))


class _Models(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "served-model"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_openai_teacher_check_makes_one_real_request(tmp_path):
    from distill.recipe.schema import TeacherConfig

    server = HTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        ok = bootstrap.check_openai(
            "code", TeacherConfig(kind="openai", base_url=url, model="served-model")
        )
        assert ok["model"] == "served-model"
        with pytest.raises(UserError, match="'other' is not served"):
            bootstrap.check_openai(
                "code", TeacherConfig(kind="openai", base_url=url, model="other")
            )
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(UserError, match=r"teachers\.code\.base_url: endpoint .* does not answer"):
        bootstrap.check_openai(
            "code", TeacherConfig(kind="openai", base_url=url, model="served-model")
        )
    with pytest.raises(UserError, match="NO_SUCH_KEY_ENV is not set"):
        bootstrap.check_openai(
            "code",
            TeacherConfig(kind="openai", base_url=url, model="m", api_key_env="NO_SUCH_KEY_ENV"),
        )


def test_teachers_trained_in_parallel_processes_equal_one_by_one(tmp_path, monkeypatch):
    """Two teachers side by side (one spawned process each, one thread) give the very
    weights of training them one after another in this process."""
    import hashlib

    def weights(recipe):
        return {
            d: hashlib.sha256(
                (recipe.out / "teachers" / d / "model.safetensors").read_bytes()
            ).hexdigest()
            for d in ("math", "logic")
        }

    par = micro_recipe(tmp_path / "par")
    monkeypatch.setattr(bootstrap, "_parallel_ok", lambda domains: True)
    bootstrap.run(par)
    assert (par.out / "runs" / "teachers" / "math" / "train.log").stat().st_size > 0
    seq = micro_recipe(tmp_path / "seq")
    monkeypatch.setattr(bootstrap, "_parallel_ok", lambda domains: False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' thread count, here too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # SDPA's CPU backward sums in a thread-count-dependent order
    try:
        bootstrap.run(seq)
    finally:
        torch.set_num_threads(threads)
    assert weights(par) == weights(seq)


def test_a_tokenizer_that_fails_while_teachers_write_their_data_stops_the_stage(
    tmp_path, monkeypatch
):
    """The parallel stage builds the tokenizer while the teachers write their oracle
    shards: when it fails, its error is the one told and no teacher trains."""
    recipe = micro_recipe(tmp_path)
    monkeypatch.setattr(bootstrap, "_parallel_ok", lambda domains: True)

    def broken(recipe, force=False):
        raise UserError("tokenizer.vocab_size: too small (planted)")

    monkeypatch.setattr(bootstrap, "build_tokenizer", broken)
    with pytest.raises(UserError, match="planted"):
        bootstrap.run(recipe)
    for d in ("math", "logic"):
        run = recipe.out / "runs" / "teachers" / d
        assert (run / "oracle" / "_manifest.json").exists()  # written meanwhile
        assert "training on" not in (run / "train.log").read_text()
        assert not (recipe.out / "teachers" / d / "model.safetensors").exists()


def test_teacher_processes_share_the_gpus_round_robin(tmp_path, monkeypatch):
    """With GPUs every teacher gets its own process, each on one GPU in turn (within what
    CUDA_VISIBLE_DEVICES already allows); on CPU one process per core."""
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert bootstrap._workers(4) == (4, 2)
    assert bootstrap._parallel_ok(["math", "code"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # under accelerate launch the launcher owns them
    assert not bootstrap._parallel_ok(["math", "code"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bootstrap._workers(4)[0] == min(4, os.cpu_count() or 1)

    seen = {}
    monkeypatch.setattr(
        bootstrap,
        "train_bootstrap",
        lambda recipe, d, tok, force, ready: seen.setdefault(d, os.environ["CUDA_VISIBLE_DEVICES"]),
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads, fds = torch.get_num_threads(), (os.dup(1), os.dup(2))
    try:  # the worker sends its fds 1 and 2 to the teacher's log
        bootstrap._train_in_worker(micro_recipe(tmp_path), "math", tmp_path, False, gpu=1)
    finally:
        os.dup2(fds[0], 1), os.dup2(fds[1], 2)
        torch.set_num_threads(threads)
    assert seen == {"math": "7"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teachers_train_side_by_side_on_a_gpu(tmp_path):
    """On a GPU the stage trains every teacher at once, each process on the GPU."""
    recipe = micro_recipe(tmp_path)
    assert bootstrap._parallel_ok(["math", "logic"])
    bootstrap.run(recipe)
    for d in ("math", "logic"):
        out = recipe.out / "runs" / "teachers" / d
        report = json.loads((out / "train_report.json").read_text())
        assert report["mfu"] is not None and report["peak_memory_bytes"] > 0  # a CUDA run
        assert (out / "train.log").stat().st_size > 0


def test_a_plugin_oracle_without_check_is_asked_plainly_and_refused_a_check_by_name():
    from teachers.base import oracle_messages

    class Plain:
        name = "plain"

        def oracle(self, task):
            return [{"role": "user", "content": task}]

    assert oracle_messages(Plain(), "hi") == [{"role": "user", "content": "hi"}]
    with pytest.raises(UserError, match=r"^teachers\.plain\.oracle_check_share: .*set it to 0"):
        oracle_messages(Plain(), "hi", check=True)


def test_teachers_split_the_cores_for_tokenizing(monkeypatch):
    """Four teachers on a 16-core GPU host tokenize with 4 processes each; the 2-core demo
    machine tokenizes in each teacher's own process (distill/tokenize.py)."""
    import os

    for cores, teachers, want in ((16, 4, 4), (16, 3, 5), (2, 2, 1), (4, 1, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, c=cores: set(range(c)))
        assert bootstrap._tokenize_share(teachers) == want
