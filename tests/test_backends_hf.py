"""The hf backend and its sampler on a tiny random Llama: same tokens as transformers'
own greedy generate, per-row seeds independent of the batch, correct sampling law."""

import pytest
import torch
from gen_fixtures import PROMPT, TOOLS, tiny_model_dir

from distill.backends import Sampling, make_backend
from distill.backends.sample import sample_next, uniform_noise
from distill.errors import UserError

torch.set_num_threads(1)
CONVS = [
    PROMPT,
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the quick brown fox jumps over the lazy dog"},
    ],
    [{"role": "user", "content": "0123"}],
]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    # on the CPU wherever the tests run: they hold the CPU paths to exact equality (the GPU
    # path, bf16 under CUDA graphs, has its own tests)
    path = tiny_model_dir(tmp_path_factory.mktemp("random"))
    b = make_backend(path=path, batch_size=2, device="cpu")
    yield b
    b.close()


def test_uniform_noise_is_deterministic_and_uniform():
    seeds = torch.tensor([1, 2, 1 << 62])
    u = uniform_noise(seeds, 0, 5000)
    assert torch.equal(u, uniform_noise(seeds, 0, 5000))
    assert not torch.equal(u, uniform_noise(seeds, 1, 5000))
    assert not torch.equal(u[0], u[1])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_sampling_follows_softmax_and_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(20000, 1)
    seeds = torch.arange(20000)
    counts = torch.bincount(sample_next(logits, seeds, 0, 1.0, 1.0), minlength=4).float() / 20000
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.015)
    hot = torch.bincount(sample_next(logits, seeds, 0, 2.0, 1.0), minlength=4).float() / 20000
    assert torch.allclose(hot, (logits[0] / 2).softmax(-1), atol=0.015)
    # top_p 0.7: nucleus {0, 1} (0.64 < 0.7 <= 0.87), renormalised
    nuc = torch.bincount(sample_next(logits, seeds, 0, 1.0, 0.7), minlength=4).float() / 20000
    assert nuc[2] == 0 and nuc[3] == 0 and abs(nuc[0].item() - 0.731) < 0.015
    assert sample_next(logits[:3], seeds[:3], 0, 0.0, 1.0).tolist() == [0, 0, 0]


def test_greedy_matches_transformers_generate(backend):
    out = backend.complete(CONVS, [TOOLS, None, None], Sampling(temperature=0, max_new_tokens=10))
    for conv, tools, (c,) in zip(CONVS, [TOOLS, None, None], out, strict=True):
        ids = torch.tensor([backend.render(conv, tools)])
        ref = backend.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
            eos_token_id=backend.eos_ids, pad_token_id=backend.pad_id,
        )[0, ids.shape[1]:].tolist()  # fmt: skip
        assert c.completion_tokens == len(ref)
        assert c.text == backend.tokenizer.decode(ref, skip_special_tokens=False)


def test_seeded_rows_do_not_depend_on_the_batch(backend):
    s = Sampling(temperature=1.0, max_new_tokens=12, seed=1, topk_logprobs=3)
    alone = backend.complete(CONVS[1:2], [None], s, n=2, seeds=[42])
    mixed = backend.complete(CONVS, [TOOLS, None, None], s, n=2, seeds=[7, 42, 9])
    assert [c.text for c in alone[0]] == [c.text for c in mixed[1]]
    assert alone[0][0].text != alone[0][1].text  # samples of one prompt differ
    t = mixed[0][0].topk
    assert len(t) == mixed[0][0].completion_tokens and len(t[0]["ids"]) == 3
    assert t[0]["logprobs"] == sorted(t[0]["logprobs"], reverse=True) and t[0]["logprobs"][0] <= 0


def test_finish_reasons_stop_strings_and_context_limit(backend):
    ((c,),) = backend.complete([PROMPT], [None], Sampling(temperature=1.0, max_new_tokens=3))
    assert c.finish_reason == "length" and c.completion_tokens == 3
    ((full,),) = backend.complete([PROMPT], [None], Sampling(temperature=0, max_new_tokens=20))
    stop = full.text[4:7]
    ((cut,),) = backend.complete(
        [PROMPT], [None], Sampling(temperature=0, max_new_tokens=20, stop=[stop])
    )
    assert stop not in cut.text and full.text.startswith(cut.text)
    long = [{"role": "user", "content": "fox " * 2000}]
    ((c,),) = backend.complete([long], [None], Sampling(max_new_tokens=5))
    assert c.finish_reason == "length" and c.completion_tokens == 0


def test_bad_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a model directory"):
        make_backend(path=tmp_path)


def test_static_cache_path_gives_the_same_rows(backend):
    """The GPU path (static cache, fixed shapes, on-device sampling) run eagerly on CPU
    must produce exactly what the dynamic-cache path produces."""
    from distill.backends.hf import HFBackend

    static = HFBackend(backend.name, batch_size=4, static=True, device="cpu")
    s = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=3, topk_logprobs=2)
    convs, tools = CONVS * 2, [TOOLS, None, None] * 2
    a = backend.complete(convs, tools, s, n=2)
    b = static.complete(convs, tools, s, n=2)
    assert [[c.text for c in r] for r in a] == [[c.text for c in r] for r in b]
    assert [[c.finish_reason for c in r] for r in a] == [[c.finish_reason for c in r] for r in b]
    assert [[len(c.topk) for c in r] for r in a] == [[len(c.topk) for c in r] for r in b]


def test_static_prefill_in_row_chunks_and_release_change_nothing(backend, monkeypatch):
    """A prefill split into chunks of rows (bounded memory), and a decode after release()
    (the RL trainer frees the caches for its update), give the same rows and log-probs."""
    from distill.backends import static_decode
    from distill.backends.hf import HFBackend

    static = HFBackend(backend.name, batch_size=4, static=True, device="cpu")
    s = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=5, sampler_logprobs=True)
    convs, tools = CONVS * 2, [TOOLS, None, None] * 2
    whole = static.complete(convs, tools, s, n=2)
    static.release_cache()
    assert not static.static.shapes
    monkeypatch.setattr(static_decode, "PREFILL_TOKENS", 1)  # one row per chunk
    rows = static.complete(convs, tools, s, n=2)
    assert [[c.token_ids for c in r] for r in rows] == [[c.token_ids for c in r] for r in whole]
    for r, w in zip(rows, whole, strict=True):
        for c, d in zip(r, w, strict=True):
            assert c.logprobs == pytest.approx(d.logprobs, abs=1e-5)


def test_prompt_render_without_jinja_matches_the_template(backend):
    """Our template's prompts are rendered in Python; the token ids are the template's."""
    from distill.chat.template import CHAT_TEMPLATE
    from distill.messages import drop_old_reasoning, to_openai
    from teachers.base import get_domain

    assert backend.tokenizer.chat_template == CHAT_TEMPLATE
    convs = [(c, None) for c in CONVS]
    for d in ("math", "agents"):
        dom = get_domain(d)
        for t in dom.tasks("train", 5, 0, 3):
            msgs = dom.oracle(t)
            convs += [(msgs[:k], t.tools) for k in range(1, len(msgs) + 1)]
    for messages, tools in convs:
        want = backend.tokenizer.apply_chat_template(
            to_openai(drop_old_reasoning(messages)),
            tools=tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        assert backend.render(messages, tools) == list(want)
